"""End-to-end (marker `browser`): the Refer and Dense tabs (masks, faint low-scoring referrals, labels that do
not cover each other, a traced region caption, detecting again), the example buttons, and the tab bar (arrow keys,
a narrow screen, every panel named by its tab). Screenshots go to test-artifacts/."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from playwright.sync_api import Page, expect

from tests.app_browser.conftest import TIMEOUT, _last_generation, _load_example, _open_tab
from tests.helpers import set_slider

pytestmark = pytest.mark.browser


def test_referring_expressions_get_masks_and_text_stays_text(app: Page, studio_app, artifacts_dir):
    _load_example(app, 0)
    _open_tab(app, "Referring", "#refer-viewer")
    hostile = "<img src=x onerror=window.__xss=1>"
    app.locator("#refer-text textarea").fill(f"the large blue triangle\n{hostile}")
    app.locator("#refer-run").click()
    expect(app.locator("#refer-viewer .px-mask")).to_have_count(2, timeout=TIMEOUT)
    expect(app.locator("#refer-viewer .px-region")).to_have_count(2)
    rows = app.locator("#refer-viewer .px-region-row .px-region-text")
    expect(rows.nth(1)).to_have_text(hostile)
    assert app.evaluate("window.__xss") is None
    assert app.locator('img[src="x"]').count() == 0
    colours = app.locator("#refer-viewer .px-region").evaluate_all("els => els.map(e => e.getAttribute('stroke'))")
    assert len(set(colours)) == 2
    expect(app.locator("#refer-files a[href$='/mask_1_the-large-blue-triangle.png']")).to_have_count(1)
    refer_row = _last_generation(studio_app.store, "refer")
    assert refer_row["words"] == ["the large blue triangle", hostile]
    # a screen reader gets a list, each result named with its expression, score and box
    expect(app.locator("#refer-viewer .px-regions")).to_have_attribute("role", "list")
    first = app.locator("#refer-viewer .px-region-row").first
    expect(first).to_have_attribute("role", "listitem")
    box = ", ".join(str(round(v)) for v in refer_row["boxes"][0])
    expect(first).to_have_attribute("aria-label", re.compile(rf"^1\. the large blue triangle, .* — box {box}$"))
    app.screenshot(path=str(artifacts_dir / "app-refer.png"))


def test_a_low_scoring_referral_is_drawn_dashed_and_faint(app: Page, app_checkpoint):
    """Example 0 holds no circle: the embedded model scores "the green circle" under its evaluation's absent
    median (metrics.json), so its box is dashed and its mask faint; the triangle's are drawn as findings."""
    if not Path(app_checkpoint, "metrics.json").is_file():
        pytest.skip("needs a checkpoint with an evaluation (the embedded one has it)")
    _load_example(app, 0)
    _open_tab(app, "Referring", "#refer-viewer")
    app.locator("#refer-text textarea").fill("the large blue triangle\nthe green circle")
    app.locator("#refer-run").click()
    expect(app.locator("#refer-viewer .px-region")).to_have_count(2, timeout=TIMEOUT)
    expect(app.locator("#refer-viewer .px-region-row").nth(1)).to_contain_text("low score")
    dashes = app.locator("#refer-viewer .px-region").evaluate_all(
        "els => els.map(e => getComputedStyle(e).strokeDasharray)")
    opacity = app.locator("#refer-viewer .px-mask").evaluate_all("els => els.map(e => getComputedStyle(e).opacity)")
    assert dashes[0] == "none" and dashes[1] != "none", dashes
    assert float(opacity[0]) == 1.0 and float(opacity[1]) < 0.5, opacity


def test_labels_of_boxes_in_the_same_place_do_not_cover_each_other(app: Page):
    """The same expression twice gives the same box twice; its two number labels sit side by side."""
    _load_example(app, 0)
    _open_tab(app, "Referring", "#refer-viewer")
    app.locator("#refer-text textarea").fill("the large blue triangle\nthe large blue triangle")
    app.locator("#refer-run").click()
    expect(app.locator("#refer-viewer .px-region-label")).to_have_count(2, timeout=TIMEOUT)
    boxes = app.locator("#refer-viewer .px-region").evaluate_all(
        "els => els.map(e => ['x', 'y', 'width', 'height'].map(k => e.getAttribute(k)))")
    assert boxes[0] == boxes[1]
    first, second = app.locator("#refer-viewer .px-region-label").evaluate_all(
        "els => els.map(e => { const b = e.getBBox(); return [b.x, b.y, b.x + b.width, b.y + b.height]; })")
    assert first[2] <= second[0] or second[2] <= first[0], (first, second)  # no horizontal overlap


def test_dense_regions_and_a_traced_region_caption(app: Page, studio_app, artifacts_dir):
    _load_example(app, 0)
    _open_tab(app, "Dense captions", "#dense-viewer")
    set_slider(app, "dense-threshold", "0")
    app.locator("#dense-run").click()
    regions = app.locator("#dense-viewer .px-region")
    expect(regions.first).to_be_visible(timeout=TIMEOUT)
    count = regions.count()
    expect(app.locator("#dense-viewer .px-region-row")).to_have_count(count)
    row = _last_generation(studio_app.store, "dense")
    assert len(row["boxes"]) == count

    app.locator("#dense-viewer .px-region-row").first.click()
    root = app.locator("#dense-viewer .px-root")
    expect(app.locator("#dense-viewer .px-region.px-selected")).to_have_count(1, timeout=TIMEOUT)
    expect(app.locator("#dense-viewer .px-region-row").first).to_have_attribute("aria-current", "true")
    expect(app.locator("#region-text textarea")).not_to_have_value("", timeout=TIMEOUT)  # streaming began
    expect(root).to_have_attribute("data-status", "done", timeout=TIMEOUT)
    traced = _last_generation(studio_app.store)
    assert traced["prompts"]["box"] == row["boxes"][0]
    expect(app.locator("#dense-viewer .px-seg")).to_have_count(len(traced["words"]))
    expect(app.locator("#region-text textarea")).to_have_value(" ".join(traced["words"]))
    # a screen reader hears the region's caption once it is done (the dense viewer's live region)
    expect(app.locator("#dense-viewer .px-announce")).to_have_text("Region caption: " + " ".join(traced["words"]))
    app.screenshot(path=str(artifacts_dir / "app-dense.png"))

    # from the keyboard: Enter on a focused row captions that region, and the focus stays on it as the caption
    # streams in (every update redraws the rows)
    assert count > 1
    app.locator("#dense-viewer .px-region-row").nth(count - 1).focus()
    app.keyboard.press("Enter")
    expect(app.locator(f'#dense-viewer .px-region.px-selected[data-i="{count - 1}"]')).to_have_count(1,
                                                                                               timeout=TIMEOUT)
    expect(root).to_have_attribute("data-status", "done", timeout=TIMEOUT)
    expect(app.locator(f'#dense-viewer .px-region-row[data-i="{count - 1}"]')).to_be_focused()

    app.get_by_role("tab", name="Model").click()
    expect(app.locator("#model-panel")).to_contain_text("Parameters")
    expect(app.locator("#model-panel")).to_contain_text(studio_app.demo.studio.model.config.preset)
    app.screenshot(path=str(artifacts_dir / "app-model.png"))


def test_detecting_regions_again_clears_the_last_region_caption(app: Page):
    """A region's traced caption stayed in "Selected region's caption" after Detect drew new regions, none
    of them selected (the caption named a region no longer shown)."""
    _load_example(app, 0)
    _open_tab(app, "Dense captions", "#dense-viewer")
    app.locator("#dense-run").click()
    expect(app.locator("#dense-viewer .px-region-row").first).to_be_visible(timeout=TIMEOUT)
    app.locator("#dense-viewer .px-region-row").first.click()
    root = app.locator("#dense-viewer .px-root")
    expect(app.locator("#region-text textarea")).not_to_have_value("", timeout=TIMEOUT)
    expect(root).to_have_attribute("data-status", "done", timeout=TIMEOUT)
    app.locator("#dense-run").click()
    expect(app.locator("#dense-viewer .px-status")).to_contain_text("Click a region", timeout=TIMEOUT)
    expect(app.locator("#dense-viewer .px-region.px-selected")).to_have_count(0)
    expect(app.locator("#region-text textarea")).to_have_value("")


def test_example_buttons_are_named_after_their_images_and_keep_their_thumbnails(app: Page, example_images):
    """Each example was a button holding only an <img alt="">: a screen reader said "button" six times. Each is
    now named after its file (static/page.js), and still shows its thumbnail (gr.Examples(example_labels=) would
    have replaced the pictures by the label text)."""
    buttons = app.locator("#examples button")
    expect(buttons).to_have_count(len(example_images))
    for i, image in enumerate(example_images):
        expect(buttons.nth(i)).to_have_accessible_name(f"Load example image {image.name}")
        thumbnail = buttons.nth(i).locator("img")
        expect(thumbnail).to_be_visible()
        assert thumbnail.evaluate("img => img.complete && img.naturalWidth") > 0
    # the name is what a screen reader user picks by
    app.get_by_role("button", name=f"Load example image {example_images[2].name}").click()
    expect(app.locator("#caption-viewer .px-stage.px-has-image")).to_have_count(1, timeout=TIMEOUT)


def test_the_tab_bar_follows_the_arrow_keys(app: Page):
    """WAI-ARIA tabs (manual activation): Left/Right move the focus along the tab bar (wrapping), Home/End to its
    ends, Enter opens the focused tab; only the selected tab is a Tab stop. Gradio 6 had no keys on its tabs."""
    names = ["Caption & trace", "Referring", "Dense captions", "Annotate", "Model"]
    tabs = [app.get_by_role("tab", name=name, exact=True) for name in names]
    expect(tabs[0]).to_have_attribute("aria-selected", "true")
    tabs[0].focus()
    app.keyboard.press("ArrowRight")
    expect(tabs[1]).to_be_focused()
    expect(tabs[0]).to_have_attribute("aria-selected", "true")  # the focus moved; the selection did not
    app.keyboard.press("ArrowLeft")
    app.keyboard.press("ArrowLeft")  # wraps round to the last tab
    expect(tabs[4]).to_be_focused()
    app.keyboard.press("Home")
    expect(tabs[0]).to_be_focused()
    app.keyboard.press("End")
    expect(tabs[4]).to_be_focused()
    expect(tabs[0]).to_have_attribute("tabindex", "0")  # the selected tab is the bar's one Tab stop
    for tab in tabs[1:]:
        expect(tab).to_have_attribute("tabindex", "-1")
    app.keyboard.press("ArrowRight")
    app.keyboard.press("ArrowRight")
    expect(tabs[1]).to_be_focused()
    app.keyboard.press("Enter")  # opens Referring
    expect(tabs[1]).to_have_attribute("aria-selected", "true")
    expect(app.locator("#refer-viewer")).to_be_visible()
    expect(tabs[1]).to_have_attribute("tabindex", "0")
    expect(tabs[0]).to_have_attribute("tabindex", "-1")
    tabs[1].focus()
    app.keyboard.press("Tab")  # into the panel, not along the tab bar
    assert app.evaluate("document.activeElement.getAttribute('role')") != "tab"
    # the mouse still works, and the Tab stop follows it
    tabs[2].click()
    expect(tabs[2]).to_have_attribute("aria-selected", "true")
    expect(app.locator("#dense-viewer")).to_be_visible()
    expect(tabs[2]).to_have_attribute("tabindex", "0")
    expect(tabs[1]).to_have_attribute("tabindex", "-1")


def test_on_a_narrow_screen_every_tab_stays_a_tab_on_the_bar(app: Page):
    """On a narrow screen gradio put the tabs that did not fit (Annotate and Model on a phone) in a "More tabs" menu
    of plain buttons: no tab role, their panels unnamed, out of the arrow keys' reach. The tab bar wraps instead
    (gr.Tabs(overflow_behavior="wrap")): every tab is a tab of the bar, on a second row when needed."""
    app.set_viewport_size({"width": 393, "height": 851})  # a Pixel 5
    names = ["Caption & trace", "Referring", "Dense captions", "Annotate", "Model"]
    tabs = [app.get_by_role("tab", name=name, exact=True) for name in names]
    for tab in tabs:
        expect(tab).to_be_visible()
    expect(app.get_by_role("button", name="More tabs")).to_have_count(0)
    rows = {round(tab.bounding_box()["y"]) for tab in tabs}
    assert len(rows) > 1, rows  # wrapped: 393 px do not hold five tabs in a row
    tabs[0].focus()
    app.keyboard.press("End")
    expect(tabs[4]).to_be_focused()
    app.keyboard.press("ArrowLeft")
    expect(tabs[3]).to_be_focused()
    app.keyboard.press("Enter")  # opens Annotate
    expect(tabs[3]).to_have_attribute("aria-selected", "true")
    panel = app.get_by_role("tabpanel", name="Annotate", exact=True)
    expect(panel).to_be_visible()
    expect(panel).to_have_attribute("aria-labelledby", tabs[3].get_attribute("id"))


def test_each_tab_panel_is_named_by_its_tab(app: Page):
    """Gradio 6's tab panels (role=tabpanel) had no accessible name: a screen reader entering one said "tab panel"
    and nothing of which. static/page.js labels each panel with its tab (aria-labelledby = the tab's id, paired
    through the tab's aria-controls), as each is mounted (a panel is mounted when its tab is first opened)."""
    names = ["Caption & trace", "Referring", "Dense captions", "Annotate", "Model"]
    for name in names:
        tab = app.get_by_role("tab", name=name, exact=True)
        tab.click()
        expect(tab).to_have_attribute("aria-selected", "true")
        panel = app.get_by_role("tabpanel", name=name, exact=True)
        expect(panel).to_be_visible()
        expect(panel).to_have_accessible_name(name)
        expect(panel).to_have_attribute("aria-labelledby", tab.get_attribute("id"))
        expect(panel).to_have_attribute("id", tab.get_attribute("aria-controls"))
    # the hidden panels keep their names: each points at the one tab controlling it
    pairs = app.evaluate("""() => Array.from(document.querySelectorAll('[role="tabpanel"]')).map((p) => {
        const tab = document.getElementById(p.getAttribute('aria-labelledby'));
        return [p.id, tab && tab.getAttribute('role'), tab && tab.getAttribute('aria-controls')]; })""")
    assert sorted(pairs) == sorted([[f"tab-{key}", "tab", f"tab-{key}"]
                                    for key in ("caption", "refer", "dense", "annotate", "model")])

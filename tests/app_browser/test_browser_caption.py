"""End-to-end: the Caption tab in headless Chromium (marker `browser`): point, box and keyboard prompts, a
streamed trace, Trace of a typed caption, the repetition penalty, a click beside the image, Generate without an
image, and what screen readers are told while a caption streams and once it is done. Screenshots go to
test-artifacts/.

The rest of tests/app_browser/: an image loaded while a caption streams or waits: test_browser_image_loading.py;
Refer, Dense, the examples and the tab bar: test_browser_tabs.py. Fixtures and helpers: conftest.py."""

from __future__ import annotations

import re
import time

import pytest
from playwright.sync_api import Page, expect

from pixelllm.ui import workspace as ws
from tests.app_browser.conftest import (
    TIMEOUT,
    _click_image,
    _last_generation,
    _load_example,
    _screen,
    _slow_words,
)
from tests.helpers import set_slider

pytestmark = pytest.mark.browser


def _watch_word_counts(page: Page, viewer: str) -> None:
    page.evaluate(
        """(sel) => { const root = document.querySelector(sel + ' .px-root'); window.__wordCounts = [];
             new MutationObserver(() => window.__wordCounts.push(Number(root.dataset.words)))
               .observe(root, {attributes: true, attributeFilter: ['data-words']}); }""", viewer)


def test_click_a_point_and_stream_a_trace(app: Page, studio_app, artifacts_dir):
    _load_example(app, 0)
    root = app.locator("#caption-viewer .px-root")
    _click_image(app, "#caption-viewer", 150, 190)
    expect(app.locator("#caption-viewer .px-point.px-pos")).to_have_count(1)
    _watch_word_counts(app, "#caption-viewer")
    picture = app.locator("#caption-viewer image.px-base")
    picture.evaluate("el => { el.dataset.tag = 'before' }")
    app.locator("#generate").click()
    expect(root).to_have_attribute("data-status", "done", timeout=TIMEOUT)
    expect(picture).to_have_attribute("data-tag", "before")  # streaming never replaced the picture element

    n = int(root.get_attribute("data-words"))
    assert n >= 3
    counts = app.evaluate("window.__wordCounts")
    partial = sorted({c for c in counts if 0 < c < n})  # renders while the caption was still streaming
    assert len(partial) >= (2 if n >= 6 else 1), f"words did not arrive over several updates: {counts}"
    assert counts[-1] == n and counts == sorted(counts), counts
    expect(app.locator("#caption-viewer .px-seg")).to_have_count(n)  # one trace segment per word
    expect(app.locator("#caption-viewer .px-word")).to_have_count(n)
    colours = app.locator("#caption-viewer .px-seg .px-line").evaluate_all(
        "els => els.map(e => e.getAttribute('stroke'))")
    assert len(set(colours)) == n  # a gradient: every word its own colour
    row = _last_generation(studio_app.store)
    assert row["prompts"]["points"] == [[pytest.approx(150, abs=2), pytest.approx(190, abs=2)]]
    assert len(row["words"]) == n
    expect(app.locator("#caption-text textarea")).to_have_value(" ".join(row["words"]))
    expect(app.locator("#caption-files a[href$='/caption.json']")).to_have_count(1)
    expect(app.locator("#caption-files a[href$='/caption_overlay.png']")).to_have_count(1)

    # hovering a word shows its box
    k = min(1, n - 1)
    app.locator("#caption-viewer .px-word").nth(k).hover()
    hl = app.locator("#caption-viewer .px-hl-box")
    expect(hl).to_have_count(1)
    expect(hl).to_have_attribute("data-i", str(k))
    x0, y0, x1, y1 = row["boxes"][k]
    assert float(hl.get_attribute("x")) == pytest.approx(x0, abs=0.01)
    assert float(hl.get_attribute("y")) == pytest.approx(y0, abs=0.01)
    app.screenshot(path=str(artifacts_dir / "app-caption.png"))
    # keyboard only: a word is reached with Tab and pinned with Enter, as a click pins it
    chip = app.locator("#caption-viewer .px-word").nth(0)
    chip.focus()
    app.keyboard.press("Enter")
    expect(chip).to_have_class(re.compile(r"\bpx-pinned\b"))
    expect(chip).to_have_attribute("aria-pressed", "true")  # a screen reader hears it pinned
    app.keyboard.press(" ")
    expect(chip).not_to_have_class(re.compile(r"\bpx-pinned\b"))
    expect(chip).to_have_attribute("aria-pressed", "false")

    # clicking a pixel (inspect mode) lists the words whose boxes cover it
    app.get_by_label("Inspect words").check()
    _click_image(app, "#caption-viewer", (x0 + x1) / 2, (y0 + y1) / 2)
    expect(app.locator(f'#caption-viewer .px-word.px-hit[data-i="{k}"]')).to_have_count(1)
    assert app.locator("#caption-viewer .px-inspect .px-hit-item").count() >= 1

    # replay animates the trace again and ends with every segment shown
    app.locator("#caption-viewer .px-replay").click()
    expect(root).to_have_attribute("data-replaying", "0", timeout=TIMEOUT)
    expect(app.locator("#caption-viewer .px-seg.px-hidden")).to_have_count(0)


def test_box_from_two_clicks_conditions_the_caption(app: Page, studio_app):
    _load_example(app, 1)
    app.get_by_label("Box (2 clicks)").check()
    _click_image(app, "#caption-viewer", 180, 150)
    expect(app.locator("#caption-viewer .px-pending")).to_have_count(1)
    _click_image(app, "#caption-viewer", 90, 60)
    box = app.locator("#caption-viewer .px-prompt-box")
    expect(box).to_have_count(1)
    assert float(box.get_attribute("x")) == pytest.approx(90, abs=2)
    assert float(box.get_attribute("width")) == pytest.approx(90, abs=3)
    app.locator("#generate").click()
    root = app.locator("#caption-viewer .px-root")
    expect(root).to_have_attribute("data-status", "done", timeout=TIMEOUT)
    row = _last_generation(studio_app.store)
    assert row["prompts"]["box"] == [pytest.approx(v, abs=2) for v in (90, 60, 180, 150)]
    assert row["prompts"]["points"] == []
    assert int(root.get_attribute("data-words")) == len(row["words"]) >= 1

    # a drag draws a box too (replacing the two-click one), and Clear removes prompts
    app.get_by_role("button", name="Clear prompts").click()
    expect(box).to_have_count(0)
    start, end = _screen(app, "#caption-viewer", 40, 40), _screen(app, "#caption-viewer", 120, 100)
    app.mouse.move(*start)
    app.mouse.down()
    app.mouse.move((start[0] + end[0]) / 2, (start[1] + end[1]) / 2)
    app.mouse.move(*end)
    app.mouse.up()
    expect(box).to_have_count(1)
    assert float(box.get_attribute("x")) == pytest.approx(40, abs=2)
    assert float(box.get_attribute("height")) == pytest.approx(60, abs=3)


def test_trace_a_typed_caption(app: Page, studio_app):
    _load_example(app, 0)
    _click_image(app, "#caption-viewer", 150, 190)
    expect(app.locator("#caption-viewer .px-point.px-pos")).to_have_count(1)
    app.get_by_text("Trace your own caption").click()
    typed = "In this picture we can see a large red circle."
    app.locator("#trace-text textarea").fill(typed)
    app.locator("#trace-run").click()
    root = app.locator("#caption-viewer .px-root")
    expect(app.locator("#caption-text textarea")).to_have_value(typed, timeout=TIMEOUT)
    expect(root).to_have_attribute("data-status", "done")
    expect(root).to_have_attribute("data-words", str(len(typed.split())))
    expect(app.locator("#caption-viewer .px-word")).to_have_count(len(typed.split()))
    expect(app.locator("#caption-viewer .px-point.px-pos")).to_have_count(1)  # the prompt stays drawn
    row = _last_generation(studio_app.store)
    assert row["extra"]["traced"] is True and row["words"] == typed.split()
    assert row["prompts"]["points"] == [[pytest.approx(150, abs=2), pytest.approx(190, abs=2)]]
    expect(app.locator("#caption-files a[href$='/trace.json']")).to_have_count(1)
    words = app.locator("#caption-viewer .px-word").evaluate_all("els => els.map(e => e.textContent.trim())")
    assert words == typed.split()
    # Enter traces too, as docs/app.md says (the two-line box took it as a new line)
    first = row["id"]
    app.locator("#trace-text textarea").fill("a small blue square")
    app.locator("#trace-text textarea").press("Enter")
    expect(app.locator("#caption-text textarea")).to_have_value("a small blue square", timeout=TIMEOUT)
    assert _last_generation(studio_app.store)["id"] > first


def test_the_repetition_penalty_starts_at_the_checkpoints_default_and_reaches_the_caption(app: Page, studio_app):
    default = studio_app.predictor.model.config.repetition_penalty  # 1.1 for the embedded checkpoint
    _load_example(app, 0)
    app.get_by_text("Decoding").click()
    slider = app.locator("#repetition-penalty input[type=range]")
    expect(slider).to_be_visible()
    assert float(slider.input_value()) == pytest.approx(default)
    # max words starts at the checkpoint's token limit (the model ends it: app_callbacks/test_callbacks_caption.py)
    limit = studio_app.predictor.model.config.max_new_tokens
    assert int(app.locator("#max-words input[type=number]").input_value()) == limit
    set_slider(app, "repetition-penalty", "1.35")
    app.locator("#max-words input[type=number]").fill("6")
    app.locator("#max-words input[type=number]").press("Enter")
    app.locator("#generate").click()
    expect(app.locator("#caption-viewer .px-root")).to_have_attribute("data-status", "done", timeout=TIMEOUT)
    assert _last_generation(studio_app.store)["extra"]["decoding"]["repetition_penalty"] == pytest.approx(1.35)
    # sampling with the seed field as the page starts draws a new seed each time (it used to start at 0, a fixed
    # seed: every sampled caption was the same)
    app.locator("#sampling input[type=checkbox]").check()
    seeds = []
    for _ in range(2):
        first = _last_generation(studio_app.store)["id"]
        app.locator("#generate").click()
        deadline = time.monotonic() + TIMEOUT / 1000
        while _last_generation(studio_app.store)["id"] == first and time.monotonic() < deadline:
            app.wait_for_timeout(100)
        row = _last_generation(studio_app.store)
        assert row["id"] > first and row["extra"]["decoding"]["do_sample"]
        seeds.append(row["extra"]["decoding"]["seed"])
    assert seeds[0] != seeds[1]


def test_enter_in_the_text_prompt_is_ignored_while_a_caption_streams(app: Page, studio_app, monkeypatch):
    """Generate ignores a second press while a caption streams (gradio's trigger_mode "once"), but Enter in the text
    prompt was another event with its own guard: it started a second stream into the same view, both logged. The
    two are one event now; Enter still generates once the caption is done."""
    _slow_words(monkeypatch, studio_app.predictor, 0.25)
    _load_example(app, 0)
    generate = {i for i, fn in studio_app.demo.fns.items() if fn.name == "on_generate"}
    runs: list[int] = []  # queue requests for a caption, from either trigger
    app.on("request", lambda r: runs.append(1) if "/queue/join" in r.url and (
        r.post_data_json or {}).get("fn_index") in generate else None)
    before = _last_generation(studio_app.store)["id"] if studio_app.store.list_generations(limit=1) else 0
    root = app.locator("#caption-viewer .px-root")
    prompt = app.locator("#text-prompt textarea")
    app.locator("#generate").click()
    app.wait_for_function("Number(document.querySelector('#caption-viewer .px-root').dataset.words) >= 2")
    prompt.press("Enter")
    app.locator("#generate").click()
    expect(root).to_have_attribute("data-status", "done", timeout=TIMEOUT)
    assert len(runs) == 1, "a second caption started while the first streamed"
    rows = [g for g in studio_app.store.list_generations(task="caption", limit=5) if g["id"] > before]
    assert len(rows) == 1 and app.locator("#caption-text textarea").input_value() == " ".join(rows[0]["words"])
    prompt.press("Enter")
    expect(root).to_have_attribute("data-status", "streaming", timeout=TIMEOUT)
    assert len(runs) == 2
    expect(root).to_have_attribute("data-status", "done", timeout=TIMEOUT)


def test_generate_without_an_image_explains_itself_then_an_upload_works(app: Page, example_images):
    app.locator("#generate").click()
    expect(app.get_by_text(ws.NO_IMAGE).first).to_be_visible()
    app.locator("#image-input input[type=file]").set_input_files(str(example_images[3]))  # the app is still up
    expect(app.locator("#caption-viewer .px-stage.px-has-image")).to_have_count(1, timeout=TIMEOUT)
    expect(app.locator("#caption-viewer .px-status")).to_contain_text("Image 256×256")


def test_a_click_beside_a_tall_image_adds_no_prompt(app: Page, tmp_path):
    """The viewer letterboxes a tall image: a click on the grey band beside it used to add a point on its edge."""
    from PIL import Image

    tall = tmp_path / "tall.png"
    Image.new("RGB", (100, 400), (200, 30, 30)).save(tall)
    app.locator("#image-input input[type=file]").set_input_files(str(tall))
    expect(app.locator("#caption-viewer .px-status")).to_contain_text("Image 100×400", timeout=TIMEOUT)
    sx, sy = _screen(app, "#caption-viewer", -30, 200)
    svg = app.locator("#caption-viewer svg.px-svg").bounding_box()
    assert svg["x"] < sx < svg["x"] + svg["width"]  # the click lands on the viewer, beside the picture
    app.mouse.click(sx, sy)
    app.wait_for_timeout(1000)
    expect(app.locator("#caption-viewer .px-point")).to_have_count(0)
    _click_image(app, "#caption-viewer", 50, 200)  # on the picture: a point
    expect(app.locator("#caption-viewer .px-point.px-pos")).to_have_count(1)


def test_point_and_box_prompts_from_the_keyboard(app: Page, studio_app):
    """Keyboard only: the image is a Tab stop (with a visible focus ring); arrow keys move a cursor over it and
    Enter / Space click there, so points and a two-corner box are placed without a mouse."""
    app.locator("#examples button").nth(0).focus()
    app.keyboard.press("Enter")
    svg = app.locator("#caption-viewer svg.px-svg")
    expect(app.locator("#caption-viewer .px-stage.px-has-image")).to_have_count(1, timeout=TIMEOUT)
    app.locator("#tab-model-button").focus()
    app.keyboard.press("Tab")  # the viewer comes first in its tab; its Replay button is disabled before a caption
    expect(svg).to_be_focused()
    assert svg.evaluate("el => getComputedStyle(el).outlineStyle") not in ("none", "")
    cursor = app.locator("#caption-viewer .px-kbd")
    expect(cursor).to_have_count(1)
    for key in ("ArrowLeft", "ArrowLeft", "ArrowUp"):
        app.keyboard.press(key)
    app.keyboard.press("Enter")  # a positive point 2 steps left and 1 up of the centre (a step: 1/32 of the image)
    point = app.locator("#caption-viewer .px-point.px-pos")
    expect(point).to_have_count(1)
    step = 256 / 32
    assert float(point.get_attribute("cx")) == pytest.approx(128 - 2 * step, abs=0.5)
    assert float(point.get_attribute("cy")) == pytest.approx(128 - step, abs=0.5)
    expect(svg).to_be_focused()  # the prompt's redraw keeps the focus on the image

    app.get_by_label("Box (2 clicks)").focus()
    app.keyboard.press(" ")
    expect(app.get_by_label("Box (2 clicks)")).to_be_checked()
    svg.focus()
    app.keyboard.press(" ")  # the first corner where the point is
    expect(app.locator("#caption-viewer .px-pending")).to_have_count(1)
    app.keyboard.press("Shift+ArrowRight")  # Shift: 4 steps
    app.keyboard.press("Shift+ArrowDown")
    app.keyboard.press("Enter")
    box = app.locator("#caption-viewer .px-prompt-box")
    expect(box).to_have_count(1)
    assert float(box.get_attribute("width")) == pytest.approx(4 * step, abs=1)
    assert float(box.get_attribute("height")) == pytest.approx(4 * step, abs=1)
    app.locator("#generate").focus()
    app.keyboard.press("Enter")
    expect(app.locator("#caption-viewer .px-root")).to_have_attribute("data-status", "done", timeout=TIMEOUT)
    row = _last_generation(studio_app.store)
    assert len(row["prompts"]["points"]) == 1 and row["prompts"]["box"] is not None


def test_the_status_line_is_announced_once_a_caption_is_done_not_for_every_word(app: Page, studio_app, monkeypatch):
    """The status is a polite live region: while words stream it is busy (a screen reader held "Generating… N
    words" for every word), then the final message is announced."""
    _slow_words(monkeypatch, studio_app.predictor, 0.2)  # the streaming state lasts long enough to be seen
    _load_example(app, 0)
    root = app.locator("#caption-viewer .px-root")
    status = app.locator("#caption-viewer .px-status")
    expect(status).to_have_attribute("aria-live", "polite")
    expect(status).to_have_attribute("aria-busy", "false")
    app.locator("#generate").click()
    app.wait_for_function("Number(document.querySelector('#caption-viewer .px-root').dataset.words) >= 2")
    expect(root).to_have_attribute("data-status", "streaming")
    expect(status).to_have_attribute("aria-busy", "true")
    expect(root).to_have_attribute("data-status", "done", timeout=TIMEOUT)
    expect(status).to_have_attribute("aria-busy", "false")
    expect(status).not_to_have_text("")


def test_a_caption_is_announced_when_done_and_every_few_seconds_while_it_streams(app: Page, studio_app, monkeypatch):
    """The words stream into a visually hidden polite live region: nothing per word, the words so far at most every
    5 s, then the whole caption once it is done; a traced caption is announced too. Sighted users do not see it."""
    _slow_words(monkeypatch, studio_app.predictor, 0.6)  # a caption of >= 9 words streams for > 5 s
    _load_example(app, 0)
    region = app.locator("#caption-viewer .px-announce")
    expect(region).to_have_attribute("aria-live", "polite")
    expect(region).to_have_attribute("aria-atomic", "true")
    box = region.bounding_box()
    assert box is not None and box["width"] <= 1 and box["height"] <= 1, box  # in the page, out of sight
    assert region.evaluate("el => getComputedStyle(el).overflow") == "hidden"
    app.evaluate(
        """() => { const region = document.querySelector('#caption-viewer .px-announce'); window.__said = [];
             new MutationObserver(() => { if (region.textContent) window.__said.push(
                 [performance.now(), region.textContent]); })
               .observe(region, {childList: true, characterData: true, subtree: true}); }""")
    app.get_by_text("Decoding").click()
    app.locator("#max-words input[type=number]").fill("12")  # a caption of at most 12 words: ~8 s
    app.locator("#max-words input[type=number]").press("Enter")
    root = app.locator("#caption-viewer .px-root")
    _watch_word_counts(app, "#caption-viewer")
    app.locator("#generate").click()
    app.wait_for_function("Number(document.querySelector('#caption-viewer .px-root').dataset.words) >= 3")
    assert app.evaluate("window.__said") == []  # not a word at a time
    expect(root).to_have_attribute("data-status", "done", timeout=TIMEOUT)
    caption = app.locator("#caption-text textarea").input_value()
    expect(region).to_have_text(f"Caption: {caption}")
    said = app.evaluate("window.__said")
    n = len(caption.split())
    assert said[-1][1] == f"Caption: {caption}"
    # 12 words 0.6 s apart stream for over 5 s: the words so far were said on the way, in order, not one by one
    assert n >= 9, f"this test needs a longer caption: {caption!r}"
    progress = [text for _, text in said[:-1]]
    assert progress, said
    assert " ".join(progress).split() == caption.split()[:len(" ".join(progress).split())], said
    assert len(progress) < n // 2, said
    times = [t for t, _ in said[:-1]]
    assert all(b - a >= 4900 for a, b in zip(times, times[1:])), said
    # the words still streamed into the viewer over several updates; the visible status is not the announcement
    counts = app.evaluate("window.__wordCounts")
    assert len({c for c in counts if 0 < c < n}) >= 2 and counts[-1] == n, counts
    expect(app.locator("#caption-viewer .px-word")).to_have_count(n)
    expect(app.locator("#caption-viewer .px-status")).not_to_have_text(re.compile("^Caption:"))

    monkeypatch.undo()
    app.get_by_text("Trace your own caption").click()
    app.locator("#trace-text textarea").fill("a small blue square")
    app.locator("#trace-run").click()
    expect(region).to_have_text("Caption: a small blue square", timeout=TIMEOUT)

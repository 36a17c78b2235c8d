"""End-to-end: the Annotate editor from the keyboard (headless Chromium, marker `browser`).

Boxes moved and resized from the keyboard, word chips as Tab stops, where the shortcuts act (the editor, the
page body) and where they do not (the tab bar, other controls, another tab), and where the focus goes.
"""

from __future__ import annotations

import re

import pytest
from playwright.sync_api import Page, expect

from tests.annotate_browser.conftest import EDITOR, TIMEOUT, _caption_then_annotate, _to_screen

pytestmark = pytest.mark.browser


def test_move_and_resize_a_box_from_the_keyboard(app: Page, annotate_app):
    """Keyboard only: ← → select a word, Shift+arrows move its box, Ctrl+Shift+arrows resize it (one edit, sent
    when Shift is released), then `s` saves: the stored box is the one set from the keyboard."""
    _caption_then_annotate(app, 1)
    root = app.locator(f"{EDITOR} .pa-root")
    app.locator(f"{EDITOR} .pa-record").focus()  # a button of the editor (not a text field): the shortcuts apply
    app.keyboard.press("ArrowRight")
    sel = app.locator(f"{EDITOR} rect.pa-box.pa-sel")
    expect(sel).to_have_attribute("data-i", "0")
    x, y, w, h = (float(sel.get_attribute(k)) for k in ("x", "y", "width", "height"))
    size = float(app.locator(f"{EDITOR} svg.pa-svg").evaluate("el => el.viewBox.baseVal.width"))
    step = max(1, round(size / 64))
    rev = int(root.get_attribute("data-rev"))
    dx = -step if x >= step else step
    app.keyboard.press("Shift+ArrowLeft" if dx < 0 else "Shift+ArrowRight")
    expect(root).to_have_attribute("data-rev", str(rev + 1))
    assert float(sel.get_attribute("x")) == pytest.approx(x + dx, abs=0.2)
    assert float(sel.get_attribute("width")) == pytest.approx(w, abs=0.2)
    app.keyboard.down("Control")
    app.keyboard.down("Shift")
    app.keyboard.press("ArrowUp")  # shorter by a step, twice: one edit, sent when Shift is released
    app.keyboard.press("ArrowUp")
    expect(root).to_have_attribute("data-rev", str(rev + 1))
    app.keyboard.up("Shift")
    app.keyboard.up("Control")
    expect(root).to_have_attribute("data-rev", str(rev + 2))
    assert float(sel.get_attribute("height")) == pytest.approx(max(h - 2 * step, 1), abs=0.2)
    assert float(sel.get_attribute("y")) == pytest.approx(y, abs=0.2)
    app.locator("#annotate-annotator input, #annotate-annotator textarea").first.fill("kbd")
    app.locator(f"{EDITOR} .pa-record").focus()
    app.keyboard.press("s")
    expect(app.locator(f"{EDITOR} .pa-status")).to_contain_text("Saved draft as correction #", timeout=TIMEOUT)
    row = annotate_app.store.list_corrections(status="draft", limit=1)[0]
    assert row["boxes"][0] == [pytest.approx(v, abs=0.5) for v in (x + dx, y, x + dx + w, y + max(h - 2 * step, 1))]


def test_word_chips_are_selected_from_the_keyboard_and_keep_the_focus(app: Page, annotate_app):
    """A word chip is a Tab stop (a button, pressed when selected): Enter selects it, ← → move the selection and the
    focus along, the "word N of M" line is a live region, and an edit's redraw leaves the focus on the chip."""
    n = _caption_then_annotate(app, 0)
    chips = app.locator(f"{EDITOR} .pa-word")
    chips.first.focus()
    expect(chips.first).to_be_focused()
    app.keyboard.press("Enter")
    expect(chips.first).to_have_attribute("aria-pressed", "true")
    selected = app.locator(f"{EDITOR} .pa-selected")
    expect(selected).to_have_attribute("aria-live", "polite")
    expect(selected).to_have_text(f"word 1 of {n}")
    app.keyboard.press("ArrowRight")
    expect(chips.nth(1)).to_be_focused()
    expect(chips.nth(1)).to_have_attribute("aria-pressed", "true")
    expect(chips.first).to_have_attribute("aria-pressed", "false")
    root = app.locator(f"{EDITOR} .pa-root")
    rev = int(root.get_attribute("data-rev"))
    app.keyboard.press("n")  # toggle non-visual: an edit, the words are redrawn
    expect(root).to_have_attribute("data-rev", str(rev + 1))
    expect(chips.nth(1)).to_have_class(re.compile(r"\bpa-nv\b"))
    expect(chips.nth(1)).to_be_focused()
    app.keyboard.press("Backspace")  # in the editor: deletes the selected word
    expect(root).to_have_attribute("data-words", str(n - 1))
    app.locator("#annotate-open-current").focus()  # a button outside the editor: no shortcut acts there
    app.keyboard.press("Backspace")
    app.keyboard.press("n")
    chips.first.focus()
    app.keyboard.press("n")  # an edit that arrives after anything Backspace or n sent
    expect(root).to_have_attribute("data-rev", str(rev + 3))
    expect(root).to_have_attribute("data-words", str(n - 1))


def test_arrow_keys_on_the_tab_bar_move_along_the_tabs_not_the_editors_word(app: Page):
    """The editor's ← → select words with the focus in the editor (or on nothing); on the tab bar they move the focus
    along the tabs (static/page.js) and leave the selected word alone."""
    _caption_then_annotate(app, 0)
    app.locator(f"{EDITOR} .pa-record").focus()
    app.keyboard.press("ArrowRight")
    sel = app.locator(f"{EDITOR} rect.pa-box.pa-sel")
    expect(sel).to_have_attribute("data-i", "0")
    annotate, model = app.get_by_role("tab", name="Annotate"), app.get_by_role("tab", name="Model")
    annotate.focus()
    app.keyboard.press("ArrowRight")
    expect(model).to_be_focused()
    expect(annotate).to_have_attribute("aria-selected", "true")
    expect(sel).to_have_attribute("data-i", "0")  # the editor's selection stayed
    expect(app.locator(f"{EDITOR} .pa-word").first).to_have_attribute("aria-pressed", "true")
    app.keyboard.press("ArrowRight")  # wraps to the first tab
    expect(app.get_by_role("tab", name="Caption & trace")).to_be_focused()
    expect(sel).to_have_attribute("data-i", "0")


def test_shortcuts_leave_the_other_controls_of_the_page_alone(app: Page, annotate_app):
    """The editor's shortcuts act with the focus on the page body or in the editor, never from another control of
    the page: a letter, an arrow or Del on a tab, an example image or a button of the side panel undid, deleted,
    merged, moved a box, started a recording or saved a draft (only text fields were spared). After a click on the
    image (which takes the focus into the editor) they act again."""
    n = _caption_then_annotate(app, 0)
    root = app.locator(f"{EDITOR} .pa-root")
    chips = app.locator(f"{EDITOR} .pa-word")
    app.locator("#annotate-annotator input, #annotate-annotator textarea").first.fill("scoped")
    chips.nth(1).click()
    expect(chips.nth(1)).to_have_attribute("aria-pressed", "true")
    rev = int(root.get_attribute("data-rev"))
    app.keyboard.press("n")  # in the editor (the chip): an edit, so that there is one to undo
    expect(root).to_have_attribute("data-rev", str(rev + 1))
    expect(chips.nth(1)).to_have_class(re.compile(r"\bpa-nv\b"))
    rubber = app.locator(f"{EDITOR} .pa-rubber")

    outside = [app.get_by_role("tab", name="Annotate"), app.locator("#examples button").first,
               app.locator("#annotate-open-current"), app.locator("#annotate-save"),
               app.locator("#annotate-review button").first]
    for control in outside:
        control.focus()
        expect(control).to_be_focused()
        arrows = [] if control == outside[0] else ["ArrowRight", "ArrowLeft"]  # on a tab they move along the bar
        for key in ["z", "n", "m", "Delete", "Backspace", "y", "s", "r", *arrows, "Shift+ArrowDown",
                    "Control+Shift+ArrowDown", "Escape"]:
            app.keyboard.press(key)
            expect(root).to_have_attribute("data-recording", "0")
            expect(rubber).to_have_count(0)  # no box moved from the keyboard (sent when Shift is released)
        expect(control).to_be_focused()
        expect(chips.nth(1)).to_have_attribute("aria-pressed", "true")  # the selection stayed (← → Esc)
        for i in range(n):
            if i != 1:
                expect(chips.nth(i)).to_have_attribute("aria-pressed", "false")

    # a text edit in the editor: once it is drawn every key above has been answered (one queue, in order)
    text = app.locator(f"{EDITOR} .pa-text")
    text.fill("barrier")
    text.press("Enter")
    expect(chips.nth(1)).to_have_text("barrier")
    assert root.get_attribute("data-rev") == str(rev + 2)  # the n and the text edit: nothing in between
    assert root.get_attribute("data-words") == str(n)
    expect(chips.nth(1)).to_have_class(re.compile(r"\bpa-nv\b"))
    assert annotate_app.store.list_corrections(annotator="scoped") == []  # no `s` saved from a button

    # a click on the image takes the focus into the editor: the shortcuts act again
    app.locator("#annotate-open-current").focus()
    app.mouse.click(*_to_screen(app, 1, 1))
    expect(root).to_be_focused()
    expect(root).to_have_accessible_name(re.compile("trace editor"))  # what a screen reader says on landing there
    app.keyboard.press("s")
    expect(app.locator(f"{EDITOR} .pa-status")).to_contain_text("Saved draft as correction #", timeout=TIMEOUT)
    (row,) = annotate_app.store.list_corrections(annotator="scoped")
    assert row["words"][1] == "barrier" and 1 in row["non_visual"]


def test_shortcuts_do_nothing_while_another_tab_is_shown(app: Page, annotate_app):
    """With another tab selected the editor is hidden: no key reaches it, from the page body or from that tab's
    controls (and none is taken from them: the caption viewer still gets its arrows)."""
    n = _caption_then_annotate(app, 0)
    root = app.locator(f"{EDITOR} .pa-root")
    chips = app.locator(f"{EDITOR} .pa-word")
    app.locator("#annotate-annotator input, #annotate-annotator textarea").first.fill("hidden tab")
    chips.nth(1).click()
    rev = int(root.get_attribute("data-rev"))
    app.keyboard.press("n")
    expect(root).to_have_attribute("data-rev", str(rev + 1))

    app.get_by_role("tab", name="Caption & trace").click()
    expect(root).to_be_hidden()
    keys = ["z", "n", "m", "Delete", "y", "s", "r", "ArrowRight", "Shift+ArrowDown", "Escape"]
    app.evaluate("document.activeElement.blur()")  # the page body
    for key in keys:
        app.keyboard.press(key)
    app.locator("#generate").focus()  # a button of the shown tab
    for key in keys:
        app.keyboard.press(key)
    svg = app.locator("#caption-viewer svg.px-svg")
    svg.focus()  # the caption viewer: its arrows move its keyboard cursor
    position = app.locator("#caption-viewer .px-kbd-pos")
    expect(position).to_have_text("cursor at 128, 128")
    app.keyboard.press("ArrowRight")
    expect(position).to_have_text("cursor at 136, 128")  # a step: 1/32 of the image

    app.get_by_role("tab", name="Annotate").click()
    expect(root).to_be_visible()
    expect(root).to_have_attribute("data-recording", "0")
    expect(chips.nth(1)).to_have_attribute("aria-pressed", "true")
    text = app.locator(f"{EDITOR} .pa-text")
    text.fill("barrier")
    text.press("Enter")
    expect(chips.nth(1)).to_have_text("barrier")
    assert root.get_attribute("data-rev") == str(rev + 2)
    assert root.get_attribute("data-words") == str(n)
    expect(chips.nth(1)).to_have_class(re.compile(r"\bpa-nv\b"))
    assert annotate_app.store.list_corrections(annotator="hidden tab") == []


def test_a_keyboard_box_move_is_applied_when_the_window_loses_the_focus(app: Page, annotate_app):
    """Shift+arrows move a box, applied when Shift is released. When the window loses the focus first (another
    window, a dialog) the release never reaches the page: the move waited and was applied on some later, unrelated
    Shift release. It is now applied when the focus goes, once."""
    _caption_then_annotate(app, 0)
    root = app.locator(f"{EDITOR} .pa-root")
    app.locator(f"{EDITOR} .pa-record").focus()
    app.keyboard.press("ArrowRight")
    sel = app.locator(f"{EDITOR} rect.pa-box.pa-sel")
    expect(sel).to_have_attribute("data-i", "0")
    x = float(sel.get_attribute("x"))
    size = float(app.locator(f"{EDITOR} svg.pa-svg").evaluate("el => el.viewBox.baseVal.width"))
    step = max(1, round(size / 64))
    rev = int(root.get_attribute("data-rev"))
    key, dx = ("Shift+ArrowLeft", -step) if x >= step else ("Shift+ArrowRight", step)
    app.keyboard.down("Shift")
    app.keyboard.press(key.split("+")[1])
    expect(app.locator(f"{EDITOR} .pa-rubber")).to_have_count(1)
    assert root.get_attribute("data-rev") == str(rev)  # pending until Shift is released
    app.evaluate("window.dispatchEvent(new Event('blur'))")  # the window loses the focus, Shift still down here
    expect(root).to_have_attribute("data-rev", str(rev + 1))
    assert float(sel.get_attribute("x")) == pytest.approx(x + dx, abs=0.2)
    expect(app.locator(f"{EDITOR} .pa-rubber")).to_have_count(0)
    app.keyboard.up("Shift")  # the release comes later: nothing more is applied
    app.keyboard.press("n")  # an edit after anything the release might have sent
    expect(root).to_have_attribute("data-rev", str(rev + 2))
    expect(app.locator(f"{EDITOR} .pa-word").first).to_have_class(re.compile(r"\bpa-nv\b"))
    assert float(sel.get_attribute("x")) == pytest.approx(x + dx, abs=0.2)


def test_a_click_on_the_image_takes_the_focus_out_of_the_editors_own_fields(app: Page):
    """Picking the advance mode or the box mode with the mouse leaves the focus on that <select> (select_option
    does not: it sets the value without focusing), and the pace slider and the word's text box keep it too. A press
    on the image moved the focus into the editor only from outside it, so from one of its own fields the next `r`
    (or Del, ← →) still did nothing, against the page's own hint "click the image"."""
    _caption_then_annotate(app, 0)
    root = app.locator(f"{EDITOR} .pa-root")
    for field in (".pa-advance", ".pa-pace", ".pa-text", ".pa-boxmode"):
        app.locator(f"{EDITOR} {field}").focus()  # where a mouse pick in it leaves the focus
        app.mouse.click(*_to_screen(app, 1, 1))
        expect(root).to_be_focused()
    app.locator(f"{EDITOR} .pa-advance").select_option("key")
    app.locator(f"{EDITOR} .pa-advance").focus()
    app.mouse.click(*_to_screen(app, 20, 60))
    app.keyboard.press("r")
    expect(root).to_have_attribute("data-recording", "1")
    app.keyboard.press("Escape")
    expect(root).to_have_attribute("data-recording", "0")

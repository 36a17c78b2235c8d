"""End-to-end: editing with the mouse and saving in the Annotate tab (headless Chromium, marker `browser`).

Edits words and boxes and checks that a hostile annotator name stays text; saves and reviews behind a login;
asks before leaving with unsaved edits; saves edits whose server-side document was lost. Screenshots go to
test-artifacts/.
"""

from __future__ import annotations

import pytest
from playwright.sync_api import Page, expect

from tests.annotate_browser.conftest import EDITOR, TIMEOUT, _caption_then_annotate, _to_screen
from tests.conftest import start_studio, stop_studio

pytestmark = pytest.mark.browser


def test_edit_a_word_move_a_box_and_a_hostile_name_stays_text(app: Page, annotate_app, artifacts_dir):
    n = _caption_then_annotate(app, 1)
    root = app.locator(f"{EDITOR} .pa-root")
    app.locator(f"{EDITOR} .pa-word").first.click()
    app.locator(f"{EDITOR} .pa-insert").click()  # a word after the selected one, selected once it is there
    expect(root).to_have_attribute("data-words", str(n + 1))
    expect(app.locator(f"{EDITOR} .pa-word.pa-sel")).to_have_attribute("data-i", "1")
    # Split at the cursor: the text box holds the word (a trailing space typed is no edit of it); "word" -> "wo" "rd"
    text = app.locator(f"{EDITOR} .pa-text")
    text.fill("word ")
    text.evaluate("(el) => { el.focus(); el.setSelectionRange(2, 2); }")
    app.locator(f"{EDITOR} .pa-split").click()
    expect(root).to_have_attribute("data-words", str(n + 2))
    expect(app.locator(f"{EDITOR} .pa-word").nth(1)).to_have_text("wo")
    expect(app.locator(f"{EDITOR} .pa-word").nth(2)).to_have_text("rd")
    app.locator(f"{EDITOR} .pa-word").first.click()
    text = app.locator(f"{EDITOR} .pa-text")
    text.fill("<b>square</b>")
    text.press("Enter")
    expect(app.locator(f"{EDITOR} .pa-word").first).to_have_text("<b>square</b>")
    assert app.locator(f"{EDITOR} .pa-word b").count() == 0
    # draw a new box for the selected word by dragging on the image
    rev = int(root.get_attribute("data-rev"))
    app.mouse.move(*_to_screen(app, 20, 30))
    app.mouse.down()
    app.mouse.move(*_to_screen(app, 60, 60), steps=4)
    app.mouse.move(*_to_screen(app, 100, 90), steps=4)
    app.mouse.up()
    expect(root).to_have_attribute("data-rev", str(rev + 1))
    sel = app.locator(f"{EDITOR} rect.pa-box.pa-sel")
    assert float(sel.get_attribute("x")) == pytest.approx(20, abs=2)
    assert float(sel.get_attribute("width")) == pytest.approx(80, abs=3)
    # "click two corners": the first click marks a corner, the second sets the box (the first click's redraw used
    # to forget the corner, so the box never moved)
    app.locator(f"{EDITOR} select.pa-boxmode").select_option("corners")
    app.mouse.click(*_to_screen(app, 150, 40))
    expect(app.locator(f"{EDITOR} circle.pa-corner")).to_have_count(1)
    app.mouse.click(*_to_screen(app, 110, 100))
    expect(root).to_have_attribute("data-rev", str(rev + 2))
    assert [float(sel.get_attribute(k)) for k in ("x", "y", "width", "height")] == [
        pytest.approx(v, abs=2) for v in (110, 40, 40, 60)]
    app.locator(f"{EDITOR} select.pa-boxmode").select_option("drag")

    hostile = '<img src=x onerror="window.__xss=1;alert(1)">'
    app.locator("#annotate-annotator input, #annotate-annotator textarea").first.fill(hostile)
    app.evaluate("document.activeElement.blur()")  # shortcuts are ignored while typing in a field
    app.keyboard.press("s")  # save draft
    expect(app.locator(f"{EDITOR} .pa-status")).to_contain_text("Saved draft as correction #", timeout=TIMEOUT)
    row = annotate_app.store.list_corrections(status="draft", limit=1)[0]
    assert row["annotator"] == hostile and row["words"][0] == "<b>square</b>"
    assert row["boxes"][0] == [pytest.approx(v, abs=2) for v in (110, 40, 150, 100)]
    cell = app.locator("#annotate-list tr.pl-row td.pl-annotator").first
    expect(cell).to_have_text(hostile, timeout=TIMEOUT)
    assert app.evaluate("window.__xss") is None
    assert app.locator('img[src="x"]').count() == 0
    app.screenshot(path=str(artifacts_dir / "app-annotate-edit.png"), full_page=True)


def test_behind_a_login_saves_and_reviews_are_stored_under_it(page: Page, app_checkpoint, example_images,
                                                                tmp_path):
    """`--auth`: the Annotate tab shows the login in the (locked) name field, and a submit and a review are
    stored under it whatever had been typed before; a name typed in the page cannot be someone else's."""
    studio = start_studio(app_checkpoint, example_images, tmp_path / "annotations.db", auth=[("rita", "pw-1")])
    try:
        page.set_viewport_size({"width": 1400, "height": 1100})
        page.set_default_timeout(TIMEOUT)
        page.goto(studio.url)
        page.get_by_label("username").fill("rita")
        page.get_by_label("password").fill("pw-1")
        page.get_by_role("button", name="Login").click()
        _caption_then_annotate(page)
        name = page.locator("#annotate-annotator input, #annotate-annotator textarea").first
        expect(name).to_have_value("rita")
        expect(name).to_be_disabled()
        page.locator("#annotate-submit").click()
        expect(page.locator(f"{EDITOR} .pa-status")).to_contain_text("Submitted as correction #")
        page.locator("#annotate-review button").first.click()  # open the accordion
        page.locator("#annotate-accept").click()
        expect(page.locator(f"{EDITOR} .pa-status")).to_contain_text("accepted")
        (head,) = studio.store.list_corrections()  # the chain's head: the review row
        assert [(r["status"], r["annotator"], r["reviewer"]) for r in studio.store.history(head["id"])] == [
            ("submitted", "rita", None), ("accepted", "rita", "rita")]
    finally:
        stop_studio(studio)


def test_leaving_the_page_with_unsaved_edits_asks_first(page: Page, annotate_app):
    """Reloading or closing the page (also gradio's own reload after the server came back) drops the editor's
    document: with unsaved edits the browser asks first (it left at once, the edits lost); once saved, it leaves
    without asking."""
    errors: list[str] = []
    page.on("pageerror", lambda err: errors.append(f"pageerror: {err}"))
    page.set_viewport_size({"width": 1400, "height": 1100})
    page.set_default_timeout(TIMEOUT)
    page.goto(annotate_app.url)
    _caption_then_annotate(page)
    root = page.locator(f"{EDITOR} .pa-root")
    page.locator(f"{EDITOR} .pa-word").first.click()
    text = page.locator(f"{EDITOR} .pa-text")
    text.fill("unsaved")
    text.press("Enter")
    expect(root).to_have_attribute("data-dirty", "1")
    with page.expect_event("dialog") as asked:
        page.close(run_before_unload=True)
    assert asked.value.type == "beforeunload"
    asked.value.dismiss()  # stay on the page
    expect(page.locator(f"{EDITOR} .pa-word").first).to_have_text("unsaved")
    page.locator("#annotate-annotator input, #annotate-annotator textarea").first.fill("leaver")
    page.locator("#annotate-save").click()
    expect(page.locator(f"{EDITOR} .pa-status")).to_contain_text("Saved draft as correction #")
    expect(root).to_have_attribute("data-dirty", "0")
    assert annotate_app.store.list_corrections(annotator="leaver", limit=1)[0]["words"][0] == "unsaved"
    page.on("dialog", lambda dialog: errors.append(f"dialog: {dialog.type}"))
    with page.expect_event("close"):
        page.close(run_before_unload=True)
    assert not errors, errors


def test_edits_the_server_lost_are_saved_from_the_page(app: Page, annotate_app):
    """The editor's document lives in the session's server-side state, which goes when the app restarts or the
    session expires (an hour after the page lost its connection, or evicted by newer sessions) while the page still
    shows it with "unsaved edits". Saving then answered "Open the current output first" (and autosave did nothing):
    the edits were lost. Now the save stores what the page shows, on the correction it had open."""
    _caption_then_annotate(app)
    root = app.locator(f"{EDITOR} .pa-root")
    app.locator("#annotate-annotator input, #annotate-annotator textarea").first.fill("expired")
    app.locator("#annotate-save").click()
    expect(app.locator(f"{EDITOR} .pa-status")).to_contain_text("Saved draft as correction #")
    first = annotate_app.store.list_corrections(annotator="expired", limit=1)[0]
    app.locator(f"{EDITOR} .pa-word").nth(1).click()
    text = app.locator(f"{EDITOR} .pa-text")
    text.fill("kept")
    text.press("Enter")
    expect(root).to_have_attribute("data-dirty", "1")
    shown = [w.text_content() for w in app.locator(f"{EDITOR} .pa-word").all()]
    holder = annotate_app.demo.state_holder  # the session's state expires (as gradio drops it)
    for session_id in list(holder.session_data):
        holder.delete_state(session_id)
    app.locator("#annotate-save").click()
    expect(app.locator(f"{EDITOR} .pa-status")).to_contain_text("restored from the page")
    expect(root).to_have_attribute("data-dirty", "0")
    row = annotate_app.store.list_corrections(annotator="expired", limit=1)[0]
    assert row["words"] == shown and row["words"][1] == "kept"
    assert row["parent_id"] == first["id"]  # on the correction the page had open, not a new chain

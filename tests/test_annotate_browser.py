"""End-to-end: the Annotate tab in headless Chromium (pytest-playwright `page`), served from this process.

Records a trace LN-style with synthesised mouse moves (words advanced with Space), submits it and finds it in the
store; checks undo/redo keys and that a hostile annotator name stays text. Every wait is an `expect`; a page error,
a console error or a dialog fails the test. Screenshots go to test-artifacts/.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
from playwright.sync_api import Page, expect

from pixelllm.ui import annotate_doc
from tests.conftest import start_studio, stop_studio

pytestmark = pytest.mark.browser

TIMEOUT = 20_000  # ms; streamed output on 2 busy cores
EDITOR = "#annotate-editor"


@pytest.fixture(scope="module")
def annotate_app(app_checkpoint, example_images, tmp_path_factory):
    studio = start_studio(app_checkpoint, example_images, tmp_path_factory.mktemp("annotate-store") / "annotations.db")
    yield studio
    stop_studio(studio)


@pytest.fixture
def app(page: Page, annotate_app):
    """The page on the app; fails the test on any page error, console error or dialog (alert/confirm)."""
    errors: list[str] = []
    page.on("pageerror", lambda err: errors.append(f"pageerror: {err}"))
    page.on("console", lambda msg: errors.append(f"console.error: {msg.text}") if msg.type == "error" else None)

    def on_dialog(dialog):
        errors.append(f"dialog: {dialog.message}")
        dialog.dismiss()

    page.on("dialog", on_dialog)
    page.set_viewport_size({"width": 1400, "height": 1100})
    page.set_default_timeout(TIMEOUT)
    page.goto(annotate_app.url)
    yield page
    assert not errors, errors


def _first_word_marked_non_visual(page: Page):
    """An unsaved edit in the open editor (its first word marked non-visual with `n`); returns (root, word chips)."""
    root = page.locator(f"{EDITOR} .pa-root")
    chips = page.locator(f"{EDITOR} .pa-word")
    chips.first.click()
    chips.first.press("n")
    return root, chips


def _caption_then_annotate(page: Page, example: int = 0) -> int:
    """Caption an example in the first tab, switch to Annotate (which opens that output); returns the word count."""
    page.locator("#examples button").nth(example).click()
    expect(page.locator("#caption-viewer .px-stage.px-has-image")).to_have_count(1, timeout=TIMEOUT)
    root = page.locator("#caption-viewer .px-root")
    # After an earlier caption of the same image (kept: the same file keeps its session) "done" still stands: wait
    # for this Generate's own stream to have run, seen by an observer set before the click
    root.evaluate("""(r) => { window.__pxStreamed = false;
        new MutationObserver((records) => { if (records.some((m) => m.oldValue === "streaming"))
            window.__pxStreamed = true; }).observe(r, {attributes: true, attributeOldValue: true,
                                                     attributeFilter: ["data-status"]}); }""")
    page.locator("#generate").click()
    page.wait_for_function("""() => window.__pxStreamed
        && document.querySelector("#caption-viewer .px-root").dataset.status === "done" """, timeout=TIMEOUT)
    n = int(root.get_attribute("data-words"))
    assert n >= 2
    page.get_by_role("tab", name="Annotate").click()
    page.locator("#annotate-open-current").click()
    expect(page.locator(f"{EDITOR} .pa-root")).to_have_attribute("data-words", str(n), timeout=TIMEOUT)
    expect(page.locator(f"{EDITOR} image.pa-base")).to_have_attribute("href", re.compile(r"^data:image/png"))
    expect(page.locator(f"{EDITOR} .pa-status")).to_contain_text("Opened generation")
    return n


def _to_screen(page: Page, x: float, y: float) -> tuple[float, float]:
    return page.evaluate(
        """([sel, x, y]) => { const svg = document.querySelector(sel + ' svg.pa-svg');
             const p = new DOMPoint(x, y).matrixTransform(svg.getScreenCTM()); return [p.x, p.y]; }""",
        [EDITOR, x, y])


def _to_image(page: Page, sx: float, sy: float) -> tuple[float, float]:
    return page.evaluate(
        """([sel, x, y]) => { const svg = document.querySelector(sel + ' svg.pa-svg');
             const p = new DOMPoint(x, y).matrixTransform(svg.getScreenCTM().inverse()); return [p.x, p.y]; }""",
        [EDITOR, sx, sy])


def _distance_to_polyline(p: np.ndarray, line: np.ndarray) -> float:
    best = math.inf
    for a, b in zip(line[:-1], line[1:]):
        ab = b - a
        t = 0.0 if not ab.any() else float(np.clip(np.dot(p - a, ab) / np.dot(ab, ab), 0, 1))
        best = min(best, float(np.linalg.norm(p - (a + t * ab))))
    return best


def test_record_a_trace_with_the_mouse_and_submit_it(app: Page, annotate_app, artifacts_dir):
    n = _caption_then_annotate(app)
    root = app.locator(f"{EDITOR} .pa-root")
    gen_id = annotate_app.store.list_generations(limit=1)[0]["id"]
    app.locator(f"{EDITOR} .pa-advance").select_option("key")  # words advance on Space only
    record = app.locator(f"{EDITOR} .pa-record")
    box = record.bounding_box()
    start = (box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    record.click()
    expect(root).to_have_attribute("data-recording", "1")
    path_start = _to_image(app, *start)  # where the mouse is, in image pixels (the image stays put while recording)
    expect(app.locator(f"{EDITOR} .pa-word.pa-current")).to_have_attribute("data-i", "0")

    w, h = 256, 256  # the example images
    targets = [(30 + (i * 67) % 190, 40 + (i * 41) % 170) for i in range(n)]
    for i, (x, y) in enumerate(targets):
        app.mouse.move(*_to_screen(app, x, y), steps=6)
        if i < n - 1:
            app.keyboard.press("Space")
            expect(app.locator(f"{EDITOR} .pa-word.pa-current")).to_have_attribute("data-i", str(i + 1))
    app.keyboard.press("Space")  # after the last word: the recording ends and goes to the server
    expect(root).to_have_attribute("data-recording", "0")
    expect(root).not_to_have_attribute("data-points", "0", timeout=TIMEOUT)
    expect(app.locator(f"{EDITOR} .pa-status")).to_contain_text("boxes derived from the trace")
    assert app.locator(f"{EDITOR} .pa-trace").count() >= 2  # the gradient preview: a stretch per word colour

    # undo / redo from the keyboard (z / y) take the recording away and bring it back
    points = root.get_attribute("data-points")
    app.keyboard.press("z")
    expect(root).to_have_attribute("data-points", "0")
    app.keyboard.press("y")
    expect(root).to_have_attribute("data-points", points)

    app.locator("#annotate-annotator input, #annotate-annotator textarea").first.fill("mouse tester")
    app.locator("#annotate-submit").click()
    expect(app.locator(f"{EDITOR} .pa-status")).to_contain_text("Submitted as correction #", timeout=TIMEOUT)
    expect(root).to_have_attribute("data-dirty", "0")
    app.screenshot(path=str(artifacts_dir / "app-annotate.png"), full_page=True)

    row = annotate_app.store.list_corrections(status="submitted", limit=1)[0]
    assert row["annotator"] == "mouse tester" and row["generation_id"] == gen_id and len(row["words"]) == n
    timed = row["timed_caption"]
    assert [u["utterance"] for u in timed] == row["words"]
    starts = [u["start_time"] for u in timed]
    assert starts[0] == 0 and starts == sorted(starts)
    assert all(u["end_time"] >= u["start_time"] for u in timed)
    assert all(a["end_time"] == pytest.approx(b["start_time"]) for a, b in zip(timed, timed[1:]))
    pts = [p for segment in row["traces"] for p in segment]
    times = [p["t"] for p in pts]
    assert times == sorted(times) and len(pts) >= n
    assert times[-1] <= timed[-1]["end_time"] + 1e-3
    xy = np.array([[p["x"] * w, p["y"] * h] for p in pts])
    # every recorded point lies on the path the mouse took (start -> target 0 -> target 1 ...), within 2 px
    path = np.array([path_start, *targets], dtype=np.float64)
    assert max(_distance_to_polyline(p, path) for p in xy) <= 2.0
    # and each target was reached while its word was highlighted
    for i, (x, y) in enumerate(targets):
        hits = [p for p, q in zip(pts, xy) if np.hypot(q[0] - x, q[1] - y) <= 2.0
                and timed[i]["start_time"] <= p["t"] <= timed[i]["end_time"]]
        assert hits, f"word {i}: no point at {targets[i]} during [{timed[i]['start_time']}, {timed[i]['end_time']}]"
    # the stored boxes are the LN reader's boxes of that trace
    np.testing.assert_allclose(row["boxes"], annotate_doc.boxes_from_trace(row["traces"], timed, w, h), atol=1e-6)
    rows = app.locator("#annotate-list tr.pl-row")
    expect(rows.first).to_contain_text("mouse tester", timeout=TIMEOUT)


def test_a_recording_that_strays_beside_the_image_keeps_only_the_points_on_it(app: Page, annotate_app, tmp_path):
    """The drawing area is wider than a tall image: a pointer that leaves the picture inside it ends the segment
    (LN: re-entering starts a new one) instead of recording points off the image, which the server refused,
    losing the whole recording. Leaving the tab mid-recording cancels it."""
    from PIL import Image

    tall = tmp_path / "tall.png"
    Image.new("RGB", (100, 400), (40, 90, 200)).save(tall)
    app.locator("#image-input input[type=file]").set_input_files(str(tall))
    expect(app.locator("#caption-viewer .px-status")).to_contain_text("Image 100×400", timeout=TIMEOUT)
    app.locator("#generate").click()
    expect(app.locator("#caption-viewer .px-root")).to_have_attribute("data-status", "done", timeout=TIMEOUT)
    app.get_by_role("tab", name="Annotate").click()
    app.locator("#annotate-open-current").click()
    expect(app.locator(f"{EDITOR} .pa-status")).to_contain_text("Opened generation", timeout=TIMEOUT)
    root = app.locator(f"{EDITOR} .pa-root")
    app.locator(f"{EDITOR} .pa-advance").select_option("key")
    app.mouse.click(*_to_screen(app, 20, 60))  # the focus was on Open current output: a click takes it to the editor
    app.keyboard.press("r")
    expect(root).to_have_attribute("data-recording", "1")
    svg = app.locator(f"{EDITOR} svg.pa-svg").bounding_box()
    assert _to_screen(app, -30, 200)[0] > svg["x"]  # 30 px left of the picture is still on the editor
    app.mouse.move(*_to_screen(app, 60, 120), steps=5)
    app.mouse.move(*_to_screen(app, -30, 200), steps=5)  # off the picture, onto the band beside it
    app.mouse.move(*_to_screen(app, 70, 300), steps=5)  # back onto it
    app.locator(f"{EDITOR} .pa-stop").click()
    expect(root).to_have_attribute("data-recording", "0")
    expect(app.locator(f"{EDITOR} .pa-status")).to_contain_text("boxes derived from the trace", timeout=TIMEOUT)
    app.locator("#annotate-annotator input, #annotate-annotator textarea").first.fill("stray")
    app.locator("#annotate-save").click()
    expect(app.locator(f"{EDITOR} .pa-status")).to_contain_text("Saved draft as correction #", timeout=TIMEOUT)
    row = annotate_app.store.list_corrections(annotator="stray", limit=1)[0]
    assert len(row["traces"]) == 2  # left the picture once: two segments
    assert all(0 <= q["x"] <= 1 and 0 <= q["y"] <= 1 for segment in row["traces"] for q in segment)

    app.locator(f"{EDITOR} .pa-advance").select_option("pace")
    app.mouse.click(*_to_screen(app, 20, 60))  # from the Save draft button back into the editor
    app.keyboard.press("r")
    expect(root).to_have_attribute("data-recording", "1")
    app.get_by_role("tab", name="Caption & trace").click()
    expect(root).to_have_attribute("data-recording", "0")  # the next paced word, on the hidden tab, cancels it
    app.get_by_role("tab", name="Annotate").click()
    expect(app.locator(f"{EDITOR} .pa-status")).to_contain_text("Recording cancelled: the Annotate tab was left")


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


KEPT_PREFIX = "pixelllm-annotate-unsaved:"


def _watched(page: Page, url: str) -> list[str]:
    """Open the app on `page`; returns the list its page errors, console errors and dialogs other than the
    "leave the page?" prompt (accepted: the tests reload over unsaved edits) are appended to."""
    errors: list[str] = []
    page.on("pageerror", lambda err: errors.append(f"pageerror: {err}"))
    # a reload cuts gradio's open connections: it logs their abort (not an error of the page)
    leaving = ("AbortError: signal is aborted", "Connection errored out")
    page.on("console", lambda msg: errors.append(f"console.error: {msg.text}")
            if msg.type == "error" and not any(text in msg.text for text in leaving) else None)

    def on_dialog(dialog):
        if dialog.type == "beforeunload":
            dialog.accept()  # leave: the edits are kept in this browser
        else:
            errors.append(f"dialog: {dialog.message}")
            dialog.dismiss()

    page.on("dialog", on_dialog)
    page.set_viewport_size({"width": 1400, "height": 1100})
    page.set_default_timeout(TIMEOUT)
    page.goto(url)
    return errors


def _kept_count(page: Page) -> int:
    return page.evaluate("(p) => Object.keys(localStorage).filter((k) => k.startsWith(p)).length", KEPT_PREFIX)


def _browse_open(page: Page, kind: str, item_id: int) -> None:
    """Annotate tab → Browse → Corrections / Model outputs → the row of `item_id`."""
    page.get_by_role("tab", name="Annotate").click()
    page.locator("#annotate-show label", has_text="Model outputs" if kind == "generation" else "Corrections").click()
    row = page.locator(f'#annotate-list tr.pl-row[data-kind="{kind}"][data-id="{item_id}"]')
    row.click()
    expect(page.locator(f"{EDITOR} .pa-status")).to_contain_text(f"Opened {kind} #{item_id}", timeout=TIMEOUT)


def test_unsaved_edits_survive_a_reload_and_are_restored_onto_their_output(page: Page, annotate_app):
    """A reload (the only way on after a server restart: gradio sends nothing more from the old page) dropped the
    editor's server-side document with its unsaved edits. Now the page keeps them in the browser: after the reload,
    opening that output again offers them back (another output of the same image is not offered them), Restore puts
    them in the editor as unsaved edits and Save draft stores them; nothing is left kept afterwards."""
    errors = _watched(page, annotate_app.url)
    page.locator("#examples button").first.click()  # an earlier output of the same image: another generation
    expect(page.locator("#caption-viewer .px-stage.px-has-image")).to_have_count(1, timeout=TIMEOUT)
    page.locator("#generate").click()
    expect(page.locator("#caption-viewer .px-root")).to_have_attribute("data-status", "done", timeout=TIMEOUT)
    other = annotate_app.store.list_generations(limit=1)[0]
    n = _caption_then_annotate(page, 0)
    mine = annotate_app.store.list_generations(limit=1)[0]
    assert mine["id"] != other["id"] and mine["image_sha"] == other["image_sha"]
    root = page.locator(f"{EDITOR} .pa-root")
    chips = page.locator(f"{EDITOR} .pa-word")
    chips.nth(1).click()
    text = page.locator(f"{EDITOR} .pa-text")
    text.fill("survivor")
    text.press("Enter")
    expect(chips.nth(1)).to_have_text("survivor")
    chips.first.click()
    chips.first.press("n")  # non-visual
    expect(chips.first).to_have_class(re.compile(r"\bpa-nv\b"))
    expect(root).to_have_attribute("data-dirty", "1")
    expect(root).to_have_attribute("data-kept", "1")
    expect(page.locator(f"{EDITOR} .pa-source")).to_contain_text("unsaved edits (kept in this browser)")
    shown = [c.text_content() for c in chips.all()]

    page.reload()  # the server-side document is gone with the old session
    page.get_by_role("tab", name="Annotate").click()
    status = page.locator(f"{EDITOR} .pa-status")
    expect(status).to_contain_text(f"Unsaved edits are kept in this browser for generation #{mine['id']}")
    kept = page.locator(f"{EDITOR} .pa-kept")
    _browse_open(page, "generation", other["id"])  # the same image, another output: nothing offered
    expect(kept).to_be_hidden()
    expect(root).to_have_attribute("data-dirty", "0")
    assert _kept_count(page) == 1
    _browse_open(page, "generation", mine["id"])
    expect(kept).to_be_visible()
    restore = page.locator(f"{EDITOR} .pa-kept-restore")
    expect(restore).to_have_text(re.compile(r"^Restore unsaved edits from \d\d:\d\d$"))
    expect(chips.nth(1)).not_to_have_text("survivor")  # offered, not restored by itself
    restore.click()
    expect(chips.nth(1)).to_have_text("survivor")
    expect(kept).to_be_hidden()
    expect(root).to_have_attribute("data-dirty", "1")
    expect(status).to_contain_text("Restored the unsaved edits")
    assert [c.text_content() for c in chips.all()] == shown
    expect(chips.first).to_have_class(re.compile(r"\bpa-nv\b"))
    assert _kept_count(page) == 1  # the copy now belongs to this opening

    page.locator("#annotate-annotator input, #annotate-annotator textarea").first.fill("reloader")
    page.locator("#annotate-save").click()
    expect(status).to_contain_text("Saved draft as correction #", timeout=TIMEOUT)
    expect(root).to_have_attribute("data-dirty", "0")
    (row,) = annotate_app.store.list_corrections(annotator="reloader")
    assert row["generation_id"] == mine["id"] and row["parent_id"] is None
    assert row["words"] == shown and len(row["words"]) == n and 0 in row["non_visual"]
    assert _kept_count(page) == 0  # saved: nothing is kept any more
    page.reload()
    page.get_by_role("tab", name="Annotate").click()
    expect(root).to_have_attribute("data-status", "empty")
    expect(status).not_to_contain_text("kept in this browser")
    assert not errors, errors


def test_a_copy_removed_by_another_tab_is_kept_again_while_its_edits_are_unsaved(page: Page, annotate_app):
    """Two tabs of one browser: the second one removes the first one's copy (its pruning of the oldest copies, a
    cleared storage). The first tab's edits are still unsaved and its source line still says "kept in this
    browser", so leaving it would have lost them: its copy is written back."""
    errors = _watched(page, annotate_app.url)
    _caption_then_annotate(page, 1)
    root, chips = _first_word_marked_non_visual(page)  # an unsaved edit
    expect(root).to_have_attribute("data-kept", "1")
    assert _kept_count(page) == 1

    other = page.context.new_page()
    other_errors = _watched(other, annotate_app.url)
    other.evaluate("(p) => Object.keys(localStorage).filter((k) => k.startsWith(p)).forEach((k) => "
                   "localStorage.removeItem(k))", KEPT_PREFIX)
    page.wait_for_function("(p) => Object.keys(localStorage).some((k) => k.startsWith(p))", arg=KEPT_PREFIX,
                           timeout=5000)
    expect(root).to_have_attribute("data-kept", "1")
    expect(page.locator(f"{EDITOR} .pa-source")).to_contain_text("unsaved edits (kept in this browser)")
    other.close()
    assert not errors and not other_errors, (errors, other_errors)


def test_a_tab_still_editing_is_not_offered_its_copy_in_another_tab(page: Page, annotate_app):
    """Two tabs of one browser on the same output: the second one was offered (and could restore or discard) the
    copy of the first one, still open and editing. The editing tab now refreshes a heartbeat on its copy: the other
    tab is not offered it (its empty editor hints it as being edited in another tab); once the editing tab is left,
    its copy is offered there."""
    errors = _watched(page, annotate_app.url)
    _caption_then_annotate(page, 1)
    mine = annotate_app.store.list_generations(limit=1)[0]
    root, chips = _first_word_marked_non_visual(page)  # an unsaved edit
    expect(root).to_have_attribute("data-kept", "1")

    other = page.context.new_page()
    other_errors = _watched(other, annotate_app.url)
    _browse_open(other, "generation", mine["id"])
    kept = other.locator(f"{EDITOR} .pa-kept")
    expect(kept).to_be_hidden()
    assert _kept_count(other) == 1
    beat = page.evaluate("(p) => JSON.parse(localStorage.getItem(Object.keys(localStorage).find((k) => "
                         "k.startsWith(p)))).beat", KEPT_PREFIX)
    assert isinstance(beat, (int, float)) and beat > 0
    other.reload()  # an empty editor hints the copy, as being edited in another tab
    other.get_by_role("tab", name="Annotate").click()
    expect(other.locator(f"{EDITOR} .pa-status")).to_contain_text(
        f"generation #{mine['id']} (a new chain) (", timeout=TIMEOUT)
    expect(other.locator(f"{EDITOR} .pa-status")).to_contain_text("being edited in another tab")
    _browse_open(other, "generation", mine["id"])
    expect(kept).to_be_hidden()

    page.close(run_before_unload=True)  # the leave-page prompt is accepted: the copy is no longer being edited
    expect(kept).to_be_visible()
    other.locator(f"{EDITOR} .pa-kept-restore").click()
    expect(other.locator(f"{EDITOR} .pa-word").first).to_have_class(re.compile(r"\bpa-nv\b"))
    expect(other.locator(f"{EDITOR} .pa-root")).to_have_attribute("data-dirty", "1")
    assert not errors and not other_errors, (errors, other_errors)


def test_a_refused_restore_offers_the_copy_again_and_leaves_later_offers_alone(page: Page, annotate_app):
    """A restore the server refused (here: the editor has unsaved edits of its own) changed nothing and the page
    never heard of it: the offer was gone (the refusal says "undo them before restoring", with no Restore left to
    press) and the page still waited for that restore, so it offered no copy another tab stopped editing (the
    storage event) until the next Restore. The refusal now reaches the page: the offer comes back, and a copy
    another tab leaves is offered again."""
    errors = _watched(page, annotate_app.url)
    _caption_then_annotate(page, 1)
    mine = annotate_app.store.list_generations(limit=1)[0]
    root, chips = _first_word_marked_non_visual(page)  # unsaved edits, kept as a copy ...
    expect(root).to_have_attribute("data-kept", "1")
    page.reload()  # ... that this reload leaves to be offered
    other = page.context.new_page()  # another tab of the browser, editing the same output: a live copy of its own
    other_errors = _watched(other, annotate_app.url)
    _browse_open(other, "generation", mine["id"])
    other_root, other_chips = _first_word_marked_non_visual(other)
    other_chips.nth(1).click()
    other_chips.nth(1).press("n")
    expect(other_root).to_have_attribute("data-kept", "1")

    _browse_open(page, "generation", mine["id"])
    kept = page.locator(f"{EDITOR} .pa-kept")
    expect(kept).to_be_visible()  # the copy this tab left (the other tab's is being edited: not offered)
    chips.nth(1).click()
    chips.nth(1).press("n")  # an edit of this editor's own
    expect(root).to_have_attribute("data-dirty", "1")
    page.locator(f"{EDITOR} .pa-kept-restore").click()
    expect(page.locator(".toast-body")).to_contain_text("unsaved edits of its own")
    expect(kept).to_be_visible()  # offered again
    # pressed again, refused again: offered again (the refusal's editor value was the same as the first one's, so
    # the page never drew it: each refusal now sends a value of its own)
    page.locator(f"{EDITOR} .pa-kept-restore").click()
    expect(kept).to_be_visible()
    page.locator(f"{EDITOR} .pa-undo").click()
    expect(root).to_have_attribute("data-dirty", "0")
    page.locator(f"{EDITOR} .pa-kept-discard").click()  # this copy goes; the other tab's stays
    expect(kept).to_be_hidden()

    other.close(run_before_unload=True)  # the other tab leaves: its copy is no longer being edited
    expect(kept).to_be_visible()  # and is offered here
    page.locator(f"{EDITOR} .pa-kept-restore").click()
    expect(chips.nth(1)).to_have_class(re.compile(r"\bpa-nv\b"))  # the other tab's edits, restored
    expect(root).to_have_attribute("data-dirty", "1")
    assert not errors and not other_errors, (errors, other_errors)


@pytest.mark.parametrize("then", ["submit", "discard"])
def test_a_restored_copy_is_not_offered_again_when_it_could_not_be_kept_again(page: Page, annotate_app, then):
    """A restore makes a kept copy this opening's unsaved edits, kept again under this opening; the copy restored
    went once that keep succeeded. When it failed for another reason than a full storage (setItem throwing some
    other error), the copy was never dropped: submitted (or discarded by opening the output again), its edits were
    offered again on the next open. It now stays only while its edits are unsaved here and goes with them."""
    errors = _watched(page, annotate_app.url)
    _caption_then_annotate(page, 2)
    mine = annotate_app.store.list_generations(limit=1)[0]
    root, chips = _first_word_marked_non_visual(page)  # an unsaved edit
    expect(root).to_have_attribute("data-kept", "1")
    page.reload()
    page.evaluate("""() => { Storage.prototype.setItem = function () {
        throw new DOMException("The operation is insecure.", "SecurityError"); }; }""")
    kept = page.locator(f"{EDITOR} .pa-kept")
    status = page.locator(f"{EDITOR} .pa-status")
    _browse_open(page, "generation", mine["id"])
    expect(kept).to_be_visible()
    page.locator(f"{EDITOR} .pa-kept-restore").click()
    expect(chips.first).to_have_class(re.compile(r"\bpa-nv\b"))
    expect(root).to_have_attribute("data-dirty", "1")
    expect(root).to_have_attribute("data-kept", "0")  # not kept again under this opening
    assert _kept_count(page) == 1  # the copy restored stays while its edits are unsaved here
    if then == "submit":
        page.locator("#annotate-annotator input, #annotate-annotator textarea").first.fill("restorer")
        page.locator("#annotate-submit").click()
        expect(status).to_contain_text("Submitted as correction #", timeout=TIMEOUT)
        assert annotate_app.store.list_corrections(annotator="restorer")[0]["non_visual"] == [0]
    else:  # open the output again, twice: its unsaved edits are discarded
        row = page.locator(f'#annotate-list tr.pl-row[data-kind="generation"][data-id="{mine["id"]}"]')
        row.click()
        expect(page.get_by_text("open again to discard them")).to_be_visible()
        row.click()
        expect(status).to_contain_text(f"Opened generation #{mine['id']}", timeout=TIMEOUT)
        expect(kept).to_be_hidden()
    expect(root).to_have_attribute("data-dirty", "0")
    assert _kept_count(page) == 0

    page.reload()
    page.get_by_role("tab", name="Annotate").click()
    expect(root).to_have_attribute("data-status", "empty")
    expect(status).not_to_contain_text("kept in this browser")
    _browse_open(page, "generation", mine["id"])
    expect(kept).to_be_hidden()
    assert not errors, errors


def test_a_copy_older_than_the_age_limit_is_dropped_not_offered(page: Page, annotate_app):
    """Kept copies had no expiry but the 5-copy cap: edits left unsaved months ago were offered forever. A copy
    whose edits are older than KEEP_MAX_AGE (14 days) is dropped; a younger one is still hinted and offered."""
    errors = _watched(page, annotate_app.url)
    _caption_then_annotate(page, 1)
    mine = annotate_app.store.list_generations(limit=1)[0]
    root, chips = _first_word_marked_non_visual(page)  # an unsaved edit
    expect(root).to_have_attribute("data-kept", "1")
    page.reload()
    age = """([p, days]) => { const key = Object.keys(localStorage).find((k) => k.startsWith(p));
        const c = JSON.parse(localStorage.getItem(key));
        c.saved_at = Date.now() - days * 24 * 3600 * 1000; c.beat = 0;
        localStorage.setItem(key, JSON.stringify(c)); }"""
    status = page.locator(f"{EDITOR} .pa-status")
    kept = page.locator(f"{EDITOR} .pa-kept")
    for days, offered in ((13, True), (15, False)):
        page.evaluate(age, [KEPT_PREFIX, days])
        page.reload()  # nothing unsaved: no prompt
        page.get_by_role("tab", name="Annotate").click()
        expect(root).to_have_attribute("data-status", "empty")
        if offered:
            expect(status).to_contain_text(f"Unsaved edits are kept in this browser for generation #{mine['id']}")
        else:
            expect(status).not_to_contain_text("kept in this browser")
        _browse_open(page, "generation", mine["id"])
        if offered:
            expect(kept).to_be_visible()
        else:
            expect(kept).to_be_hidden()
        assert _kept_count(page) == (1 if offered else 0)
    assert not errors, errors


def _login(page: Page, user: str, password: str) -> None:
    page.get_by_label("username").fill(user)
    page.get_by_label("password").fill(password)
    page.get_by_role("button", name="Login").click()


def test_unsaved_edits_kept_under_a_login_are_offered_to_that_login_only(page: Page, app_checkpoint,
                                                                         example_images, tmp_path):
    """`--auth`, two logins in one browser profile: the copy of unsaved edits kept by one was hinted and offered to
    the other (whose restore and save stored them under its own name). A copy now records its login and is hinted and
    offered to that login only."""
    studio = start_studio(app_checkpoint, example_images, tmp_path / "annotations.db",
                          auth=[("rita", "pw-1"), ("sam", "pw-2")])
    try:
        errors = _watched(page, studio.url)
        logout = studio.url.rstrip("/") + "/logout"
        _login(page, "rita", "pw-1")
        _caption_then_annotate(page)
        mine = studio.store.list_generations(limit=1)[0]
        root, chips = _first_word_marked_non_visual(page)  # an unsaved edit
        expect(root).to_have_attribute("data-kept", "1")

        page.goto(logout)  # the leave-page prompt is accepted
        _login(page, "sam", "pw-2")
        page.get_by_role("tab", name="Annotate").click()
        expect(page.locator("#annotate-annotator input, #annotate-annotator textarea").first).to_have_value("sam")
        status = page.locator(f"{EDITOR} .pa-status")
        _browse_open(page, "generation", mine["id"])
        kept = page.locator(f"{EDITOR} .pa-kept")
        expect(kept).to_be_hidden()
        assert _kept_count(page) == 1  # rita's copy stays hers
        page.reload()
        page.get_by_role("tab", name="Annotate").click()
        expect(page.locator("#annotate-annotator input, #annotate-annotator textarea").first).to_have_value("sam")
        expect(status).not_to_contain_text("kept in this browser")

        page.goto(logout)
        _login(page, "rita", "pw-1")
        page.get_by_role("tab", name="Annotate").click()
        expect(status).to_contain_text(f"Unsaved edits are kept in this browser for generation #{mine['id']}")
        _browse_open(page, "generation", mine["id"])
        expect(kept).to_be_visible()
        page.locator(f"{EDITOR} .pa-kept-restore").click()
        expect(chips.first).to_have_class(re.compile(r"\bpa-nv\b"))
        expect(root).to_have_attribute("data-dirty", "1")
        expect(root).to_have_attribute("data-kept", "1")
        logins = page.evaluate("(p) => Object.keys(localStorage).filter((k) => k.startsWith(p)).map((k) => "
                               "JSON.parse(localStorage.getItem(k)).login)", KEPT_PREFIX)
        assert logins == ["rita"]  # the restored edits are kept under rita again
        assert not errors, errors
    finally:
        stop_studio(studio)


def test_unsaved_edits_survive_a_server_restart(page: Page, app_checkpoint, example_images, tmp_path):
    """The app restarts (same address, same store) while an annotator has unsaved edits on a saved draft: the old
    page cannot save any more (gradio sends nothing from it), so the edits were lost with the reload it needs. Now
    they are kept in the browser: after the reload, opening the correction offers them, and Submit stores them on
    top of that draft."""
    from urllib.parse import urlparse

    store_path = tmp_path / "annotations.db"
    studio = start_studio(app_checkpoint, example_images, store_path)
    try:
        errors = _watched(page, studio.url)
        _caption_then_annotate(page, 1)
        root = page.locator(f"{EDITOR} .pa-root")
        status = page.locator(f"{EDITOR} .pa-status")
        page.locator("#annotate-annotator input, #annotate-annotator textarea").first.fill("restarter")
        page.locator("#annotate-save").click()
        expect(status).to_contain_text("Saved draft as correction #", timeout=TIMEOUT)
        (draft,) = studio.store.list_corrections(annotator="restarter")
        chips = page.locator(f"{EDITOR} .pa-word")
        chips.nth(1).click()
        text = page.locator(f"{EDITOR} .pa-text")
        text.fill("after restart")  # a space: split into two words
        text.press("Enter")
        expect(root).to_have_attribute("data-words", str(len(draft["words"]) + 1))
        expect(root).to_have_attribute("data-kept", "1")
        shown = [c.text_content() for c in chips.all()]

        stop_studio(studio)  # the server goes away with the session's document
        studio = start_studio(app_checkpoint, example_images, store_path, port=urlparse(studio.url).port)
        page.reload()
        page.get_by_role("tab", name="Annotate").click()
        expect(status).to_contain_text(f"Unsaved edits are kept in this browser for correction #{draft['id']}")
        _browse_open(page, "correction", draft["id"])
        page.locator(f"{EDITOR} .pa-kept-restore").click()
        expect(root).to_have_attribute("data-words", str(len(shown)))
        expect(root).to_have_attribute("data-dirty", "1")
        assert [c.text_content() for c in chips.all()] == shown
        page.locator("#annotate-annotator input, #annotate-annotator textarea").first.fill("restarter")
        page.locator("#annotate-submit").click()
        expect(status).to_contain_text("Submitted as correction #", timeout=TIMEOUT)
        head = studio.store.head(draft["id"])
        assert head["parent_id"] == draft["id"] and head["status"] == "submitted" and head["words"] == shown
        assert _kept_count(page) == 0
        assert not errors, errors
    finally:
        stop_studio(studio)


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


def test_without_browser_storage_the_editor_works_and_says_edits_are_not_kept(page: Page, annotate_app):
    """localStorage full or unavailable (private mode): no page error, saving works as before, and the source line
    says the unsaved edits are not kept in this browser."""
    page.add_init_script("""Storage.prototype.setItem = function () {
        throw new DOMException("The quota has been exceeded.", "QuotaExceededError"); };""")
    errors = _watched(page, annotate_app.url)
    _caption_then_annotate(page, 2)
    root, chips = _first_word_marked_non_visual(page)  # an unsaved edit
    expect(root).to_have_attribute("data-dirty", "1")
    expect(root).to_have_attribute("data-kept", "0")
    expect(page.locator(f"{EDITOR} .pa-source")).to_contain_text("NOT kept in this browser")
    page.locator("#annotate-annotator input, #annotate-annotator textarea").first.fill("no storage")
    page.locator("#annotate-save").click()
    expect(page.locator(f"{EDITOR} .pa-status")).to_contain_text("Saved draft as correction #", timeout=TIMEOUT)
    expect(root).to_have_attribute("data-kept", "")
    assert annotate_app.store.list_corrections(annotator="no storage")[0]["non_visual"] == [0]
    assert not errors, errors


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

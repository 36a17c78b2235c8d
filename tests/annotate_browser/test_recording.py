"""End-to-end: recording a trace in the Annotate tab (headless Chromium, marker `browser`).

Records a trace LN-style with synthesised mouse moves (words advanced with Space), submits it and finds it in
the store, with undo/redo keys; a recording that strays beside the image keeps only the points on it.
Screenshots go to test-artifacts/.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from playwright.sync_api import Page, expect

from pixelllm.ui import annotate_doc
from tests.annotate_browser.conftest import (
    EDITOR,
    TIMEOUT,
    _annotate_then_open_current,
    _caption_then_annotate,
    _to_screen,
)

pytestmark = pytest.mark.browser


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
    _annotate_then_open_current(app)
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

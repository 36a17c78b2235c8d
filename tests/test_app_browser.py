"""End-to-end: the studio in headless Chromium (pytest-playwright `page`), served from this process.

The app serves `app_checkpoint` (conftest: the embedded model when present, else the small random one). Every
wait is an `expect` with a timeout (no sleeps); a page error or console error fails the test. Screenshots of each
tab go to test-artifacts/.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
from playwright.sync_api import Page, expect

from pixelllm.ui import workspace as ws
from tests.conftest import start_studio, stop_studio
from tests.helpers import set_slider

pytestmark = pytest.mark.browser

TIMEOUT = 20_000  # ms; streamed output on 2 busy cores


@pytest.fixture(scope="module")
def studio_app(app_checkpoint, example_images, tmp_path_factory):
    studio = start_studio(app_checkpoint, example_images, tmp_path_factory.mktemp("app-store") / "annotations.db")
    yield studio
    stop_studio(studio)


@pytest.fixture
def app(page: Page, studio_app):
    """The page on the app; fails the test on any page error or console error."""
    errors: list[str] = []
    page.on("pageerror", lambda err: errors.append(f"pageerror: {err}"))
    page.on("console", lambda msg: errors.append(f"console.error: {msg.text}") if msg.type == "error" else None)
    page.set_viewport_size({"width": 1400, "height": 1000})
    page.set_default_timeout(TIMEOUT)
    page.goto(studio_app.url)
    yield page
    assert not errors, errors


def _load_example(page: Page, index: int = 0) -> None:
    page.locator("#examples button").nth(index).click()
    expect(page.locator("#caption-viewer .px-stage.px-has-image")).to_have_count(1, timeout=TIMEOUT)


def _open_tab(page: Page, name: str, viewer: str) -> None:
    """Switch tab; its viewer (mounted only now) must show the image loaded before."""
    page.get_by_role("tab", name=name).click()
    expect(page.locator(f"{viewer} .px-stage.px-has-image")).to_have_count(1, timeout=TIMEOUT)
    expect(page.locator(f"{viewer} image.px-base")).to_have_attribute("href", re.compile(r"^data:image/png;base64,"))


def _click_image(page: Page, viewer: str, x: float, y: float) -> None:
    """Click image pixel (x, y) of a viewer (through the SVG's own screen transform)."""
    sx, sy = _screen(page, viewer, x, y)
    page.mouse.click(sx, sy)


def _screen(page: Page, viewer: str, x: float, y: float) -> tuple[float, float]:
    return page.evaluate(
        """([sel, x, y]) => { const svg = document.querySelector(sel + ' svg.px-svg');
             const p = new DOMPoint(x, y).matrixTransform(svg.getScreenCTM()); return [p.x, p.y]; }""",
        [viewer, x, y])


def _watch_word_counts(page: Page, viewer: str) -> None:
    page.evaluate(
        """(sel) => { const root = document.querySelector(sel + ' .px-root'); window.__wordCounts = [];
             new MutationObserver(() => window.__wordCounts.push(Number(root.dataset.words)))
               .observe(root, {attributes: true, attributeFilter: ['data-words']}); }""", viewer)


def _slow_words(monkeypatch, predictor, seconds: float) -> None:
    """The served predictor streams each word `seconds` after the last (for this test only)."""
    real = predictor.stream_caption

    def slowed(*args, **kwargs):
        for word in real(*args, **kwargs):
            time.sleep(seconds)
            yield word

    monkeypatch.setattr(predictor, "stream_caption", slowed)


def _last_generation(store, task: str = "caption") -> dict:
    return store.list_generations(task=task, limit=1)[0]


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

def test_a_new_image_while_a_caption_streams_becomes_the_working_image(app: Page, studio_app, monkeypatch):
    """Picking another image while a caption still streams: the stream's later updates carried the old session
    back into the page's state, so Referring (and Dense, Annotate) worked on the previous image while the new
    one was shown. The new image stops the stream (`Session.replaced`)."""
    # words 0.25 s apart: on a busy machine the caption ended before the next image came (a caption is logged as
    # abandoned once words were shown: the next image is picked after two)
    _slow_words(monkeypatch, studio_app.predictor, 0.25)
    _load_example(app, 0)
    root = app.locator("#caption-viewer .px-root")
    app.locator("#generate").click()
    expect(root).to_have_attribute("data-status", "streaming", timeout=TIMEOUT)
    app.wait_for_function("Number(document.querySelector('#caption-viewer .px-root').dataset.words) >= 2")

    def shown(viewer: str) -> str:  # the end of the picture's data URL: enough to tell two images apart
        return app.locator(f"{viewer} image.px-base").get_attribute("href")[-48:]

    old = shown("#caption-viewer")
    before = _last_generation(studio_app.store)["id"] if studio_app.store.list_generations(limit=1) else 0
    app.locator("#examples button").nth(1).click()
    # the old stream is over once it has logged the words it showed, flagged as abandoned for another image
    deadline = time.monotonic() + TIMEOUT / 1000
    while time.monotonic() < deadline:
        rows = [g for g in studio_app.store.list_generations(task="caption", limit=5) if g["id"] > before]
        if any(g["extra"].get("abandoned") for g in rows):
            break
        app.wait_for_timeout(100)
    else:
        pytest.fail("the stream on the previous image was not stopped and logged as abandoned")
    app.wait_for_timeout(500)  # frames sent before that log line have reached the page
    new = shown("#caption-viewer")
    assert new != old, "the caption viewer went back to the previous image"
    _open_tab(app, "Referring", "#refer-viewer")
    app.locator("#refer-text textarea").fill("the red circle")
    app.locator("#refer-run").click()
    expect(app.locator("#refer-viewer .px-mask")).to_have_count(1, timeout=TIMEOUT)
    assert shown("#refer-viewer") == new  # Referring worked on the image shown
    app.get_by_role("tab", name="Caption & trace").click()
    assert shown("#caption-viewer") == new


@pytest.mark.parametrize("picked", ["uploaded", "example"])
def test_generate_pressed_while_the_first_image_loads_captions_that_image(app: Page, studio_app, example_images,
                                                                         monkeypatch, picked):
    """Generate pressed right after the page's first image was uploaded (or picked from the examples), while that
    image still loaded (its change event running), answered "Upload, paste or pick an example image first": the
    page had no session yet. The caption now meets that load (workspace.caption_session) and captions the image
    shown, which is loaded once."""
    import hashlib

    from pixelllm import image as imaging
    from pixelllm.ui import render

    decode = ws.load_user_image
    loads: list[str] = []

    def slow_load(source):  # an image that takes a second to load (a photo on a busy machine)
        loads.append(source)
        time.sleep(1.0)
        return decode(source)

    monkeypatch.setattr(ws, "load_user_image", slow_load)
    image = example_images[3]
    if picked == "uploaded":
        app.locator("#image-input input[type=file]").set_input_files(str(image))
    else:
        app.locator("#examples button").nth(3).click()
    expect(app.locator("#image-input img")).to_be_visible()  # the page holds the file; its load runs
    app.locator("#generate").click()
    root = app.locator("#caption-viewer .px-root")
    expect(root).to_have_attribute("data-status", "done", timeout=TIMEOUT)
    expect(app.locator(".toast-body")).to_have_count(0)  # no "Upload ... first"
    row = _last_generation(studio_app.store)
    pixels = render.png_bytes(imaging.load_image(image.read_bytes()))
    assert row["image_sha"] == hashlib.sha256(pixels).hexdigest()  # the caption is the uploaded image's
    assert len(loads) == 1, loads  # the caption and the image's change event met on one load
    expect(app.locator("#caption-text textarea")).to_have_value(" ".join(row["words"]))
    _open_tab(app, "Referring", "#refer-viewer")  # the image reached the other tabs too
    app.get_by_role("tab", name="Caption & trace").click()
    _click_image(app, "#caption-viewer", 150, 190)  # and the page works on it: a point is added to its session
    expect(app.locator("#caption-viewer .px-point.px-pos")).to_have_count(1)


def test_a_caption_that_runs_before_the_images_change_event_loads_the_image_and_keeps_its_view(
        app: Page, studio_app, example_images, monkeypatch):
    """Gradio's queue starts events of different concurrency groups in any order, and the image's change event may
    wait behind other visitors' uploads: Generate can run first. It loads the image itself; the change event, when
    it comes, sends the other tabs their views and leaves the caption's view, text and downloads alone."""
    load, decode = ws.load_image, ws.load_user_image
    before = len(studio_app.store.list_generations(limit=1000))
    loads: list[str] = []

    def after_the_caption(*args):  # the image's change event runs once the caption is logged
        deadline = time.monotonic() + TIMEOUT / 1000
        while len(studio_app.store.list_generations(limit=1000)) == before and time.monotonic() < deadline:
            time.sleep(0.05)
        return load(*args)

    def counted(source):
        loads.append(source)
        return decode(source)

    monkeypatch.setattr(ws, "load_image", after_the_caption)
    monkeypatch.setattr(ws, "load_user_image", counted)
    app.locator("#examples button").nth(2).click()
    expect(app.locator("#image-input img")).to_be_visible()
    app.locator("#generate").click()
    root = app.locator("#caption-viewer .px-root")
    expect(root).to_have_attribute("data-status", "done", timeout=TIMEOUT)
    row = _last_generation(studio_app.store)
    _open_tab(app, "Referring", "#refer-viewer")  # the change event's views came
    app.get_by_role("tab", name="Caption & trace").click()
    expect(root).to_have_attribute("data-status", "done")  # and left the caption as it was
    expect(root).to_have_attribute("data-words", str(len(row["words"])))
    expect(app.locator("#caption-text textarea")).to_have_value(" ".join(row["words"]))
    expect(app.locator("#caption-files a[href$='/caption.json']")).to_have_count(1)
    assert len(loads) == 1, loads
    expect(app.locator(".toast-body")).to_have_count(0)


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



def _sha(path: Path) -> str:
    import hashlib

    from pixelllm import image as imaging
    from pixelllm.ui import render

    return hashlib.sha256(render.png_bytes(imaging.load_image(path.read_bytes()))).hexdigest()


def test_a_queued_generate_does_not_bring_back_the_image_the_page_left(app: Page, studio_app, example_images,
                                                                      monkeypatch):
    """Generate pressed on image A waited in the queue (the shared model slots busy: here this page's own Locate and
    Dense) while the user picked image B, whose change event loaded it. The caption then ran on B's session with
    A's file, and caption_session loaded A over B: the image input, Referring and Dense showed B, the session A.
    It captions B, the image the page shows (as before caption_session)."""
    import gradio as gr

    from pixelllm.ui import callbacks as cb

    def busy(*args, **kwargs):  # a model call that holds its slot for a while
        time.sleep(4.0)
        return (gr.skip(),) * 3

    monkeypatch.setattr(cb, "refer", busy)
    monkeypatch.setattr(cb, "dense", busy)
    _load_example(app, 0)
    app.get_by_role("tab", name="Referring").click()
    app.locator("#refer-run").click()
    app.get_by_role("tab", name="Dense captions").click()
    app.locator("#dense-run").click()
    app.get_by_role("tab", name="Caption & trace").click()
    app.locator("#generate").click()  # queued: both model slots are busy
    app.locator("#examples button").nth(1).click()  # the user moves on to image B, loaded at once
    expect(app.locator("#caption-viewer .px-root")).to_have_attribute("data-status", "done", timeout=TIMEOUT)
    assert _last_generation(studio_app.store)["image_sha"] == _sha(example_images[1])


def test_generate_pressed_right_after_another_image_captions_that_image(app: Page, studio_app, example_images,
                                                                       monkeypatch):
    """Generate pressed while a second image loads (the views still show the first): the caption loads the second
    (the page sends the key of the image its views show, and that is still the session's)."""
    _load_example(app, 0)
    decode, loads = ws.load_user_image, []

    def slow_load(source):
        loads.append(source)
        time.sleep(1.0)
        return decode(source)

    monkeypatch.setattr(ws, "load_user_image", slow_load)
    app.locator("#examples button").nth(1).click()
    app.locator("#generate").click()
    expect(app.locator("#caption-viewer .px-root")).to_have_attribute("data-status", "done", timeout=TIMEOUT)
    assert _last_generation(studio_app.store)["image_sha"] == _sha(example_images[1])
    assert len(loads) == 1, loads
    expect(app.locator(".toast-body")).to_have_count(0)

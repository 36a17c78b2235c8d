"""Fixtures and helpers of the Annotate tab's browser tests (this folder only; headless Chromium through
pytest-playwright's `page`, the app served from this process): `annotate_app` (a Studio with a fresh annotation store,
one per test module) and `app` (the page on it, failing the test on any page error, console error or dialog). The
test modules import the plain helpers from here: `_caption_then_annotate` (caption an example, open it in the
editor), `_annotate_then_open_current` (open the output already in the first tab),
`_first_word_marked_non_visual`, `_to_screen`, and for the copies of unsaved edits kept in the browser
`KEPT_PREFIX`, `_watched`, `_kept_count` and `_browse_open`. Every wait is an `expect`."""

from __future__ import annotations

import re

import pytest
from playwright.sync_api import Locator, Page, expect

from tests.conftest import start_studio, stop_studio

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
    """An unsaved edit in the open editor (its first word marked non-visual with `n`); returns (root, word chips)
    once the server's answer to that edit is drawn (the next revision, dirty). Waited for with TIMEOUT: the edit is a
    round trip through the queue, which expect's default 5 s does not always cover on 2 busy cores; and an edit sent
    before it is drawn would go with the old revision and be refused as stale."""
    root = page.locator(f"{EDITOR} .pa-root")
    chips = page.locator(f"{EDITOR} .pa-word")
    rev = int(root.get_attribute("data-rev"))
    chips.first.click()
    chips.first.press("n")
    expect(root).to_have_attribute("data-rev", str(rev + 1), timeout=TIMEOUT)
    expect(root).to_have_attribute("data-dirty", "1")
    return root, chips


def _caption(page: Page, example: int = 0) -> Locator:
    """Caption an example in the first tab (a generation logged: the session's last output); returns the caption
    view's root."""
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
    return root


def _caption_then_annotate(page: Page, example: int = 0) -> int:
    """Caption an example in the first tab, switch to Annotate (which opens that output); returns the word count."""
    root = _caption(page, example)
    n = int(root.get_attribute("data-words"))
    assert n >= 2
    _annotate_then_open_current(page)
    expect(page.locator(f"{EDITOR} .pa-root")).to_have_attribute("data-words", str(n))
    expect(page.locator(f"{EDITOR} image.pa-base")).to_have_attribute("href", re.compile(r"^data:image/png"))
    return n


def _annotate_then_open_current(page: Page) -> None:
    """Switch to Annotate with an empty editor, then press "Open current output"; returns once that press's own
    open is drawn. The tab switch already opens the session's last output (its answer says "Opened generation …"
    too), so the press opens it a second time: waiting for the status text alone returned on the first open, and the
    second one (a revision later) landed during the test's next steps under load, where it refused an edit sent
    meanwhile as stale (data-kept stayed "") or showed up as an edit (data-rev one higher than read)."""
    root = page.locator(f"{EDITOR} .pa-root")
    page.get_by_role("tab", name="Annotate").click()
    expect(page.locator(f"{EDITOR} .pa-status")).to_contain_text("Opened generation", timeout=TIMEOUT)  # the tab's
    rev = int(root.get_attribute("data-rev"))
    page.locator("#annotate-open-current").click()
    expect(root).to_have_attribute("data-rev", str(rev + 1), timeout=TIMEOUT)  # the button's: one revision later
    expect(page.locator(f"{EDITOR} .pa-status")).to_contain_text("Opened generation")


def _to_screen(page: Page, x: float, y: float) -> tuple[float, float]:
    return page.evaluate(
        """([sel, x, y]) => { const svg = document.querySelector(sel + ' svg.pa-svg');
             const p = new DOMPoint(x, y).matrixTransform(svg.getScreenCTM()); return [p.x, p.y]; }""",
        [EDITOR, x, y])


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

"""The Annotate tab's own events meeting the user's (headless Chromium, marker `browser`): selecting the tab lists the
browse view and opens the current output, and the user may change the view or open something before either answer
lands. One server call is held back here (the rest of the app runs as usual) so that the late answer is the tab's;
what the page shows at the end must follow what the user did last, whatever order the answers come in."""

from __future__ import annotations

import threading

import pytest
from playwright.sync_api import Page, expect

from pixelllm.ui import annotate as an
from pixelllm.ui import annotate_panels as panels
from tests.annotate_browser.conftest import EDITOR, TIMEOUT, _caption

pytestmark = pytest.mark.browser

HELD = 4.0  # s: the longest a held call waits for the user's call it lets pass first (fixed code: never comes)


def _log_texts(page: Page, container: str, text: str, name: str) -> None:
    """Record in window[name] every text `text` (a selector inside `container`) shows, in order (a redraw of the
    container's template replaces its nodes, hence an observer on the container)."""
    page.locator(f"{container} {text}").wait_for(state="attached")
    page.evaluate("""([container, text, name]) => { window[name] = [];
        const box = document.querySelector(container);
        const note = () => { const el = box.querySelector(text); const t = el ? el.textContent : "";
                             const log = window[name]; if (t && log[log.length - 1] !== t) log.push(t); };
        new MutationObserver(note).observe(box, {subtree: true, childList: true, characterData: true}); }""",
                  [container, text, name])


def test_the_browse_list_follows_the_radio_when_the_tabs_list_answers_after_it(app: Page, annotate_app,
                                                                                monkeypatch):
    """Selecting the tab lists the browse view (Corrections); the radio is set to "Model outputs" before that answer
    lands. The tab's list was its own handler, outside the radio's event: it answered after the radio's list, and the
    page showed corrections under "Model outputs" (a browser test's `_browse_open` timed out waiting for a
    Model-outputs row). Now the tab's list and the filters' are one event: the radio's runs after the tab's, with the
    radio as it stands, so the last list shown is the model outputs whatever order the server would answer in."""
    _caption(app, 0)
    calls: list[str] = []
    started, second_done = threading.Event(), threading.Event()
    real = panels.list_items

    def held_list(studio, show, *rest):
        n = len(calls) + 1
        calls.append(show)
        if n == 1:  # the tab's list: held until the radio's list is done (or HELD s, when it waits for this one)
            started.set()
            second_done.wait(HELD)
        out = real(studio, show, *rest)
        if n == 2:
            second_done.set()
        return {**out, "message": f"answer {n}: {out['kind']}"}  # every answer drawn anew, and known by its number

    monkeypatch.setattr(panels, "list_items", held_list)
    app.get_by_role("tab", name="Annotate").click()
    assert started.wait(TIMEOUT / 1000), "the tab listed nothing"
    _log_texts(app, "#annotate-list", ".pl-msg", "__listed")  # the panel is drawn once its tab is selected
    app.locator("#annotate-show label", has_text="Model outputs").click()
    app.wait_for_function("() => window.__listed.filter((t) => t.startsWith('answer ')).length >= 2",
                          timeout=TIMEOUT)
    expect(app.locator("#annotate-show input[value='Model outputs']")).to_be_checked()
    assert calls[0] == "Corrections" and calls[1:] == ["Model outputs"], calls
    listed = [t for t in app.evaluate("() => window.__listed") if t.startswith("answer ")]
    assert listed[-1].endswith(": generation"), f"the list shown last is not the model outputs: {listed}"
    assert app.locator("#annotate-list tr.pl-row[data-kind='generation']").count() >= 1
    assert app.locator("#annotate-list tr.pl-row[data-kind='correction']").count() == 0


def test_a_row_opened_while_the_tabs_auto_open_runs_stays_open(app: Page, annotate_app, monkeypatch):
    """Selecting the tab opens the current output (generation B); before that answer lands the user opens an earlier
    output (generation A) from the browse list. The tab's open was outside the editor's concurrency group and had read
    the empty editor: it landed after the row's open and replaced A by B (so also after "Open current output" or an
    edit, which it undid). Now it is one of the editor's events: the row's open runs after it, and A stays open."""
    _caption(app, 1)
    first = annotate_app.store.list_generations(limit=1)[0]["id"]  # generation A
    _caption(app, 0)
    last = annotate_app.store.list_generations(limit=1)[0]["id"]  # generation B, the session's last output
    assert first != last
    started, row_done = threading.Event(), threading.Event()
    real_current, real_item = an.open_current, an.open_item
    held = []

    def held_current(*args, **kwargs):
        if not held:  # the tab's auto-open: held until the row's open is done (or HELD s, when it waits for this one)
            held.append(1)
            started.set()
            row_done.wait(HELD)
        return real_current(*args, **kwargs)

    def item(*args, **kwargs):
        try:
            return real_item(*args, **kwargs)
        finally:
            row_done.set()

    monkeypatch.setattr(an, "open_current", held_current)
    monkeypatch.setattr(an, "open_item", item)
    app.get_by_role("tab", name="Annotate").click()
    assert started.wait(TIMEOUT / 1000), "the tab did not open the current output"
    _log_texts(app, EDITOR, ".pa-status", "__opened")  # the panel is drawn once its tab is selected
    app.locator("#annotate-show label", has_text="Model outputs").click()
    app.locator(f'#annotate-list tr.pl-row[data-kind="generation"][data-id="{first}"]').click()
    app.wait_for_function(
        "([a, b]) => [a, b].every((w) => window.__opened.some((t) => t.startsWith(w)))",
        arg=[f"Opened generation #{first} ", f"Opened generation #{last}:"], timeout=TIMEOUT)
    opened = [t for t in app.evaluate("() => window.__opened") if t.startswith("Opened generation")]
    assert opened[-1].startswith(f"Opened generation #{first} "), f"the row's open was replaced: {opened}"
    expect(app.locator(f"{EDITOR} .pa-status")).to_contain_text(f"Opened generation #{first} ")

"""End-to-end: kept copies of unsaved edits across logins and server restarts (headless Chromium, marker
`browser`), each on a Studio of its own: a copy is offered to the login that kept it only, and survives a
restart of the app.
"""

from __future__ import annotations

import re

import pytest
from playwright.sync_api import Page, expect

from tests.annotate_browser.conftest import (
    EDITOR,
    KEPT_PREFIX,
    TIMEOUT,
    _browse_open,
    _caption_then_annotate,
    _first_word_marked_non_visual,
    _kept_count,
    _watched,
)
from tests.conftest import start_studio, stop_studio

pytestmark = pytest.mark.browser


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

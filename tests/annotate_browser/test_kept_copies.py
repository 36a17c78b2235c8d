"""End-to-end: unsaved edits kept in the browser and restored (headless Chromium, marker `browser`).

A reload keeps them and Restore brings them back onto their output; copies across tabs of one browser
(removed, still being edited, a refused restore); a restored copy that could not be kept again; the age
limit; no browser storage at all.
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

pytestmark = pytest.mark.browser


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

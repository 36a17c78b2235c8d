"""The Annotate tab: components and wiring only (the logic is in annotate.py and annotate_panels.py, the editor
in static/annotate.*).

`build_annotate_tab(studio, session)` is called from layout.py's Annotate slot, inside the `gr.Tabs` block; it
adds the tab and the hidden `/save_correction` API endpoint. (No `from __future__ import annotations`: Gradio
inspects the `gr.EventData` hints.)
"""

import functools
import json
import secrets
import threading

import gradio as gr

from pixelllm.ui import annotate as an
from pixelllm.ui import annotate_doc, render
from pixelllm.ui import annotate_panels as panels
from pixelllm.ui import workspace as ws

LIST_TEMPLATE = ('<div class="pl-root"><div class="pl-msg"></div><table class="pl-table"><thead><tr></tr></thead>'
                 "<tbody></tbody></table></div>")
EXPORT_STATUSES = ("submitted", "accepted", "rejected", "draft")


@functools.lru_cache(maxsize=1)
def _assets() -> tuple[str, str, str]:
    static = an.static_dir()
    css = (static / "annotate.css").read_text()
    editor_js = f"const PIXELLLM_ANNOTATE_CSS = {json.dumps(css)};\n" + "\n".join(  # one script, in this order
        (static / name).read_text() for name in ("annotate.js", "annotate_input.js", "annotate_unsaved.js"))
    return (static / "annotate.html").read_text(), editor_js, (static / "annotate_list.js").read_text()


def build_annotate_tab(studio: ws.Studio, session: gr.State) -> gr.Tab:
    """The Annotate tab (correct the last output or a stored one, re-record its trace, save, review, export,
    compare adapters) and the `/save_correction` endpoint. `session` is the studio's per-user `gr.State`
    holding a workspace.Session (its `last` output is what "Open current output" opens)."""
    from pixelllm.ui.layout import viewer  # the caption viewer, reused for the adapter comparison

    template, editor_js, list_js = _assets()
    compare_lock = threading.Lock()  # adapter switches for comparisons, one at a time
    private = {"api_visibility": "private"}
    edits = {**private, "concurrency_id": "annotate-edit", "concurrency_limit": 1, "trigger_mode": "multiple",
             "show_progress": "hidden"}

    with gr.Tab("Annotate", id="annotate", elem_id="tab-annotate") as tab:
        state = gr.State(None)  # created inside the tab: a bare child of gr.Tabs would show as a second tab
        if studio.store_notice:
            gr.Markdown(studio.store_notice, elem_id="annotate-store-notice")
        with gr.Row(equal_height=False):
            with gr.Column(scale=3, min_width=360):
                editor = gr.HTML(value=an.editor_value(None), html_template=template, js_on_load=editor_js,
                                 apply_default_css=False, elem_id="annotate-editor", elem_classes=["pa-editor"])
            with gr.Column(scale=2, min_width=280):
                open_btn = gr.Button("Open current output", variant="secondary", elem_id="annotate-open-current")
                annotator = gr.Textbox(label="Your name (annotator / reviewer) — required to save",
                                       max_length=annotate_doc.MAX_ANNOTATOR_CHARS, elem_id="annotate-annotator",
                                       placeholder="e.g. ana")
                comment = gr.Textbox(label="Comment (optional; stored with a save or a review)", lines=2,
                                     max_length=an.MAX_COMMENT_CHARS, elem_id="annotate-comment")
                with gr.Row():
                    save_btn = gr.Button("Save draft (s)", elem_id="annotate-save")
                    submit_btn = gr.Button("Submit", variant="primary", elem_id="annotate-submit")
                with gr.Accordion("Review the open correction", open=False, elem_id="annotate-review"):
                    with gr.Row():
                        accept_btn = gr.Button("Accept", elem_id="annotate-accept")
                        reject_btn = gr.Button("Reject", variant="stop", elem_id="annotate-reject")
                with gr.Accordion("Browse outputs and corrections", open=True, elem_id="annotate-browse"):
                    show = gr.Radio(["Corrections", "Model outputs"], value="Corrections", show_label=False,
                                    elem_id="annotate-show")
                    with gr.Row():
                        sha_prefix = gr.Textbox(label="Image id (sha256 prefix)", elem_id="annotate-sha",
                                                max_length=64)
                        who = gr.Textbox(label="Annotator", elem_id="annotate-who",
                                         max_length=annotate_doc.MAX_ANNOTATOR_CHARS)
                    with gr.Row():
                        status = gr.Dropdown(list(panels.LIST_STATUSES), value="any", label="Status",
                                             elem_id="annotate-status")
                        search = gr.Textbox(label="Text contains", elem_id="annotate-search", max_length=200)
                    refresh_btn = gr.Button("Search", size="sm", elem_id="annotate-refresh")
                    items = gr.HTML(value={"kind": "correction", "rows": [], "message": ""},
                                    html_template=LIST_TEMPLATE, js_on_load=list_js, apply_default_css=False,
                                    elem_id="annotate-list")
                with gr.Accordion("Export (LN JSONL + images, zipped)", open=False, elem_id="annotate-export"):
                    statuses = gr.CheckboxGroup(list(EXPORT_STATUSES), value=["submitted", "accepted"],
                                                label="Statuses", elem_id="annotate-export-statuses")
                    export_btn = gr.Button("Export", elem_id="annotate-export-run")
                    export_note = gr.Textbox(label="Export summary", interactive=False, elem_id="annotate-export-note")
                    export_file = gr.File(label="Download", interactive=False, elem_id="annotate-export-file")
        with gr.Accordion("Compare adapters (base model vs the active LoRA adapter, current image)", open=False,
                          elem_id="annotate-compare"):
            compare_btn = gr.Button("Compare adapters", elem_id="annotate-compare-run")
            compare_note = gr.Textbox(label="Comparison", interactive=False, elem_id="annotate-compare-note")
            with gr.Row(equal_height=False):
                empty = render.viewer_value(None, mode="caption")
                base_view = viewer(empty, "annotate-compare-base")
                tuned_view = viewer(empty, "annotate-compare-adapter")
        with gr.Column(visible=False):
            api_in = gr.JSON(label="correction")
            api_out = gr.JSON(label="saved")
            api_btn = gr.Button()

    # ---------------------------------------------------------------------------------------- handlers
    filters = [show, sha_prefix, who, status, search]

    def refresh(kind, prefix, name, wanted, text):
        return panels.list_items(studio, kind, prefix, name, wanted, text)

    # The tab's own work is split: the list joins the filters' list event (one event: the page runs it one at a time,
    # a trigger while it runs deferred and then sent with the filters as they stand), and opening the current output
    # joins the editor's events (their concurrency group: one at a time, each reading the state the one before left).
    # As one handler, outside both, the tab's answer could land after the radio's (its list of corrections under
    # "Model outputs") and its open after a row's or the button's open or an edit (the editor replaced by what the
    # tab read before them).
    def on_tab(sess, st, request: gr.Request):
        login = getattr(request, "username", None)
        name_field = gr.update(value=login, interactive=False, label="Signed in: saves and reviews are stored "
                               "under your login") if login else gr.skip()
        if (st is None or st.doc is None) and isinstance(sess, ws.Session) and sess.last and sess.image:
            try:
                st, view = an.with_login(an.open_current(studio, sess, st), login)
                return st, view, name_field
            except gr.Error:
                pass
        if login and (st is None or st.doc is None):  # an empty editor hints the unsaved edits kept for this login
            return gr.skip(), an.with_login((st, an.editor_value(st)), login)[1], name_field
        return gr.skip(), gr.skip(), name_field

    # every editor value carries the login (the page keeps its unsaved edits under it, offers only its copies)
    def signed(out, request):
        return an.with_login(out, getattr(request, "username", None))

    def on_open_current(sess, st, request: gr.Request):
        return signed(an.open_current(studio, sess, st), request)

    def on_open_item(st, evt: gr.EventData, request: gr.Request):
        return signed(an.open_item(studio, st, evt._data), request)

    def on_edit(st, evt: gr.EventData, request: gr.Request):
        return signed(an.edit_event(st, evt._data), request)

    def on_history(st, evt: gr.EventData, request: gr.Request):
        return signed(an.history_event(st, evt._data), request)

    def on_restore(st, evt: gr.EventData, request: gr.Request):  # unsaved edits the page kept (a reload, a restart)
        login = getattr(request, "username", None)
        return signed(an.restore_kept(studio, st, evt._data, login), request)

    # A refused restore (its message is the error's toast) changed nothing, so the page heard nothing and kept
    # waiting for it (static/annotate_unsaved.js `restoring`): the editor's value, as it stands, now says it was
    # refused.
    # Without a document (the server lost it) the page keeps what it shows, which a save restores from.
    def on_restore_refused(st, request: gr.Request):
        if st is None or st.doc is None:
            return gr.skip()
        # a new token each time: gr.HTML redraws (and annotate_unsaved.js hears) only a value whose JSON changed
        return signed((st, an.editor_value(st, restore_refused=secrets.token_hex(4))), request)[1]

    def named(name, request):  # behind --auth the login, else the typed name
        return an.signed_in_name(name, getattr(request, "username", None))

    # saves also get the editor's value (what the page shows): a document the server lost is restored from it
    def on_key_save(st, name, note, shown, evt: gr.EventData, request: gr.Request):
        return signed(an.save(studio, st, "draft", named(name, request), note, view=shown), request)

    def on_save(st, name, note, shown, request: gr.Request):
        return signed(an.save(studio, st, "draft", named(name, request), note, view=shown), request)

    def on_submit(st, name, note, shown, request: gr.Request):
        return signed(an.save(studio, st, "submitted", named(name, request), note, view=shown), request)

    def on_autosave(st, name, note, shown, request: gr.Request):
        st, view = signed(an.save(studio, st, "draft", named(name, request), note, auto=True, view=shown), request)
        return st, (gr.skip() if view is None else view)

    def on_accept(st, name, note, request: gr.Request):
        return signed(an.review(studio, st, named(name, request), True, note), request)

    def on_reject(st, name, note, request: gr.Request):
        return signed(an.review(studio, st, named(name, request), False, note), request)

    def on_export(chosen):
        return panels.export_for_page(studio, chosen)

    def on_compare(sess):
        return panels.compare_adapters(studio, sess, compare_lock)

    def save_correction(correction, request: gr.Request):
        return an.api_save_correction(studio, correction, getattr(request, "username", None))

    tab.select(on_tab, [session, state], [state, editor, annotator], **edits)
    open_btn.click(on_open_current, [session, state], [state, editor], **edits)
    items.open(on_open_item, [state], [state, editor], **edits)
    editor.edit(on_edit, [state], [state, editor], **edits)
    editor.history(on_history, [state], [state, editor], **edits)
    editor.restore(on_restore, [state], [state, editor], **edits).failure(on_restore_refused, [state], editor,
                                                                          **edits)
    reviewing = [state, annotator, comment]
    saving = [*reviewing, editor]
    for event, fn, inputs in ((editor.save, on_key_save, saving), (save_btn.click, on_save, saving),
                              (submit_btn.click, on_submit, saving), (accept_btn.click, on_accept, reviewing),
                              (reject_btn.click, on_reject, reviewing)):
        event(fn, inputs, [state, editor], **edits).then(refresh, filters, items, **private,
                                                           show_progress="hidden")
    editor.autosave(on_autosave, saving, [state, editor], **edits)
    gr.on([tab.select, refresh_btn.click, show.change, status.change, sha_prefix.submit, who.submit, search.submit],
          refresh, filters, items, **private, trigger_mode="always_last", show_progress="hidden")
    export_btn.click(on_export, [statuses], [export_file, export_note], **private, show_progress="minimal")
    compare_btn.click(on_compare, [session], [base_view, tuned_view, compare_note], **private,
                      concurrency_id=ws.MODEL_CALLS, show_progress="minimal")
    api_btn.click(save_correction, [api_in], [api_out], api_name="save_correction",
                  concurrency_id="annotate-api", concurrency_limit=4)
    return tab

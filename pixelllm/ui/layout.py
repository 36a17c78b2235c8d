"""The studio's Gradio Blocks: components and wiring only (the logic is in workspace.py and callbacks.py).

Handlers here are thin closures: they read Gradio's request/event objects and call the callbacks with plain
data. (No `from __future__ import annotations`: Gradio inspects the `gr.EventData` / `gr.Request` hints.)
"""

import functools
import json
from pathlib import Path

import gradio as gr

from pixelllm.ui import api, records
from pixelllm.ui import callbacks as cb
from pixelllm.ui import workspace as ws
from pixelllm.ui.annotate_tab import build_annotate_tab

STATIC = Path(__file__).parent / "static"
MAX_FILE_SIZE = "25mb"  # uploads above this are refused by Gradio itself (launch(max_file_size=...))
# Browser sessions whose state Gradio keeps (launch(state_session_capacity=...)); the least recently used beyond it
# are dropped. Gradio's default, 10000, is no bound here: a session's gr.State holds its image (a 2048x1536 upload:
# 9.4 MB of model-frame pixels + its display JPEG), kept an hour after the tab closes and forever when no
# heartbeat closes it, and Gradio never drops a session's per-session config (the three viewers' values, ~0.7 MB),
# only this cap does. 128 sessions of a phone photo (~9.7 MB each, measured: docs/app.md): ~1.2 GB at most.
STATE_SESSION_CAPACITY = 128
TITLE = "PixelLLM Studio"
# The inputs of the actions on the page's image (Generate, Trace, Locate, Dense), rewritten in the browser before they
# are sent (gradio's `js=`): (session, image input, the action's view, shown_image, shown_view, ...its own inputs).
# The image input's file path goes as the text `shown_image` and the image itself as None; the key of the image the
# action's view shows goes as `shown_view` and the view itself as None. The action needs only which file the page
# shows and which image its views show (workspace.shown_session); gradio's Image preprocessing would open the file,
# and so fail once delete_cache has removed it, an hour after the upload, on a page still working on that image.
SEND_SHOWN_IMAGE = ("(state, image, view, shown, showing, ...rest) => [state, null, null, (image && image.path) || '', "
                    "(view && view.image && view.image.key) || '', ...rest]")


@functools.lru_cache(maxsize=1)
def _viewer_assets() -> tuple[str, str]:
    template = (STATIC / "viewer.html").read_text()
    css = (STATIC / "viewer.css").read_text()
    js = f"const PIXELLLM_VIEWER_CSS = {json.dumps(css)};\n" + (STATIC / "viewer.js").read_text()
    return template, js


def viewer(value: dict, elem_id: str) -> gr.HTML:
    """The image + SVG overlay component (static/viewer.*). Its value is the JSON of render.viewer_value; it
    emits custom events: pick {x, y}, drag {box}, region {i}."""
    template, js = _viewer_assets()
    return gr.HTML(value=value, html_template=template, js_on_load=js, apply_default_css=False, elem_id=elem_id,
                   elem_classes=["px-viewer"])


def page_script() -> gr.HTML:
    """A hidden component whose only job is to run static/page.js on the page: names for the example-image
    buttons and the tab panels, and arrow keys in the tab bar (gradio 6 has none of them). Part of the Blocks, so
    every launch gets it (launch(js=) would depend on the caller)."""
    return gr.HTML("", js_on_load=(STATIC / "page.js").read_text(), visible="hidden", apply_default_css=False,
                   elem_id="page-script")


def _visitor(request: gr.Request | None) -> records.Visitor:
    return records.Visitor(getattr(request, "session_hash", None), getattr(request, "username", None) or None)


def build_demo(predictor, store=None, *, checkpoint: str | None = None, examples: list[str] | None = None,
               concurrency: int = 2, max_queue: int = 64, min_word_interval: float = 0.03,
               store_notice: str | None = None) -> gr.Blocks:
    """Build the studio around one shared, thread-safe predictor and an optional AnnotationStore.

    checkpoint: the path / hub id shown in the Model tab; examples: image paths for the Examples row;
    store_notice: Markdown shown atop the Annotate tab (``app.store_notice``: no store, or an ephemeral one);
    concurrency: model calls running at once, all endpoints and tabs together (the queue's default_concurrency_limit
    for the shared group workspace.MODEL_CALLS);
    min_word_interval: seconds between streamed words at least (0 = as fast as decoding).
    """
    studio = ws.Studio(predictor=predictor, store=store, checkpoint=checkpoint, examples=list(examples or []),
                       min_word_interval=min_word_interval, store_notice=store_notice)
    empty_caption, empty_refer, empty_dense = ws.empty_views()

    with gr.Blocks(title=TITLE, delete_cache=(3600, 3600)) as demo:
        # An empty Session from the start (gradio deep-copies it for each page on its first event): the events of a
        # page all carry this one object until an image replaces it, so a caption started while the first image
        # still loads meets that load (workspace.shown_session) instead of finding no session at all
        session = gr.State(ws.Session())
        page_script()
        gr.Markdown(f"## {TITLE}\nPixel-aligned captions: every word the model writes gets a box on the image. "
                    "Upload, paste or pick an image, then caption it (optionally prompted by points, a box or "
                    "text), locate referring expressions, or caption every region.")
        with gr.Row(equal_height=False):
            with gr.Column(scale=1, min_width=240):
                # image_mode=None: the file reaches pixelllm.image as uploaded (its size limit, EXIF, alpha and
                # 16-bit handling); gradio's default "RGB" decoded and converted every non-RGB upload first
                image_in = gr.Image(label="Image", type="filepath", sources=["upload", "clipboard"], height=220,
                                    elem_id="image-input", image_mode=None)
                if studio.examples:
                    gr.Examples(examples=[[p] for p in studio.examples], inputs=[image_in], label="Examples",
                                examples_per_page=8, elem_id="examples")
            with gr.Column(scale=4):
                # wrap: on a narrow screen the tabs that do not fit go on a second row of the tab bar. Gradio's default
                # put them in a "More tabs" menu of plain buttons: no tab role, no name for their panels, no arrow keys
                with gr.Tabs(elem_id="tabs", overflow_behavior="wrap"):
                    # ---------------------------------------------------------------- caption & trace
                    with gr.Tab("Caption & trace", id="caption", elem_id="tab-caption"):
                        with gr.Row(equal_height=False):
                            with gr.Column(scale=3, min_width=320):
                                cap_view = viewer(empty_caption, "caption-viewer")
                                cap_text = gr.Textbox(label="Caption", interactive=False, lines=2,
                                                      elem_id="caption-text")
                            with gr.Column(scale=2, min_width=260):
                                click_mode = gr.Radio(list(ws.CLICK_MODES), value="Positive point",
                                                      label="A click on the image", elem_id="click-mode",
                                                      info="Drag on the image to draw a box in any mode.")
                                with gr.Row():
                                    undo_btn = gr.Button("Undo prompt", size="sm", elem_id="undo-prompt")
                                    clear_btn = gr.Button("Clear prompts", size="sm", elem_id="clear-prompts")
                                text_prompt = gr.Textbox(label="Text prompt (optional)", elem_id="text-prompt",
                                                         placeholder="e.g. In this picture we can see")
                                with gr.Accordion("Decoding", open=False, elem_id="decoding"):
                                    max_words = gr.Slider(1, studio.max_words, value=studio.default_max_words, step=1,
                                                          label="Max words", elem_id="max-words")
                                    sampling = gr.Checkbox(label="Sample (instead of greedy)", value=False,
                                                           elem_id="sampling")
                                    temperature = gr.Slider(0.05, 2.0, value=1.0, step=0.05, label="Temperature",
                                                            elem_id="temperature")
                                    top_p = gr.Slider(0.05, 1.0, value=0.9, step=0.05, label="Top-p",
                                                      elem_id="top-p")
                                    # -1, not None: gradio shows and sends None as 0, a fixed seed
                                    seed = gr.Number(label="Seed (-1 = a new random seed each time; used when "
                                                           "sampling)", value=-1, precision=0, elem_id="seed")
                                    repetition = gr.Slider(
                                        1.0, 2.0, value=studio.model.config.repetition_penalty, step=0.05,
                                        label="Repetition penalty (1 = none; starts at the checkpoint's default)",
                                        elem_id="repetition-penalty")
                                gen_btn = gr.Button("Generate", variant="primary", elem_id="generate")
                                with gr.Accordion("Trace your own caption", open=False, elem_id="trace"):
                                    trace_text = gr.Textbox(
                                        label="Caption", lines=1, max_lines=4, elem_id="trace-text",
                                        placeholder="In this picture we can see a large red circle on the left.",
                                        info="Where does the model put each word? Uses the prompts above; "
                                             "it traces in the order it narrates.")
                                    trace_btn = gr.Button("Trace", elem_id="trace-run")
                                cap_files = gr.File(label="Download: JSON (words + boxes) and overlay PNG",
                                                    file_count="multiple", interactive=False, elem_id="caption-files")
                    # ---------------------------------------------------------------- referring
                    with gr.Tab("Referring", id="refer", elem_id="tab-refer"):
                        with gr.Row(equal_height=False):
                            with gr.Column(scale=3, min_width=320):
                                ref_view = viewer(empty_refer, "refer-viewer")
                            with gr.Column(scale=2, min_width=260):
                                ref_text = gr.Textbox(label="Referring expressions (one per line)", lines=4,
                                                      placeholder="the large blue triangle\nthe purple triangle",
                                                      elem_id="refer-text")
                                ref_btn = gr.Button("Locate", variant="primary", elem_id="refer-run")
                                ref_files = gr.File(label="Download: JSON, mask PNGs, overlay PNG",
                                                    file_count="multiple", interactive=False, elem_id="refer-files")
                    # ---------------------------------------------------------------- dense captions
                    with gr.Tab("Dense captions", id="dense", elem_id="tab-dense"):
                        with gr.Row(equal_height=False):
                            with gr.Column(scale=3, min_width=320):
                                dense_view = viewer(empty_dense, "dense-viewer")
                                region_text = gr.Textbox(label="Selected region's caption", interactive=False,
                                                         elem_id="region-text")
                            with gr.Column(scale=2, min_width=260):
                                threshold = gr.Slider(0.0, 1.0, value=0.3, step=0.01, label="Score threshold",
                                                      elem_id="dense-threshold")
                                max_regions = gr.Slider(1, 50, value=16, step=1, label="Max regions",
                                                        elem_id="dense-max")
                                dense_btn = gr.Button("Detect & caption regions", variant="primary",
                                                      elem_id="dense-run")
                                dense_files = gr.File(label="Download: JSON and overlay PNG", file_count="multiple",
                                                      interactive=False, elem_id="dense-files")
                    # ---------------------------------------------------------------- annotate (annotate_tab.py)
                    # Corrections: reads `Session.last` from the `session` state, writes to `studio.store`; also
                    # adds the /save_correction API endpoint.
                    build_annotate_tab(studio, session)
                    # ---------------------------------------------------------------- model
                    with gr.Tab("Model", id="model", elem_id="tab-model"):
                        model_html = gr.HTML(cb.model_panel(studio), elem_id="model-panel")

        # ---------------------------------------------------------------------------- API (no UI)
        # The API's inputs. Whole numbers without gradio's precision=0, which rounded 3.5 to 4 words and answered
        # "abc" with its generic error: the callbacks read them as the library does (decoding.form_whole_number)
        with gr.Column(visible=False):
            api_image = gr.File(label="image", type="filepath")
            api_prompts = gr.Textbox(label="prompts", value="")
            api_text = gr.Textbox(label="text", value="")
            api_max_words = gr.Number(label="max_words", value=studio.default_max_words)
            api_sample = gr.Checkbox(label="do_sample", value=False)
            api_temperature = gr.Number(label="temperature", value=1.0)
            api_top_p = gr.Number(label="top_p", value=1.0)
            api_seed = gr.Number(label="seed", value=-1)  # -1: draw a seed (reported back)
            api_repetition = gr.Number(label="repetition_penalty", value=studio.model.config.repetition_penalty)
            api_expressions = gr.Textbox(label="expressions", value="")
            api_caption_text = gr.Textbox(label="caption", value="")
            api_threshold = gr.Number(label="score_threshold", value=0.3)
            api_max_regions = gr.Number(label="max_regions", value=16)
            api_caption_out = gr.JSON(label="caption")
            api_trace_out = gr.JSON(label="trace")
            api_refer_out = gr.JSON(label="refer")
            api_dense_out = gr.JSON(label="dense")
            api_caption_btn = gr.Button()
            # not the API's: the file of the image the page shows, sent with Generate, Trace, Locate and Dense
            # (SEND_SHOWN_IMAGE), and the key of the image the action's view shows
            shown_image = gr.Textbox(value="")
            shown_view = gr.Textbox(value="")
            api_trace_btn = gr.Button()
            api_refer_btn = gr.Button()
            api_dense_btn = gr.Button()

        # ---------------------------------------------------------------------------- handlers
        def on_image(path, state):
            session, cap, ref, dense = ws.load_image(studio, path, state)
            # a view left as it is keeps its results: the image already shown (gradio fires change again for one
            # upload), or the view of an action that loaded the image before this event came (shown_session)
            caption = (gr.skip(),) * 2 if cap == gr.skip() else ("", None)
            refer = gr.skip() if ref == gr.skip() else None
            regions = (gr.skip(),) * 2 if dense == gr.skip() else ("", None)
            return (session, cap, ref, dense, *caption, refer, *regions)

        @ws.for_the_shown_image
        def on_pick(state, mode, evt: gr.EventData):
            return ws.click(state, mode, evt._data)

        @ws.for_the_shown_image
        def on_drag(state, evt: gr.EventData):
            return ws.drag_box(state, evt._data)

        def on_shown(state, shown, showing, action):
            """`action(session)` on the session of the image the page shows (ws.shown_session: maybe still loading,
            or reopened for a dropped state); its updates are dropped when another image replaced it meanwhile."""
            return ws.for_the_shown_image(action)(ws.shown_session(studio, shown, state, showing))

        def on_generate(state, _image, _view, shown, showing, text, n, sample, temp, p, s, penalty,
                        request: gr.Request):
            state = ws.shown_session(studio, shown, state, showing)  # generate stops by itself for a new image
            yield from cb.generate(studio, state, text, n, sample, temp, p, s, _visitor(request),
                                   repetition_penalty=penalty)

        def on_trace(state, _image, _view, shown, showing, text, request: gr.Request):
            return on_shown(state, shown, showing, lambda session: cb.trace(studio, session, text, _visitor(request)))

        def on_refer(state, _image, _view, shown, showing, text, request: gr.Request):
            return on_shown(state, shown, showing, lambda session: cb.refer(studio, session, text, _visitor(request)))

        def on_dense(state, _image, _view, shown, showing, thr, k, request: gr.Request):
            # new regions, none selected: no region caption
            return on_shown(state, shown, showing,
                            lambda session: (*cb.dense(studio, session, thr, k, _visitor(request)), ""))

        @ws.for_the_shown_image
        def on_dense_select(state, evt: gr.EventData, request: gr.Request):
            yield from cb.dense_select(studio, state, evt._data, _visitor(request))

        def caption(image, prompts, text, max_words, do_sample, temperature, top_p, seed, repetition_penalty,
                    request: gr.Request):
            return api.caption(studio, image, prompts, text, max_words, do_sample, temperature, top_p, seed,
                               _visitor(request), repetition_penalty=repetition_penalty)

        def trace(image, prompts, caption, request: gr.Request):
            return api.trace(studio, image, prompts, caption, _visitor(request))

        def refer(image, expressions, request: gr.Request):
            return api.refer(studio, image, expressions, _visitor(request))

        def dense(image, score_threshold, max_regions, request: gr.Request):
            return api.dense(studio, image, score_threshold, max_regions, _visitor(request))

        private = {"api_visibility": "private"}
        model = {"concurrency_id": ws.MODEL_CALLS}  # one --concurrency bound for every model call
        # Prompt edits are cheap and must apply in click order: one at a time, every click counted.
        prompt_edit = {**private, "concurrency_id": "prompts", "concurrency_limit": 1, "trigger_mode": "multiple",
                       "show_progress": "hidden"}
        image_in.change(on_image, [image_in, session], [session, cap_view, ref_view, dense_view, cap_text, cap_files,
                                                        ref_files, region_text, dense_files], **private,
                        show_progress="minimal")
        cap_view.pick(on_pick, [session, click_mode], [session, cap_view], **prompt_edit)
        cap_view.drag(on_drag, [session], [session, cap_view], **prompt_edit)
        undo_btn.click(ws.for_the_shown_image(ws.undo_prompt), [session], [session, cap_view], **prompt_edit)
        clear_btn.click(ws.for_the_shown_image(ws.clear_prompts), [session], [session, cap_view], **prompt_edit)

        # The actions on the page's image: their inputs start with what SEND_SHOWN_IMAGE rewrites in the browser
        def shown_inputs(view, *inputs):
            return [session, image_in, view, shown_image, shown_view, *inputs]

        gen_inputs = shown_inputs(cap_view, text_prompt, max_words, sampling, temperature, top_p, seed, repetition)
        gen_outputs = [cap_view, cap_text, cap_files, session]
        # One event for both: its trigger_mode "once" ignores either while a caption streams (two listeners each
        # had their own guard, so Enter in the text prompt started a second stream into the same view)
        gr.on([gen_btn.click, text_prompt.submit], on_generate, gen_inputs, gen_outputs, **private, **model,
              show_progress="hidden", js=SEND_SHOWN_IMAGE)
        gr.on([trace_btn.click, trace_text.submit], on_trace, shown_inputs(cap_view, trace_text), gen_outputs,
              **private, **model, show_progress="minimal", js=SEND_SHOWN_IMAGE)
        ref_btn.click(on_refer, shown_inputs(ref_view, ref_text), [session, ref_view, ref_files], **private, **model,
                      show_progress="minimal", js=SEND_SHOWN_IMAGE)
        dense_btn.click(on_dense, shown_inputs(dense_view, threshold, max_regions),
                        [session, dense_view, dense_files, region_text], **private, **model, show_progress="minimal",
                        js=SEND_SHOWN_IMAGE)
        for event in (dense_view.pick, dense_view.drag, dense_view.region):
            event(on_dense_select, [session], [session, dense_view, region_text], **private, **model,
                  show_progress="hidden")
        demo.load(lambda: cb.model_panel(studio), None, model_html, **private, queue=False)

        api_caption_btn.click(caption, [api_image, api_prompts, api_text, api_max_words, api_sample,
                                        api_temperature, api_top_p, api_seed, api_repetition], api_caption_out,
                              api_name="caption", **model)
        api_trace_btn.click(trace, [api_image, api_prompts, api_caption_text], api_trace_out, api_name="trace",
                            **model)
        api_refer_btn.click(refer, [api_image, api_expressions], api_refer_out, api_name="refer", **model)
        api_dense_btn.click(dense, [api_image, api_threshold, api_max_regions], api_dense_out, api_name="dense",
                            **model)

    demo.queue(default_concurrency_limit=concurrency, max_size=max_queue)
    demo.studio = studio  # for tests and tools: the shared context behind the callbacks
    return demo

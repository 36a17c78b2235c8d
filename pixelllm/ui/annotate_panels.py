"""The Annotate tab's side panels: the browse list (corrections or model outputs), the export of corrections as
a zip, and the same image captioned by the base model and the active LoRA adapter side by side. Plain data in and
out, tested directly (tests/annotate/test_annotate_opening.py); the editor's callbacks are in `annotate.py`.
"""

from __future__ import annotations

import functools
import html
import logging
import re
import shutil
import threading
import zipfile
from typing import Any

import gradio as gr
import numpy as np

from pixelllm.ui import records, render
from pixelllm.ui import workspace as ws
from pixelllm.ui.decoding import token_budget

log = logging.getLogger(__name__)

LIST_STATUSES = ("any", "draft", "submitted", "accepted", "rejected")
LIST_SCAN = 2000       # rows scanned when filtering by sha prefix / annotator substring
LIST_SHOW = 50         # rows shown
_HEX = re.compile(r"^[0-9a-f]{1,64}$")


# ------------------------------------------------------------------------------------------ browsing

@ws.user_errors
def list_items(studio: ws.Studio, show: str, sha_prefix: Any, annotator: Any, status: Any, search: Any) -> dict:
    """The browse list: corrections (heads of chains) or model outputs, newest first, filtered by image sha
    prefix, annotator (case-insensitive substring), status and a text search. Returns the list component's
    JSON ({kind, rows, message}); every value is shown as text."""
    store = studio.store
    kind = "generation" if show == "Model outputs" else "correction"
    if store is None:
        return {"kind": kind, "rows": [], "message": "No annotation store is configured."}
    prefix = (sha_prefix or "").strip().lower()
    if prefix and not _HEX.match(prefix):
        raise ValueError("the image id is a hexadecimal sha256 prefix (0-9, a-f)")
    who = " ".join((annotator or "").split()).casefold()
    text = " ".join((search or "").split())
    if len(text) > 200:
        raise ValueError("the search text is limited to 200 characters")
    exact = prefix if len(prefix) == 64 else None
    rows: list[dict] = []
    if kind == "correction":
        wanted = None if status in (None, "", "any") else status
        if wanted is not None and wanted not in LIST_STATUSES:
            raise ValueError(f"unknown status {wanted!r}")
        found = store.list_corrections(status=wanted, image_sha=exact, search=text or None, limit=LIST_SCAN)
        for c in found:
            if prefix and not c["image_sha"].startswith(prefix):
                continue
            if who and who not in c["annotator"].casefold():
                continue
            rows.append({"kind": "correction", "id": c["id"], "image": c["image_sha"][:12],
                         "status": c["status"], "annotator": c["annotator"], "reviewer": c.get("reviewer") or "",
                         "text": (c["caption"] or " · ".join(c["words"]))[:120], "when": c["created_at"][:19]})
    else:
        found = store.list_generations(image_sha=exact, limit=LIST_SCAN)
        needle = text.casefold()
        for g in found:
            if prefix and not g["image_sha"].startswith(prefix):
                continue
            joined = " ".join(g["words"]) if g["task"] == "caption" else " · ".join(g["words"])
            if needle and needle not in joined.casefold():
                continue
            rows.append({"kind": "generation", "id": g["id"], "image": g["image_sha"][:12], "status": g["task"],
                         "annotator": g.get("adapter") or "", "reviewer": "", "text": joined[:120],
                         "when": g["created_at"][:19]})
    shown = rows[:LIST_SHOW]
    message = (f"{len(rows)} {'correction' if kind == 'correction' else 'model output'}(s)"
               + (f", showing the newest {LIST_SHOW}" if len(rows) > LIST_SHOW else "")
               + (" — click a row to open it" if rows else ""))
    return {"kind": kind, "rows": shown, "message": message}


# ------------------------------------------------------------------------------------------ export

@ws.user_errors
def export(studio: ws.Studio, statuses: Any) -> tuple[str, str]:
    """Export corrections with `training.export.export_corrections` and zip the folder. Returns (zip path,
    summary text)."""
    if studio.store is None:
        raise ValueError("No annotation store is configured.")
    try:
        from training.export import export_corrections
    except ImportError as err:
        raise gr.Error(f"export module missing (training/export.py: {render.notice(err)})") from err
    chosen = [s for s in (statuses or []) if isinstance(s, str)]
    if not chosen:
        raise ValueError("tick at least one status to export")
    folder = records.download_dir(studio)
    out = folder / "pixelllm-corrections"
    try:
        summary = export_corrections(studio.store, out, chosen)
    except ValueError:
        raise
    except Exception as err:  # noqa: BLE001
        log.exception("export failed")
        raise gr.Error(f"The export failed: {render.notice(err)}") from err
    if not summary.get("ln_records") and not summary.get("regions"):
        shutil.rmtree(out, ignore_errors=True)
        raise ValueError(f"no {' or '.join(chosen)} corrections to export (an empty zip would be all you got)")
    target = folder / "pixelllm-corrections.zip"
    with zipfile.ZipFile(target, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(out.rglob("*")):
            if path.is_file():
                archive.write(path, path.relative_to(folder).as_posix())
    shutil.rmtree(out, ignore_errors=True)
    text = (f"{summary.get('ln_records', 0)} LN record(s) ({summary.get('recorded_traces', 0)} recorded, "
            f"{summary.get('synthesised_traces', 0)} synthesised traces), {summary.get('regions', 0)} region(s), "
            f"{summary.get('images', 0)} image(s); statuses: {', '.join(chosen)}")
    return str(target), text


def export_for_page(studio: ws.Studio, statuses: Any) -> tuple[str | None, str]:
    """The Export button: `export`'s zip and summary, or no file and why nothing was exported (a raised error
    would leave the previous export's zip and summary on the page, read as this one's)."""
    try:
        return export(studio, statuses)
    except gr.Error as err:
        gr.Warning(err.message)
        return None, f"Nothing exported: {html.unescape(err.message)}"


# ------------------------------------------------------------------------------------------ compare adapters

@ws.user_errors
def compare_adapters(studio: ws.Studio, session: ws.Session | None, lock: threading.Lock) -> tuple[dict, dict, str]:
    """The current image captioned by the base model (adapter None) and by the active adapter, side by side; when
    the last caption was typed and traced, that caption traced by both. Adapter switches are serialised by `lock`
    and restored afterwards. Returns (base view, adapter view, note)."""
    session = session if isinstance(session, ws.Session) else None
    if session is None or session.array is None or session.image is None:
        raise ValueError(ws.NO_IMAGE)
    predictor = studio.predictor
    prompts = session.caption.get("prompts", {}) if session.caption else {}
    traced = bool(session.caption and session.caption.get("traced"))
    kwargs = {"box": prompts.get("box"), "text": prompts.get("text"),
              "max_new_tokens": token_budget(studio.default_max_words)}
    if prompts.get("points"):
        kwargs["points"] = np.asarray(prompts["points"], dtype=np.float64)
        kwargs["point_labels"] = np.asarray(prompts["point_labels"], dtype=np.int64)
    with lock:
        active = predictor.adapter
        available = list(studio.model.adapters)
        if active is None:
            note = ("No LoRA adapter is active" + (f" (loaded: {', '.join(available)})" if available else
                                                   " and none is loaded")
                    + ": finetune on corrections (python -m training.finetune ... --out runs/ft1), then start the "
                    "app on its output (python app.py --checkpoint runs/ft1) to compare before / after.")
            empty = render.viewer_value(session.image, mode="caption", include_src=True, clickable=False,
                                        message="base model")
            return empty, render.viewer_value(session.image, mode="caption", include_src=True, clickable=False,
                                              message="no LoRA adapter is active"), note
        if traced:  # a caption the user typed: compare where each model puts its words
            kwargs = {key: kwargs[key] for key in ("points", "point_labels", "box") if key in kwargs}
            run = functools.partial(predictor.trace, text=session.caption["text"], **kwargs)
        else:
            run = functools.partial(predictor.caption, **kwargs)
        tuned = run(predictor.set_image(session.array))
        with predictor.using_adapter(None):  # other users wait rather than get the base model's output
            base = run(predictor.set_image(session.array))  # the image encoded by the base model
    base_words = [w.to_dict() for w in base.words]
    tuned_words = [w.to_dict() for w in tuned.words]
    views = (render.viewer_value(session.image, mode="caption", words=base_words, clickable=False, status="done",
                                 message=f"base model: {base.text}"),
             render.viewer_value(session.image, mode="caption", words=tuned_words, clickable=False, status="done",
                                 message=f"adapter “{active}”: {tuned.text}"))
    if traced:
        same = [w.box for w in base.words] == [w.box for w in tuned.words]
        note = f"Base vs adapter “{active}”, tracing the same caption" + (": identical boxes." if same else ".")
    else:
        same = base.text == tuned.text
        note = f"Base vs adapter “{active}” (greedy, same prompts)" + (": identical words." if same else ".")
    return views[0], views[1], note

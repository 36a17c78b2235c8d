"""What leaves the studio: annotation-store rows, download files and the JSON records the downloads and the API share.

Records carry boxes in the pixels of the image the user sent (`to_original` maps model-frame boxes back); the
store keeps the model frame. Logging never costs a user a result: a failing store warns (`gr.Warning`) and the
output is still shown.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import gradio as gr
import numpy as np
from PIL import Image

from pixelllm.predictor import ServedBy
from pixelllm.ui import render

if TYPE_CHECKING:
    from pixelllm.ui.workspace import Session, Studio

log = logging.getLogger(__name__)

DOWNLOAD_MAX_AGE_S = 3600


def to_original(box: Sequence[float], scale: tuple[float, float]) -> list[float]:
    sx, sy = scale
    return [round(box[0] * sx, 2), round(box[1] * sy, 2), round(box[2] * sx, 2), round(box[3] * sy, 2)]


class Visitor(NamedTuple):
    """Who asked, as logged with an output: the browser session (gradio's session hash) and, behind `--auth`,
    the login."""

    session: str | None = None
    user: str | None = None


def log_output(studio: Studio, session: Session | None, array: np.ndarray, task: str, words: list[str],
               boxes: list[list[float]], *, prompts: Any, extra: dict, visitor: Visitor | None,
               served: ServedBy) -> int | None:
    """Log an output shown to a user. A failing store warns; the user keeps the result. served: what
    `predictor.reading()` yielded where the output was computed (its adapter is logged, not the one active now)."""
    if studio.store is None:
        return None
    try:
        sha = session.sha if session is not None else None
        if sha is None:
            sha = studio.store.add_image(render.png_bytes(array), int(array.shape[1]), int(array.shape[0]))
            if session is not None:
                session.sha = sha
        adapter = served.adapter
        if adapter is not None:  # two adapters may share a name (finetune names them after --out's folder)
            extra = {**extra, "adapter_version": served.adapter_version}
        return studio.store.log_generation(
            sha, task, words, boxes, model_id=studio.model_id, model_version=str(studio.model.version),
            prompts=prompts, extra=extra, adapter=adapter, session=visitor.session if visitor else None,
            user=visitor.user if visitor else None)
    except Exception as err:  # noqa: BLE001 - any store failure must not cost the user the result
        log.exception("annotation store: could not log a %s generation", task)
        gr.Warning(f"The result is shown but could not be saved to the annotation store: {render.notice(err)}")
        return None


def download_dir(studio: Studio) -> Path:
    """A fresh per-request folder under GRADIO_TEMP_DIR (never a shared fixed path); old ones are pruned."""
    root = studio.download_root or Path(os.environ.get("GRADIO_TEMP_DIR") or
                                        Path(tempfile.gettempdir()) / "gradio") / "pixelllm-downloads"
    root.mkdir(parents=True, exist_ok=True)
    cutoff = time.time() - DOWNLOAD_MAX_AGE_S
    for old in root.iterdir():
        try:
            if old.is_dir() and old.stat().st_mtime < cutoff:
                shutil.rmtree(old, ignore_errors=True)
        except OSError:
            pass
    return Path(tempfile.mkdtemp(prefix="result-", dir=root))


def write_json(folder: Path, name: str, payload: dict) -> str:
    path = folder / name
    path.write_text(json.dumps(payload, indent=2, ensure_ascii=False))
    return str(path)


def write_png(folder: Path, name: str, data: bytes | np.ndarray) -> str:
    path = folder / name
    path.write_bytes(data if isinstance(data, bytes) else render.png_bytes(data))
    return str(path)


def model_meta(studio: Studio, served: ServedBy) -> dict:
    """served: what `predictor.reading()` yielded where the output was computed."""
    return {"checkpoint": studio.model_id, "version": str(studio.model.version), "adapter": served.adapter}


def model_prompts(points: np.ndarray | None, labels: np.ndarray | None, box: list[float] | None,
                  text: str | None) -> dict:
    """The prompts as logged: model-frame pixels, plain lists."""
    return {"points": [] if points is None else points.tolist(),
            "point_labels": [] if labels is None else labels.tolist(), "box": box, "text": text}


def _prompts_to_original(prompts: dict, scale: tuple[float, float]) -> dict:
    """`model_prompts`' dict in the pixels of the image as sent (what downloads and the API return)."""
    sx, sy = scale
    return {**prompts, "points": [[round(x * sx, 2), round(y * sy, 2)] for x, y in prompts["points"]],
            "box": None if prompts["box"] is None else to_original(prompts["box"], scale)}


def caption_record(studio: Studio, words: list[dict], scale: tuple[float, float], size: tuple[int, int], *,
                   prompts: dict, options: dict | None, generation_id: int | None, task: str = "caption",
                   cut: bool | None = None, served: ServedBy) -> dict:
    """The JSON a user downloads or the API returns: word boxes and `prompts` (`model_prompts`' dict, as logged)
    mapped to the pixels of the image the user sent. cut: a limit (max words, or its token budget) ended a
    caption the model had not finished (a generated caption; None for a typed one)."""
    record = {
        "task": task,
        "text": " ".join(w["text"] for w in words),
        "image": {"width": size[0], "height": size[1]},
        "coordinates": "pixels of the image as sent (after EXIF rotation); boxes are [x0, y0, x1, y1]",
        "words": [{"index": w["index"], "text": w["text"], "box": to_original(w["box"], scale)} for w in words],
        "prompts": _prompts_to_original(prompts, scale),
        "decoding": options,
        "model": model_meta(studio, served),
        "generation_id": generation_id,
    }
    if cut is not None:
        record["cut"] = cut
    return record


def refer_record(studio: Studio, referrals: Sequence, scale: tuple[float, float], size: tuple[int, int],
                 gen_id: int | None, served: ServedBy) -> dict:
    results = []
    for r in referrals:
        mask = r.mask
        if (mask.shape[1], mask.shape[0]) != size:
            mask = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(size, Image.Resampling.NEAREST)) > 0
        results.append({"expression": r.expression, "box": to_original(r.box, scale), "score": round(r.score, 4),
                        "mask_score": round(r.mask_score, 4), "mask_area": int(mask.sum()),
                        "mask": render.mask_rle(mask)})
    return {"task": "refer", "image": {"width": size[0], "height": size[1]},
            "coordinates": "pixels of the image as sent (after EXIF rotation); boxes are [x0, y0, x1, y1]; "
                           "masks are COCO uncompressed RLE (column-major)",
            "results": results, "model": model_meta(studio, served), "generation_id": gen_id}


def dense_record(studio: Studio, regions: Sequence[dict], scale: tuple[float, float], size: tuple[int, int],
                 gen_id: int | None, served: ServedBy) -> dict:
    return {"task": "dense", "image": {"width": size[0], "height": size[1]},
            "coordinates": "pixels of the image as sent (after EXIF rotation); boxes are [x0, y0, x1, y1]",
            "regions": [{"box": to_original(r["box"], scale), "score": round(r["score"], 4), "caption": r["caption"],
                         "words": [{"index": w["index"], "text": w["text"], "box": to_original(w["box"], scale)}
                                   for w in r["words"]]} for r in regions],
            "model": model_meta(studio, served), "generation_id": gen_id}

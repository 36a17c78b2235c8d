"""Export annotators' corrections as Localized Narratives JSONL (+ images) and COCO-style region files.

```
python -m training.export --db data/annotations.db --out DIR [--statuses submitted,accepted]
```

writes into DIR (nothing outside it):

- ``corrections.ln.jsonl`` — one official LN record per caption correction (the heads of correction chains whose
  status is in ``--statuses``), with exactly the seven keys of ``LN_KEYS``, so any LN tool — and
  :func:`training.data.localized_narratives.read_localized_narratives` — reads it;
- ``images/<image_id>.<ext>`` — the corrected images (``image_id`` is the image's sha256 in the store);
- ``regions.coco.json`` — only when there are region corrections: referring corrections (``expression``), dense
  corrections and location-conditioned caption corrections (``caption``), COCO-style with ``bbox`` =
  ``[x, y, w, h]`` in pixels.

What a correction implies (:func:`correction_trace`; the fine-tuning command uses the same function, so the
export and the training data never disagree):

- **A recorded mouse trace** (>= 2 points) is the ground truth, as in LN: it is exported unchanged, with the
  stored ``timed_caption`` (one utterance per word). Without stored timing the words share the trace's time span
  equally. Each word's target is then Scenic's rule over the trace (``utterance_targets``), not the stored box.
- **No recorded trace** (the annotator only edited words and moved boxes): a trace is *synthesised* whose LN
  targets are exactly the word boxes. Each word gets a time slot; its trace is 16 points (``NUM_TRACE_SAMPLES``)
  placed exactly at the 16 times the reader samples over the slot: box centre -> three clockwise loops over the
  corners (TL, TR, BR, BL) -> TL -> BR -> centre. The samples' min/max are the box corners and their
  trapezoidal time average is the box centre, so the reader gives back the box (and its centre) up to rounding.
  Slots must not touch (two points at one time would be merged by the reader): the stored timing is kept when
  every slot lasts >= 1 ms and ends before the next starts, otherwise words are re-timed at
  ``WORD_SECONDS`` each with ``GAP_SECONDS`` pauses.

LN has no field for the location prompt, the non-visual word flags or the correction's status: those stay in the
store (``training.finetune`` reads it directly). A word containing spaces becomes several LN words sharing one
utterance target (LN's own convention). This module never imports torch.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pixelllm.files import exclusive_lock, write_atomically
from pixelllm.store import STATUSES, AnnotationStore, StoreError
from training import export_folder
from training.data.localized_narratives import LN_KEYS, NUM_TRACE_SAMPLES, utterance_targets
from training.export_folder import COCO_FILE, IMAGE_MANIFEST, IMAGES_DIR, LN_FILE, safe_id, safe_join

__all__ = [  # the folder's names and path checks live in training.export_folder, re-exported here
    "COCO_FILE",
    "IMAGES_DIR",
    "IMAGE_MANIFEST",
    "LN_FILE",
    "CorrectionTrace",
    "correction_trace",
    "export_corrections",
    "ln_record",
    "safe_id",
    "safe_join",
    "skip_reason",
    "synthesise_trace",
]

DATASET_ID = "pixelllm_corrections"
#: Synthetic timing (a calm speaking rate, 2 words/s): each word lasts WORD_SECONDS, then a GAP_SECONDS pause.
WORD_SECONDS = 0.4
GAP_SECONDS = 0.1
#: Shortest word slot of stored timing reused for a synthesised trace (the reader's centre needs >= 1e-5 s).
MIN_SLOT_SECONDS = 1e-3


# --------------------------------------------------------------------------------------------------------
# What a correction implies: words, timing, trace and per-word targets


@dataclass
class CorrectionTrace:
    """A correction as an LN narrative.

    words: the LN words (each stored word split on whitespace); timed_caption: one utterance per stored word;
    traces: LN ``[[{x, y, t}]]`` (normalised); boxes: (n, 4) float64 per LN word, ``(x0, y0, x1, y1)`` normalised,
    not clipped — exactly what the LN reader computes from ``traces`` + ``timed_caption``; centres: (n, 2);
    word_index: (n,) the stored word each LN word comes from; source: ``"recorded"`` or ``"synthesised"``.
    """

    words: list[str]
    timed_caption: list[dict[str, Any]]
    traces: list[list[dict[str, float]]]
    boxes: np.ndarray
    centres: np.ndarray
    word_index: np.ndarray
    source: str


def _point_count(traces: Sequence[Sequence[dict]]) -> int:
    return sum(len(segment) for segment in traces)


def _separable(timed_caption: Sequence[dict], n: int) -> bool:
    """Stored timing a synthesised trace can reuse: one slot per word, each >= 1 ms, none touching the next."""
    if len(timed_caption) != n:
        return False
    slots = [(float(u["start_time"]), float(u["end_time"])) for u in timed_caption]
    if any(end - start < MIN_SLOT_SECONDS for start, end in slots):
        return False
    return all(prev[1] < nxt[0] for prev, nxt in zip(slots, slots[1:]))


def _synthetic_timing(words: Sequence[str]) -> list[dict[str, Any]]:
    step = WORD_SECONDS + GAP_SECONDS
    return [{"utterance": w, "start_time": round(i * step, 6), "end_time": round(i * step + WORD_SECONDS, 6)}
            for i, w in enumerate(words)]


def _spread_timing(words: Sequence[str], traces: Sequence[Sequence[dict]]) -> list[dict[str, Any]]:
    """No stored timing for a recorded trace: the words share the trace's time span equally, in order."""
    times = [float(p["t"]) for segment in traces for p in segment]
    t0, t1 = min(times), max(times)
    edges = np.linspace(t0, t1, len(words) + 1)
    return [{"utterance": w, "start_time": float(edges[i]), "end_time": float(edges[i + 1])}
            for i, w in enumerate(words)]


def _corner_cycle(num_samples: int) -> list[str]:
    """Sample order over one word's box: centre, clockwise corner loops, a balancing TL/BR pair, centre.
    Every corner is visited and the trapezoidal average of the sequence is the centre (see the module doc)."""
    if num_samples < 6:
        raise ValueError(f"a synthesised trace needs at least 6 samples per word, got {num_samples}")
    inner = num_samples - 2
    loops, rest = divmod(inner, 4)
    tail = {0: [], 1: ["C"], 2: ["TL", "BR"], 3: ["TL", "BR", "C"]}[rest]
    return ["C"] + ["TL", "TR", "BR", "BL"] * loops + tail + ["C"]


def synthesise_trace(boxes: np.ndarray, timed_caption: Sequence[dict],
                     num_samples: int = NUM_TRACE_SAMPLES) -> list[list[dict[str, float]]]:
    """An LN trace (one segment) whose per-utterance LN targets are exactly ``boxes``.

    Args:
        boxes: (n, 4) normalised ``(x0, y0, x1, y1)``, one per utterance.
        timed_caption: n utterances whose slots last > 0 s and do not touch (see :func:`_separable`).
        num_samples: the reader's samples per utterance (16); one trace point is placed at each sample time.
    """
    order = _corner_cycle(num_samples)
    points = []
    for (x0, y0, x1, y1), utterance in zip(np.asarray(boxes, dtype=np.float64).tolist(), timed_caption):
        corners = {"C": ((x0 + x1) / 2.0, (y0 + y1) / 2.0), "TL": (x0, y0), "TR": (x1, y0), "BR": (x1, y1),
                   "BL": (x0, y1)}
        times = np.linspace(float(utterance["start_time"]), float(utterance["end_time"]), num_samples)
        for name, t in zip(order, times.tolist()):
            x, y = corners[name]
            points.append({"x": float(x), "y": float(y), "t": float(t)})
    return [points]


def correction_trace(row: dict[str, Any]) -> CorrectionTrace:
    """The LN narrative a correction implies (see the module docstring for the rules).

    Args:
        row: a correction row with ``words``, ``boxes`` (XYXY pixels), ``timed_caption``, ``traces`` and
            ``image_width``/``image_height`` (as ``AnnotationStore.training_examples`` returns it).

    Raises:
        ValueError: if the correction has no words or the image size is unknown.
    """
    words = list(row["words"])
    if not words:
        raise ValueError(f"correction {row.get('id')} has no words")
    width, height = float(row["image_width"]), float(row["image_height"])
    if width <= 0 or height <= 0:
        raise ValueError(f"correction {row.get('id')}: unknown image size {width}x{height}")
    traces = [list(segment) for segment in row.get("traces") or []]
    stored_timing = list(row.get("timed_caption") or [])
    if _point_count(traces) >= 2:
        timed = ([{**u, "utterance": w} for u, w in zip(stored_timing, words)] if len(stored_timing) == len(words)
                 else _spread_timing(words, traces))
        boxes, centres = utterance_targets(traces, timed)
        source = "recorded"
    else:
        scale = np.array([width, height, width, height], dtype=np.float64)
        boxes = np.asarray(row["boxes"], dtype=np.float64).reshape(-1, 4) / scale
        centres = np.stack([(boxes[:, 0] + boxes[:, 2]) / 2.0, (boxes[:, 1] + boxes[:, 3]) / 2.0], axis=1)
        timed = ([{**u, "utterance": w} for u, w in zip(stored_timing, words)] if _separable(stored_timing, len(words))
                 else _synthetic_timing(words))
        traces = synthesise_trace(boxes, timed)
        source = "synthesised"
    ln_words, index = [], []
    for i, word in enumerate(words):
        for piece in word.split():
            ln_words.append(piece)
            index.append(i)
    index_arr = np.asarray(index, dtype=np.int64)
    return CorrectionTrace(words=ln_words, timed_caption=timed, traces=traces, boxes=boxes[index_arr],
                           centres=centres[index_arr], word_index=index_arr, source=source)


def ln_record(row: dict[str, Any], trace: CorrectionTrace, image_id: str) -> dict[str, Any]:
    """The official LN record (exactly ``LN_KEYS``) of a correction."""
    caption = row.get("caption") or ""
    if not caption.strip():
        caption = " ".join(u["utterance"] for u in trace.timed_caption)
    record = {
        "dataset_id": DATASET_ID,
        "image_id": safe_id(image_id),
        "annotator_id": str(row["annotator"]),
        "caption": caption,
        "timed_caption": [{"utterance": u["utterance"], "start_time": float(u["start_time"]),
                           "end_time": float(u["end_time"])} for u in trace.timed_caption],
        "traces": trace.traces,
        "voice_recording": "",
    }
    assert tuple(record) == LN_KEYS
    return record


# --------------------------------------------------------------------------------------------------------
# Region corrections (COCO-style)


def _task(store: AnnotationStore, row: dict[str, Any], cache: dict[int, dict | None]) -> tuple[str, dict | None]:
    gen_id = row.get("generation_id")
    if gen_id is None:
        return "caption", None
    if gen_id not in cache:
        cache[gen_id] = store.get_generation(gen_id)
    generation = cache[gen_id]
    return (generation["task"] if generation else "caption"), generation


def prompt_box(generation: dict | None) -> list[float] | None:
    """The box prompt (XYXY pixels of the stored image) a caption generation used, or None (global box,
    points)."""
    if not generation or not isinstance(generation.get("prompts"), dict):
        return None
    box = generation["prompts"].get("box")
    if isinstance(box, (list, tuple)) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box):
        return [float(v) for v in box]
    return None


def _coco_annotation(ann_id: int, image_num: int, box: Sequence[float], row: dict, task: str,
                     text_key: str, text: str) -> dict[str, Any]:
    x0, y0, x1, y1 = (float(v) for v in box)
    w, h = max(x1 - x0, 0.0), max(y1 - y0, 0.0)
    return {"id": ann_id, "image_id": image_num, "category_id": 1, "bbox": [x0, y0, w, h], "area": w * h,
            "iscrowd": 0, text_key: text, "task": task, "correction_id": row["id"],
            "generation_id": row.get("generation_id"), "annotator": row["annotator"], "status": row["status"]}


# --------------------------------------------------------------------------------------------------------
# Export


def skip_reason(row: dict[str, Any], store_root: Path) -> str | None:
    """Why the correction ``row`` is not exported (a key of the summary's ``skipped``), or None: it has no words,
    its image's stored path leads out of the store's folder ``store_root`` (resolved), or the image is missing."""
    if not row["words"]:
        return "no_words"
    source = Path(row["image_path"]).resolve()
    if store_root not in source.parents:
        return "unsafe_image_path"
    if not source.is_file():
        return "missing_image"
    return None


def export_corrections(store: AnnotationStore, out_dir: str | os.PathLike,
                       statuses: Sequence[str] = ("submitted", "accepted")) -> dict[str, Any]:
    """Export the heads of correction chains whose status is in ``statuses`` into ``out_dir``.

    Caption corrections become LN records (+ their images); referring / dense corrections and caption corrections
    made under a box prompt become COCO-style regions. Returns a JSON-friendly summary: file paths, counts of
    records (recorded / synthesised traces), regions and images, and what was skipped and why. When nothing is
    exported nothing is written (``ln_file`` is None): an earlier export in ``out_dir`` stays as it was, and a
    folder that did not exist is not made.
    """
    statuses = [statuses] if isinstance(statuses, str) else list(statuses)
    unknown = [s for s in statuses if s not in STATUSES]
    if not statuses or unknown:
        raise ValueError(f"statuses must be some of {', '.join(STATUSES)}; got {statuses}")
    out = Path(out_dir)
    store_images = Path(store.root).resolve() / "images"
    if (out / IMAGES_DIR).resolve() == store_images:
        raise ValueError(f"--out {out} is the annotation store's own folder: export somewhere else")
    if store_images == out.resolve() or store_images in out.resolve().parents:  # checked before it is made
        raise ValueError(f"--out {out} is inside the annotation store's images folder {store_images}: export "
                         "somewhere else")
    rows = None if out.exists() else store.training_examples(statuses)
    reasons = None if rows is None else [skip_reason(row, Path(store.root).resolve()) for row in rows]
    if reasons is not None and all(reasons):
        # nothing to export into a new folder (nothing selected, or all skipped): none is made, so none is left.
        # Decided before making it, as removing it after is unsafe: removed under a second export that had opened it
        # to wait for the lock, that one wrote into a folder no other export could lock. If the store's images vanish
        # after this check (deleted mid-export), the folder made below stays, empty, for that reason. The reasons go
        # along, not asked again: an image stored meanwhile would have the export write here without the lock.
        return _export(store, out, statuses, rows, reasons)
    out.mkdir(parents=True, exist_ok=True)  # the lock is on the folder
    # one export into a folder at a time, a second one waits: two at once each removed images the other's files
    # named, and the one that finished last wrote an LN file naming images no longer there, or a manifest
    # without the images the other one wrote
    with contextlib.ExitStack() as held:
        try:
            held.enter_context(exclusive_lock(out, wait=True))
        except KeyboardInterrupt:
            raise InterruptedWaiting(f"interrupted while waiting for another export into {out}") from None
        return _export(store, out, statuses, store.training_examples(statuses) if rows is None else rows)


class InterruptedWaiting(KeyboardInterrupt):
    """Ctrl+C while an export waited for another export's lock on its folder: it had written nothing."""


def _export(store: AnnotationStore, out: Path, statuses: list[str], rows: list[dict],
            reasons: list[str | None] | None = None) -> dict[str, Any]:
    """`export_corrections` of `rows` (the store's training examples of `statuses`) into the folder `out`, whose
    lock the caller holds (or which does not exist, when every row has a skip reason in `reasons`; without
    `reasons` each row's `skip_reason` is taken here)."""
    ln_path, coco_path = safe_join(out, LN_FILE), safe_join(out, COCO_FILE)
    store_root = Path(store.root).resolve()
    before = export_folder.earlier_export_images(out)  # read before this export rewrites the files that name them
    generations: dict[int, dict | None] = {}
    images: dict[str, tuple[str, dict]] = {}  # sha -> (relative file name, COCO image entry)
    sources: dict[str, Path] = {}  # exported file name -> the store's file, copied once the export is known
    lines: list[str] = []
    annotations: list[dict] = []
    counts = {"recorded": 0, "synthesised": 0}
    skipped = {"no_words": 0, "missing_image": 0, "unsafe_image_path": 0}

    def add_image(row: dict) -> int:  # the COCO id of the row's image, registered for copying on first sight
        sha = row["image_sha"]
        if sha not in images:
            source = Path(row["image_path"]).resolve()
            name = f"{safe_id(sha)}.{export_folder.image_ext(source)}"
            safe_join(out, IMAGES_DIR, name)  # a name or a symlinked images/ leading out is refused before any write
            sources[name] = source
            relative = f"{IMAGES_DIR}/{name}"
            images[sha] = (relative, {"id": len(images) + 1, "file_name": relative, "width": int(row["image_width"]),
                                      "height": int(row["image_height"]), "sha256": sha})
        return images[sha][1]["id"]

    for index, row in enumerate(rows):
        why = skip_reason(row, store_root) if reasons is None else reasons[index]
        if why:
            skipped[why] += 1
            continue
        task, generation = _task(store, row, generations)
        image_num = add_image(row)
        if task in ("refer", "dense"):
            text_key = "expression" if task == "refer" else "caption"
            for text, box in zip(row["words"], row["boxes"]):
                annotations.append(_coco_annotation(len(annotations) + 1, image_num, box, row, task, text_key, text))
            continue
        trace = correction_trace(row)
        counts[trace.source] += 1
        lines.append(json.dumps(ln_record(row, trace, row["image_sha"]), ensure_ascii=False, allow_nan=False))
        box = prompt_box(generation)
        if box is not None:
            caption = row.get("caption") or " ".join(row["words"])
            annotations.append(_coco_annotation(len(annotations) + 1, image_num, box, row, "caption", "caption",
                                                caption))

    summary = {
        "out_dir": str(out.resolve()),
        "ln_file": str(ln_path) if lines or annotations else None,
        "coco_file": str(coco_path) if annotations else None,
        "statuses": statuses,
        "ln_records": len(lines),
        "recorded_traces": counts["recorded"],
        "synthesised_traces": counts["synthesised"],
        "regions": len(annotations),
        "images": len(images),
        "skipped": skipped,
    }
    if not lines and not annotations:
        # nothing selected (another --statuses, a new or emptied store): an earlier export in the folder stays, the
        # only copy of its corrections if the store it came from is gone
        return summary
    wrote = export_folder.copy_images(out, sources, before)
    write_atomically(ln_path, "".join(line + "\n" for line in lines))
    if annotations:
        coco = {
            "info": {"description": "PixelLLM Studio region corrections (referring, dense, box-prompted captions)",
                     "date_created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                     "statuses": statuses, "bbox": "[x, y, width, height] in pixels of the image file"},
            "images": [entry for _, entry in images.values()],
            "annotations": annotations,
            "categories": [{"id": 1, "name": "object", "supercategory": "object"}],
        }
        write_atomically(coco_path, json.dumps(coco, indent=1, ensure_ascii=False, allow_nan=False) + "\n")
    elif coco_path.is_file():
        coco_path.unlink()  # a stale file from an earlier export would describe corrections no longer selected
    export_folder.prune_images(out, {Path(relative).name for relative, _ in images.values()}, before, wrote)
    return summary


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training.export", description=__doc__.split("\n\n")[0],
                                     allow_abbrev=False)
    parser.add_argument("--db", default="data/annotations.db", help="annotation store (SQLite file)")
    parser.add_argument("--out", required=True, help="export folder (created; nothing is written outside it)")
    parser.add_argument("--statuses", default="submitted,accepted",
                        help=f"comma-separated correction statuses to export (of {', '.join(STATUSES)})")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not Path(args.db).is_file():
        print(f"no annotation store at {args.db}", file=sys.stderr)
        return 2
    statuses = [s.strip() for s in args.statuses.split(",") if s.strip()]
    try:
        with AnnotationStore(args.db, create=False) as store:  # a reader: an empty file is refused, not made a store
            summary = export_corrections(store, args.out, statuses)
    except (ValueError, StoreError, OSError) as err:  # OSError: the output folder cannot be written
        print(f"export failed: {err}", file=sys.stderr)
        return 2
    except InterruptedWaiting:
        print(f"export: interrupted while waiting for another export into {args.out} to finish; this export wrote "
              "nothing: run the command again to export", file=sys.stderr)
        return 130
    except KeyboardInterrupt:  # Ctrl+C: one line, not a traceback from wherever the export was
        print(f"export: interrupted; {args.out} may be part-way through this export (some images copied, one "
              "perhaps cut short; the LN and COCO files not both of this export yet): run the command again to "
              "finish it", file=sys.stderr)
        return 130
    print(json.dumps(summary, indent=2))
    if summary["ln_file"] is None:
        skipped = ", ".join(f"{n} {why.replace('_', ' ')}" for why, n in summary["skipped"].items() if n)
        what = f"every selected correction was skipped ({skipped})" if skipped else \
            f"no {' or '.join(statuses)} corrections to export"
        print(f"nothing exported: {what}; {args.out} was not touched", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

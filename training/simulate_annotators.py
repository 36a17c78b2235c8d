"""Simulate the whole annotation loop end to end: distribution shift -> model output -> corrections -> LoRA
finetune -> before/after evaluation.

```
python -m training.simulate_annotators --base assets/checkpoints/shapes-tiny --work runs/simulate \
    [--corrections 200] [--steps N] [--shift-eval-images 60] [--base-eval-images 200] [--json OUT]
```

1. **Shift.** A Shapes split in ``world="shift"``: every image holds at least one ``cross``, a shape word the base
   model never saw (``training.data.shapes.SHIFT_SHAPE``).
2. **Model output.** The base model captions each cross's box (location-conditioned captioning, greedy)
   through the app's own ``/caption`` API function, ``pixelllm.ui.api.caption`` with a box prompt: it
   decodes with ``PixelLLMPredictor`` and logs the output with ``AnnotationStore.log_generation`` exactly as the
   app does (image stored as the app stores it, prompts in the app's format).
3. **Corrections.** A simulated annotator submits the truth from the objects file — words
   ``<size> <colour> cross``, every word's box = the object's box — through the Annotate tab's one save path,
   ``pixelllm.ui.annotate.save_correction_from_editor(status="submitted")``. No mouse trace is recorded, so the
   corrections take the moved-boxes path (see ``training.export``).
4. **Finetune.** ``training.finetune`` on those corrections (at most ``--corrections``) mixed with replay of a
   standard-world split, within ``--max-minutes`` of training.
5. **Evaluate** before (the base checkpoint) and after (``PixelLLM.from_pretrained`` of the run's folder, adapter
   active) on splits generated with other seeds: a held-out shift split — location-conditioned caption accuracy
   on its cross objects (attributes exact, ``training.evaluate.caption_is_triple``) — and a standard-world test
   split — location-conditioned caption accuracy on all objects and referring P@0.5 / mask mean IoU
   (``training.evaluate.location_caption_metrics`` / ``referring_metrics``), to show old skills stay.

Prints a table (``training.tables.format_table``) and the acceptance check (shift gain >= 30 points, base
metrics drop <= 3 points) and writes everything to ``--json`` (default ``<work>/simulate.json``). ``--work`` is
scratch space: its store and data splits are recreated on every run (a folder that is not an earlier run's is
refused). Every size is a flag, so a smoke version
(a few images, a few steps) runs in seconds.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pixelllm.files import json_target_problem, write_atomically
from training.data.shapes import SHIFT_SHAPE, generate_split, load_image, load_split
from training.evaluate import ImagePrediction, load_truth
from training.scoring import caption_is_triple, location_caption_metrics, referring_metrics
from training.tables import format_table

if TYPE_CHECKING:
    from training.finetune import FinetuneSettings

ANNOTATOR = "simulated_annotator"
SHIFT_GAIN_POINTS = 30.0
BASE_DROP_POINTS = 3.0
TABLE_DECIMALS = 3  # the report's before / after columns
WORK_MARKER = ".simulate-work"  # in a --work folder a run made (check_work)


@dataclass
class SimulateSettings:
    base: str
    work: str
    corrections: int = 200
    steps: int = 600
    batch_size: int = 16
    lr: float = 2e-3
    rank: int | None = None
    replay_ratio: float = 0.85
    replay_mode: str = "joint"  # training.finetune's --replay-mode
    replay_images: int = 400
    replay_data: str | None = None  # default: a standard-world split generated in <work>/data
    replay_split: str = "train"
    replay_tasks: dict[str, float] | None = None  # default: training.finetune's replay mix
    shift_eval_images: int = 60
    base_eval_images: int = 200  # 680 objects: 40 images (125) moved the forgetting figure by 8 points
    image_size: int = 256
    shift_seed: int = 101
    heldout_seed: int = 202
    base_seed: int = 303
    replay_seed: int = 404
    max_new_tokens: int = 16  # evaluation: location-conditioned caption length cap (tokens)
    max_words: int = 6  # collection: the app's word limit for the captions shown to the annotator
    max_minutes: float = 15.0
    threads: int | None = None
    seed: int = 0
    progress: bool = True


# ---------------------------------------------------------------------------- data


def make_splits(s: SimulateSettings, data: Path) -> dict[str, Any]:
    """Generate the shift (corrections), held-out shift, base test and replay splits into ``data``."""
    n_shift = max(1, s.corrections)  # every shift image holds >= 1 cross: this many images give enough crosses
    specs = {"shift_train": (n_shift, s.shift_seed, "shift"),
             "shift_test": (s.shift_eval_images, s.heldout_seed, "shift"),
             "test": (s.base_eval_images, s.base_seed, "standard")}
    if s.replay_data is None and s.replay_ratio > 0:
        specs["replay"] = (s.replay_images, s.replay_seed, "standard")
    made = {}
    for split, (num, seed, world) in specs.items():
        summary = generate_split(data, split, num, seed, size=s.image_size, world=world)
        made[split] = {"images": summary.images, "objects": summary.objects, "seed": seed, "world": world}
    return made


# ---------------------------------------------------------------------------- the loop's first half


def collect_corrections(predictor: Any, store: Any, data: Path, s: SimulateSettings, model_id: str) -> dict[str, Any]:
    """Base-model captions of cross boxes, logged by the app's /caption function -> simulated corrections saved
    by the Annotate tab's save function (status submitted)."""
    from pixelllm.ui import api, records
    from pixelllm.ui import workspace as ws
    from pixelllm.ui.annotate import save_correction_from_editor

    studio = ws.Studio(predictor=predictor, store=store, checkpoint=model_id)
    split = load_split(data, "shift_train")
    made = correct_before = 0
    examples = []
    for record in split.objects:
        if made >= s.corrections:
            break
        crosses = [o for o in record["objects"] if o["shape"] == SHIFT_SHAPE][: s.corrections - made]
        for obj in crosses:
            box = [float(v) for v in obj["box"]]
            output = api.caption(studio, str(data / record["file_name"]), json.dumps({"box": box}), None,
                                 s.max_words, False, 1.0, 1.0, None, records.Visitor("simulate_annotators"))
            if output["generation_id"] is None:
                raise RuntimeError("the app's caption function did not log its output to the store")
            words = [obj["size"], obj["color"], obj["shape"]]
            save_correction_from_editor(
                store, None, {"generation_id": output["generation_id"], "words": words, "boxes": [box] * len(words),
                              "caption": " ".join(words)}, "submitted", ANNOTATOR)
            correct_before += caption_is_triple(output["text"], tuple(words))
            made += 1
            if len(examples) < 5:
                examples.append({"model": output["text"], "corrected": " ".join(words)})
    return {"corrections": made, "base_model_correct": correct_before, "examples": examples}


# ---------------------------------------------------------------------------- evaluation


def shift_accuracy(predictor: Any, data: Path, split: str, max_new_tokens: int) -> dict[str, Any]:
    """Location-conditioned caption accuracy (attributes exact) on the cross objects of a shift split."""
    correct = total = 0
    samples = []
    for record in load_split(data, split).objects:
        crosses = [o for o in record["objects"] if o["shape"] == SHIFT_SHAPE]
        if not crosses:
            continue
        state = predictor.set_image(load_image(data, record["file_name"]))
        captions = predictor.caption_boxes(state, [o["box"] for o in crosses], max_new_tokens=max_new_tokens)
        for obj, caption in zip(crosses, captions):
            ok = caption_is_triple(caption.text, (obj["size"], obj["color"], obj["shape"]))
            correct += ok
            total += 1
            if len(samples) < 5:
                samples.append({"truth": f"{obj['size']} {obj['color']} {obj['shape']}", "caption": caption.text})
    return {"accuracy": correct / total if total else None, "objects": total, "samples": samples}


def base_metrics(predictor: Any, data: Path, split: str, max_new_tokens: int) -> dict[str, Any]:
    """Location-conditioned caption accuracy (all objects) and referring P@0.5 / mask IoU on a standard split."""
    truths = load_truth(data, split)
    preds = []
    for truth in truths:
        state = predictor.set_image(load_image(data, truth.file_name))
        captions = predictor.caption_boxes(state, [o.box for o in truth.objects], max_new_tokens=max_new_tokens)
        expressions = [e.expression for e in truth.expressions]
        referrals = predictor.refer(state, expressions) if expressions else []
        preds.append(ImagePrediction(refer_boxes=[tuple(r.box) for r in referrals],
                                     refer_masks=[np.asarray(r.mask, dtype=bool) for r in referrals],
                                     object_captions=[c.text for c in captions], dense=[], words=[]))
    loc = location_caption_metrics(truths, preds)["loc_caption_accuracy"]["model"]
    refer = referring_metrics(truths, preds)
    return {"loc_caption_accuracy": loc, "refer_p@0.5": refer["refer_p@0.5"]["model"],
            "mask_mean_iou": refer["mask_mean_iou"]["model"], "objects": sum(len(t.objects) for t in truths),
            "expressions": sum(len(t.expressions) for t in truths), "images": len(truths)}


def evaluate_model(predictor: Any, data: Path, s: SimulateSettings) -> dict[str, Any]:
    return {"shift": shift_accuracy(predictor, data, "shift_test", s.max_new_tokens),
            "base": base_metrics(predictor, data, "test", s.max_new_tokens)}


def _points(before: float | None, after: float | None) -> float | None:
    """after - before in points, of the values as the table shows them (0.851 -> 0.853 is +0.2, whatever the
    digits past the third were); + 0.0: a change that rounds to zero from below is 0.0, not -0.0."""
    if before is None or after is None:
        return None
    return round(100.0 * (round(after, TABLE_DECIMALS) - round(before, TABLE_DECIMALS)), 1) + 0.0


def report(before: dict, after: dict, s: SimulateSettings) -> tuple[str, dict[str, Any]]:
    """The before/after table and the acceptance verdict."""
    rows = []
    for label, split, key, getter in (
        ("cross loc-caption accuracy", f"shift_test (seed {s.heldout_seed})", "objects",
         lambda r: r["shift"]["accuracy"]),
        ("loc-caption accuracy", f"test (seed {s.base_seed})", "objects", lambda r: r["base"]["loc_caption_accuracy"]),
        ("referring P@0.5", f"test (seed {s.base_seed})", "expressions", lambda r: r["base"]["refer_p@0.5"]),
        ("referring mask mean IoU", f"test (seed {s.base_seed})", "expressions", lambda r: r["base"]["mask_mean_iou"]),
    ):
        n = before["shift" if split.startswith("shift") else "base"][key]
        b, a = getter(before), getter(after)
        rows.append({"metric": label, "split": split, "n": n, "before": b, "after": a,
                     "change (points)": _points(b, a)})
    shift_gain = rows[0]["change (points)"]
    drops = {"loc_caption_accuracy": rows[1]["change (points)"], "refer_p@0.5": rows[2]["change (points)"]}
    verdict = {
        "shift_gain_points": shift_gain,
        "shift_pass": shift_gain is not None and shift_gain >= SHIFT_GAIN_POINTS,
        "base_change_points": drops,
        "base_pass": all(v is not None and v >= -BASE_DROP_POINTS for v in drops.values()),
    }
    verdict["pass"] = verdict["shift_pass"] and verdict["base_pass"]
    return format_table(rows, precision=TABLE_DECIMALS), verdict


# ---------------------------------------------------------------------------- driver


def _say(s: SimulateSettings, message: str) -> None:
    if s.progress:
        print(message, flush=True)


def run(s: SimulateSettings) -> dict[str, Any]:
    import torch

    from pixelllm import PixelLLM, PixelLLMPredictor
    from pixelllm.store import AnnotationStore
    from training.finetune import finetune

    if s.threads:
        torch.set_num_threads(s.threads)
    began = time.perf_counter()
    work = Path(s.work)
    check_work(work)
    check_settings(s)
    data, run_dir, db = work / "data", work / "run", work / "annotations.db"
    for stale in (data, run_dir, work / "images"):  # scratch space: recreated on every run
        shutil.rmtree(stale, ignore_errors=True)
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    (work / WORK_MARKER).touch()

    t = time.perf_counter()
    splits = make_splits(s, data)
    timings = {"generate_data": time.perf_counter() - t}
    sizes = ", ".join(f"{name} {info['images']} images" for name, info in splits.items())
    _say(s, f"data: {sizes} ({timings['generate_data']:.0f} s)")
    base_predictor = PixelLLMPredictor(PixelLLM.from_pretrained(s.base), device="cpu")
    with AnnotationStore(db, synchronous="NORMAL") as store:
        t = time.perf_counter()
        collected = collect_corrections(base_predictor, store, data, s, model_id=str(s.base))
        timings["collect_corrections"] = time.perf_counter() - t
        _say(s, f"collected {collected['corrections']} corrections (base model right on "
                f"{collected['base_model_correct']}) in {timings['collect_corrections']:.0f} s; finetuning")
        t = time.perf_counter()
        ft = finetune(finetune_settings(s), store=store, progress=s.progress)
        timings["finetune"] = time.perf_counter() - t
        _say(s, f"finetuned {ft['steps']} steps in {ft['train_seconds']:.0f} s; evaluating before/after")
        run_row = store.get_finetune_run(ft["run_id"])
    t = time.perf_counter()
    before = evaluate_model(base_predictor, data, s)
    after_model = PixelLLM.from_pretrained(run_dir)
    after = evaluate_model(PixelLLMPredictor(after_model, device="cpu"), data, s)
    timings["evaluate"] = time.perf_counter() - t
    table, verdict = report(before, after, s)
    timings["total"] = time.perf_counter() - began
    return {"settings": asdict(s), "splits": splits, "collected": collected,
            "finetune": {k: v for k, v in ft.items() if k != "params"}, "finetune_run": run_row,
            "adapter_active_after_load": after_model.active_adapter, "before": before, "after": after,
            "table": table, "acceptance": verdict, "seconds": {k: round(v, 1) for k, v in timings.items()}}


def finetune_settings(s: SimulateSettings) -> FinetuneSettings:
    """The `training.finetune` settings of the run's finetuning step (its store, data and run folder in --work)."""
    from training.finetune import FinetuneSettings  # torch: not imported until a run needs it

    work = Path(s.work)
    replay_data, replay_split = (s.replay_data, s.replay_split) if s.replay_data else (str(work / "data"), "replay")
    return FinetuneSettings(
        db=str(work / "annotations.db"), base=s.base, out=str(work / "run"), name="simulated-cross", steps=s.steps,
        batch_size=s.batch_size, lr=s.lr, rank=s.rank, replay_data=replay_data if s.replay_ratio > 0 else None,
        replay_split=replay_split, replay_ratio=s.replay_ratio, replay_mode=s.replay_mode,
        replay_limit=s.replay_images, seed=s.seed,
        max_minutes=s.max_minutes, **({"replay_tasks": s.replay_tasks} if s.replay_tasks else {}))


def check_settings(s: SimulateSettings) -> None:
    """Refuse, before any data is made, what the run would fail on only after generating its data and collecting
    its corrections (a typo in --replay-tasks, --steps 0, --corrections 0: a traceback minutes in)."""
    sizes = {"--corrections": s.corrections, "--replay-images": s.replay_images,
             "--shift-eval-images": s.shift_eval_images, "--base-eval-images": s.base_eval_images}
    small = [f"{flag} {n}" for flag, n in sizes.items() if n < 1]
    if small:
        raise ValueError(f"{', '.join(small)}: must be at least 1")
    finetune_settings(s).check()


def check_work(work: Path) -> None:
    """Refuse a --work folder that a run did not make: a run removes its data/, images/ and annotations.db, and
    `--work .` would have taken the project's own data/ (the annotation store with it). A folder is ours when it
    holds WORK_MARKER, or simulate.json (runs from before the marker)."""
    if work.exists() and not work.is_dir():
        raise ValueError(f"--work {work} is a file: give a folder of its own, e.g. runs/simulate")
    if work.is_dir() and any(work.iterdir()) and not any((work / name).is_file()
                                                         for name in (WORK_MARKER, "simulate.json")):
        raise ValueError(f"--work {work} holds files and is not a simulate_annotators work folder (whose data/, "
                         "images/ and annotations.db a run recreates): give a new folder, e.g. runs/simulate")


def build_parser() -> argparse.ArgumentParser:
    d = SimulateSettings(base="", work="")
    p = argparse.ArgumentParser(prog="python -m training.simulate_annotators", description=__doc__.split("\n\n")[0],
                                allow_abbrev=False)
    p.add_argument("--base", default="assets/checkpoints/shapes-tiny", help="base checkpoint directory")
    p.add_argument("--work", default="runs/simulate", help="scratch folder (recreated): data, store, run")
    p.add_argument("--corrections", type=int, default=d.corrections, help="simulated corrections (one per cross)")
    p.add_argument("--steps", type=int, default=d.steps, help="finetuning steps")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--rank", type=int, default=None, help="LoRA rank (default: the checkpoint config's)")
    p.add_argument("--replay-ratio", type=float, default=d.replay_ratio)
    p.add_argument("--replay-mode", choices=("alternate", "joint"), default=d.replay_mode,
                   help="alternate replay and correction batches, or train on one of each every step")
    p.add_argument("--replay-images", type=int, default=d.replay_images)
    p.add_argument("--replay-data", default=None, help="replay this Shapes folder instead of a generated split")
    p.add_argument("--replay-split", default=d.replay_split)
    p.add_argument("--replay-tasks", default=None,
                   help="replay task weights, e.g. region_box=4,refer=2 (default: training.finetune's mix)")
    p.add_argument("--shift-eval-images", type=int, default=d.shift_eval_images)
    p.add_argument("--base-eval-images", type=int, default=d.base_eval_images)
    p.add_argument("--image-size", type=int, default=d.image_size, help="Shapes image side in pixels")
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens, help="evaluation caption token cap")
    p.add_argument("--max-words", type=int, default=d.max_words, help="word cap of the collected captions")
    p.add_argument("--max-minutes", type=float, default=d.max_minutes, help="finetuning time budget")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--json", default=None, help="results file (default <work>/simulate.json)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--require-acceptance", action="store_true", help="exit 1 unless the acceptance check passes")
    return p


def main(argv: list[str] | None = None) -> int:
    from training.finetune import parse_task_weights, sigterm_as_exit

    args = build_parser().parse_args(argv)
    try:
        replay_tasks = parse_task_weights(args.replay_tasks) if args.replay_tasks else None
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    s = SimulateSettings(
        base=args.base, work=args.work, corrections=args.corrections, steps=args.steps, batch_size=args.batch_size,
        lr=args.lr, rank=args.rank, replay_ratio=args.replay_ratio, replay_mode=args.replay_mode,
        replay_images=args.replay_images,
        replay_data=args.replay_data, replay_split=args.replay_split,
        replay_tasks=replay_tasks,
        shift_eval_images=args.shift_eval_images,
        base_eval_images=args.base_eval_images, image_size=args.image_size, max_new_tokens=args.max_new_tokens,
        max_words=args.max_words,
        max_minutes=args.max_minutes, threads=args.threads, seed=args.seed, progress=not args.no_progress)
    if not Path(s.base).is_dir():
        print(f"no checkpoint folder at {s.base}", file=sys.stderr)
        return 2
    out = Path(args.json) if args.json else Path(s.work) / "simulate.json"
    try:
        check_work(Path(s.work))
        check_settings(s)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    # found after the whole run, the results were lost with a traceback
    problem = json_target_problem(out, "runs/simulate.json")
    if problem:
        print(f"error: --json {out}: {problem}", file=sys.stderr)
        return 2
    try:
        with sigterm_as_exit():
            result = run(s)
    except KeyboardInterrupt:  # Ctrl+C: one line, not a traceback from wherever the run was
        print(f"simulate_annotators: interrupted; {s.work} holds a partial run, which the next run with this --work "
              "recreates", file=sys.stderr)
        return 130
    c, ft = result["collected"], result["finetune"]
    print(f"\n{c['corrections']} corrections of cross captions (base model right on {c['base_model_correct']}); "
          f"finetuned {ft['steps']} steps in {ft['train_seconds']:.0f} s"
          f"{' (stopped at the time budget)' if ft['stopped_early'] else ''}; adapter {ft['adapter_dir']}")
    print(result["table"])
    v = result["acceptance"]
    print(f"acceptance: shift gain {v['shift_gain_points']} points (need >= {SHIFT_GAIN_POINTS:g}): "
          f"{'PASS' if v['shift_pass'] else 'FAIL'}; base change {v['base_change_points']} points "
          f"(may drop <= {BASE_DROP_POINTS:g}): {'PASS' if v['base_pass'] else 'FAIL'}")
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(out, json.dumps(result, indent=2, default=str) + "\n")
    print(f"results: {out}  ({result['seconds']['total']:.0f} s total)")
    return 1 if args.require_acceptance and not v["pass"] else 0


if __name__ == "__main__":
    raise SystemExit(main())

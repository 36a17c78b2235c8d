"""Fine-tune a LoRA adapter on annotators' corrections, with replay of the base training data.

```
python -m training.finetune --db data/annotations.db --base assets/checkpoints/shapes-tiny --out runs/NAME \
    [--steps N] [--replay-data DIR --replay-split train] [--replay-mode joint|alternate] [--replay-ratio R]
    [--rank r] [--lr LR] [--max-minutes M]
```

Closing the loop (DESIGN §5): the heads of correction chains with status submitted/accepted become training
samples; a fresh LoRA adapter (`PixelLLM.add_adapter(name, extra_targets=(r"loc_head\\.layers\\.\\d+",))`: the
LM's self-attention q/v *and* the location head, so corrected boxes are learnt too) is trained with
`set_stage("finetune")` — LoRA only, every base weight stays bit-identical. Every step trains on one batch of
corrections and one batch of replayed base data (`ShapesData` + `Collator` + `MultiTaskSampler`, the same code as
`training.train`), their losses weighted 0.15 : 0.85 (`--replay-mode joint --replay-ratio 0.85`), so the model
keeps its old skills; `--replay-mode alternate` makes each step one or the other instead (ratio = share of replay
steps). Measured on the shift simulation (docs/closing_the_loop.md): alternating at 0.5 gained +50.5 points on the
new word but lost 12.4 on the base set; joint at 0.85 for 300 steps gained +47.3 and lost 1.8 on the previous
checkpoint; the current one needs 600 steps (+44.0, base +0.3; 300 steps gained only +8.8).

Corrections become samples and batches by one rule, shared with `training.export`: `training.corrections`.

Speed: the image encoder is frozen and carries no LoRA, so its features are computed once per image
(`image_features` batches) instead of at every step — the same numbers, about half the CPU. Losses whose graph
holds no LoRA tensor (proposal heatmaps, SAM masks prompted by ground-truth boxes) are not computed.

Outputs in --out: a full checkpoint (base weights in the base file's dtype + `adapters/<name>/` active, so
`PixelLLM.from_pretrained(out)` gives the fine-tuned model) and `finetune.json`. The run is recorded in the
store's `finetune_runs` (running -> metrics updates -> finished, or failed with the error). The app serves it
with `python app.py --checkpoint <out>`; in Python, `predictor.load_adapter(out / "adapters" / name, name)` adds it
to a loaded predictor (the app has no control for that: it would switch the model every visitor shares).

The settings, their command line and the checks done before anything trains (--out, --extra-targets) are in
`training.finetune_settings`; every name there is importable from here too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from pixelllm.adapters import check_adapter_name
from pixelllm.files import exclusive_lock, left_by_dead_writer, writer_tag
from pixelllm.modeling.pixel_llm import PixelLLM
from pixelllm.store import AnnotationStore, StoreError
from training.corrections import (
    CorrectionExample,
    CorrectionSampler,
    FeatureBank,
    FinetuneCollator,
    correction_examples,
)
from training.data.datasets import Collator, ShapesData
from training.data.sampling import MultiTaskSampler
from training.finetune_settings import (  # noqa: F401 - re-exported: callers use training.finetune.<name>
    DEFAULT_REPLAY_TASKS,
    LOC_HEAD_TARGETS,
    REPLAY_MODES,
    UNTRAINED_HEADS,
    FinetuneSettings,
    build_parser,
    check_extra_targets,
    check_out,
    parse_task_weights,
    settings_from_args,
)
from training.train import lr_at


def grouped_batch_sizes(collate: Collator, batch_size: int) -> dict[str, int]:
    """Images per replay batch of the grouped tasks, whose item is an image bringing up to `*_per_image` rows:
    `batch_size // per_image` of them (at least one), so a grouped batch has about `batch_size` rows like every
    other batch, not `batch_size x per_image`."""
    return {"refer_image": max(1, batch_size // collate.refer_per_image),
            "region_image": max(1, batch_size // collate.region_per_image)}


# ---------------------------------------------------------------------------- the run

def claim_out(out: Path) -> None:
    """Under the run's lock on --out: refuse someone's other folder (a new run replaces an empty folder or a
    previous run's output, which has finetune.json), and clear or put back what a run killed before its end left
    beside it. Done unlocked, two runs starting at once moved the same folders ([Errno 2])."""
    if out.is_dir() and any(out.iterdir()) and not (out / "finetune.json").is_file():
        raise ValueError(f"--out {out} holds files and no finetune.json (not a finetune run's output, which a "
                         "new run replaces): give a new folder")
    for left in sorted(out.parent.glob(f".{out.name}.*-*")):  # what a run killed before its end left beside out
        kind, _, tag = left.name[len(out.name) + 2:].partition("-")
        if kind not in ("partial", "old") or not left_by_dead_writer(tag):
            continue
        if kind == "old" and not out.exists():  # killed between moving the previous output away and the new in
            os.replace(left, out)
        else:
            shutil.rmtree(left, ignore_errors=True)


def _left_name(out: Path, kind: str) -> Path:
    """Where this run keeps `kind` ("partial": its output being written; "old": the previous output during the
    swap) beside `out`, under a name that tells a later run whether this one is still running
    (`pixelllm.files.writer_tag`; off Linux the bare pid, which a later run leaves alone)."""
    return out.with_name(f".{out.name}.{kind}-{writer_tag() or os.getpid()}")


@contextlib.contextmanager
def swapped_in(staging: Path, out: Path) -> Iterator[None]:
    """Put the finished output folder in place of `out` (a previous run's output, or nothing) for the block;
    if the block fails (the run could not be recorded as finished) the previous output comes back. The previous
    run stays whole until the new one is complete beside it and recorded."""
    old = _left_name(out, "old") if out.exists() else None
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
    os.replace(staging, out)
    try:
        yield
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        if old is not None:
            os.replace(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _checkpoint_dtype(directory: Path) -> torch.dtype | None:
    """The floating dtype of a checkpoint's weights (so the run's copy of the base weights is bit-identical)."""
    from safetensors import safe_open

    with safe_open(str(directory / "model.safetensors"), framework="pt") as handle:
        for key in handle.keys():
            tensor = handle.get_slice(key)
            dtype = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}.get(tensor.get_dtype())
            if dtype is not None:
                return dtype
    return None


def load_base_with_adapter(settings: FinetuneSettings, name: str) -> tuple[PixelLLM, list[str]]:
    """The base checkpoint with a fresh LoRA adapter `name` active; returns the model and its trainable names."""
    model = PixelLLM.from_pretrained(settings.base)
    # An annotator's correction is the target to learn exactly (few examples, each word placed by hand): teacher
    # forcing, whatever scheduled sampling the base's last training stage used (it is saved in its config.json)
    model.config.scheduled_sampling = 0.0
    if name in model.adapters:
        raise ValueError(f"the base checkpoint already has an adapter named {name!r}: choose another --name")
    check_extra_targets(model, settings.extra_targets, settings.base)
    original = model.config.lora
    if settings.rank is not None:
        alpha = settings.alpha if settings.alpha is not None else 2 * settings.rank
        model.config.lora = dataclasses.replace(original, r=int(settings.rank), alpha=alpha)
    elif settings.alpha is not None:
        model.config.lora = dataclasses.replace(original, alpha=settings.alpha)
    try:
        model.add_adapter(name, extra_targets=tuple(settings.extra_targets))
    finally:
        model.config.lora = original  # config.json keeps the base's defaults; the adapter has its own config
    model.set_stage("finetune")
    trainable = []
    for param_name, param in model.named_parameters():
        own = "lora_" in param_name and f".{name}." in param_name
        param.requires_grad_(own)  # only this adapter, never another one the base may carry
        if own:
            trainable.append(param_name)
    if not trainable:
        raise RuntimeError("the adapter has no trainable tensors: check --extra-targets / the LoRA config")
    if any(n.startswith("image_encoder.") for n in trainable):
        raise RuntimeError("LoRA reaches the image encoder: precomputed image features would be stale")
    return model, trainable


def finetune(settings: FinetuneSettings, *, store: AnnotationStore | None = None, progress: bool = True
             ) -> dict[str, Any]:
    """Run one fine-tuning job (see the module docstring); returns its summary (also written to finetune.json).

    ``store`` defaults to ``AnnotationStore(settings.db, create=False)`` (closed afterwards; ``StoreError`` when
    the file is missing, empty or no store). Raises ``ValueError`` when there is nothing to train on or another run
    is writing into the same --out; any failure after the run was recorded marks it ``failed`` and re-raises."""
    settings.check()
    out = Path(settings.out)
    name = check_adapter_name(settings.name or Path(os.path.abspath(out)).name)  # the name typed, not a link target
    target = out.resolve()
    check_out(target)
    if settings.threads:
        torch.set_num_threads(int(settings.threads))
    with contextlib.ExitStack() as held:
        try:  # one run into an --out at a time: two at once were both recorded finished with the same adapter_path,
            # which held the weights of whichever swapped in last. The lock file is beside --out (`claim_out` never
            # sees it) and stays, as training.shapes' split locks do; the lock goes with the process, so the file of
            # a killed run stops no one
            held.enter_context(exclusive_lock(target.with_name(f".{target.name}.lock"), wait=False))
        except BlockingIOError:
            raise ValueError(f"--out {target}: another finetune run is writing it right now; let it finish, then "
                             "run the command again (or give another --out)") from None
        claim_out(target)
        if store is None:  # create=False: an empty file or a missing one is refused, not made a new store
            store = held.enter_context(AnnotationStore(settings.db, create=False))
        return _run(settings, store, out, name, progress)


def _run(settings: FinetuneSettings, store: AnnotationStore, out: Path, name: str, progress: bool) -> dict[str, Any]:
    began = time.perf_counter()
    torch.manual_seed(settings.seed)
    model, trainable = load_base_with_adapter(settings, name)
    size = model.config.image_size
    examples, pixels, counts = correction_examples(store, size, tuple(settings.statuses))
    if not examples:
        skipped = [f"{n} {why}" for n, why in ((counts["skipped_missing_image"], "without their image file"),
                                                (counts["skipped_no_words"], "without words")) if n]
        raise ValueError(f"no usable corrections with status {'/'.join(settings.statuses)} in {settings.db}"
                         + (f" ({', '.join(skipped)} skipped)" if skipped else ""))
    params = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(settings).items()}
    params.update({"adapter": name, "trainable_tensors": len(trainable),
                   "trainable_parameters": int(sum(p.numel() for p in model.parameters() if p.requires_grad)),
                   "examples": len(examples)})
    run_id = store.start_finetune_run(name, str(settings.base), num_corrections=counts["corrections"], params=params)
    target = out.resolve()  # `ft1` or `runs/ft1`: the run is staged beside it, under the folder's own name
    staging = _left_name(target, "partial")  # written whole, then swapped in
    recorded = False
    try:
        shutil.rmtree(staging, ignore_errors=True)
        summary = _train(settings, store, run_id, model, trainable, examples, pixels, staging, name, progress)
        adapter_dir = out / "adapters" / name
        summary.update({"adapter_dir": str(adapter_dir), "checkpoint": str(out),
                        "total_seconds": round(time.perf_counter() - began, 1), "run_id": run_id,
                        "corrections": counts, "params": params})
        (staging / "finetune.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
        with swapped_in(staging, target):
            store.finish_finetune_run(run_id, status="finished", adapter_path=str(adapter_dir.resolve()), metrics={
                k: summary[k] for k in ("steps", "stopped_early", "train_seconds", "total_seconds", "final_loss")})
            recorded = True
    except BaseException as err:
        shutil.rmtree(staging, ignore_errors=True)
        if recorded:  # Ctrl+C / SIGTERM while the previous output was removed: the run is in place and recorded
            return summary  # finished (marking it failed raised "already ended"); the next run removes the rest
        store.finish_finetune_run(run_id, status="failed", metrics={"error": f"{type(err).__name__}: {err}"})
        raise
    return summary


def _train(settings: FinetuneSettings, store: AnnotationStore, run_id: int, model: PixelLLM, trainable: list[str],
           examples: list[CorrectionExample], pixels: list[torch.Tensor], out: Path, name: str, progress: bool
           ) -> dict[str, Any]:
    """The training loop; saves the base and the adapter into `out` and returns the run's figures."""
    size = model.config.image_size
    correction_bank = FeatureBank(model, pixels)
    replay = replay_sampler = None
    replay_bank = None
    if settings.replay_data and settings.replay_ratio > 0:
        replay = ShapesData(settings.replay_data, settings.replay_split, size, settings.replay_limit)
        replay_bank = FeatureBank(model, [replay.pixels(r) for r in replay.records])
    collate = FinetuneCollator(replay, model.tokenizer, size, replay_bank=replay_bank,
                               correction_bank=correction_bank, max_tokens=settings.max_tokens)
    if replay is not None:
        replay_sampler = MultiTaskSampler(replay, settings.replay_tasks, settings.batch_size, settings.seed + 1,
                                          batch_sizes=grouped_batch_sizes(collate, settings.batch_size))
    sampler = CorrectionSampler(examples, settings.batch_size, settings.seed)
    names = set(trainable)
    params = [p for n, p in model.named_parameters() if n in names]
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0, betas=(0.9, 0.98))
    replay_ratio = settings.replay_ratio if replay is not None else 0.0
    joint = settings.replay_mode == "joint" and replay_ratio > 0
    model.train()
    window: dict[str, list[float]] = {}
    history: list[dict[str, Any]] = []
    train_start = time.perf_counter()
    stopped_early = False
    bar = tqdm(total=settings.steps, desc=f"finetune {name}", disable=not progress, mininterval=2, file=sys.stdout)
    step = 0
    while step < settings.steps:
        rng = np.random.default_rng([settings.seed, step])
        parts: list[tuple[str, dict, float]] = []  # (kind, batch, loss weight) summed into one update
        if joint or rng.random() >= replay_ratio:
            chosen = [examples[i] for i in sampler.draw(step)]
            parts.append((f"corrections_{chosen[0].task}", collate.corrections(chosen), 1.0 - replay_ratio if joint
                          else 1.0))
        if joint or not parts:
            task, indices, task_rng = replay_sampler.draw(step)
            parts.append((f"replay_{task}", collate(task, indices, task_rng), replay_ratio if joint else 1.0))
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, settings.steps, settings.warmup, settings.lr)
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for kind, batch, weight in parts:
            loss = model(batch)["loss"]
            (weight * loss).backward()
            total += weight * float(loss.detach())
            window.setdefault(kind, []).append(float(loss.detach()))
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        step += 1
        bar.update(1)
        window.setdefault("all", []).append(total)
        if step % settings.log_every == 0 or step == settings.steps:
            row = {"step": step, **{f"loss_{k}": round(float(np.mean(v)), 5) for k, v in window.items()},
                   "seconds": round(time.perf_counter() - train_start, 1)}
            history.append(row)
            bar.set_postfix(loss=f"{row['loss_all']:.3f}")
            store.update_finetune_run(run_id, metrics={"step": step, "loss": row["loss_all"],
                                                       "seconds": row["seconds"]})
            window = {}
        if settings.max_minutes is not None and time.perf_counter() - train_start > 60 * settings.max_minutes:
            stopped_early = step < settings.steps
            break
    bar.close()
    train_seconds = time.perf_counter() - train_start
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    card = {"training": f"The weights of `{settings.base}` plus the LoRA adapter `{name}` (active), trained by "
                        f"`python -m training.finetune` on {len(examples)} stored corrections for {step} steps "
                        f"(finetune run {run_id} in the annotation store)."}
    model.save_pretrained(out, dtype=_checkpoint_dtype(Path(settings.base)),  # base + adapters/<name>/ (active)
                          model_card_kwargs=card)
    return {"adapter": name, "steps": step, "stopped_early": stopped_early,
            "train_seconds": round(train_seconds, 1), "final_loss": history[-1]["loss_all"] if history else None,
            "history": history, "examples": len(examples),
            "replay_images": len(replay.records) if replay is not None else 0}


# ---------------------------------------------------------------------------- command line


@contextlib.contextmanager
def sigterm_as_exit() -> Iterator[None]:
    """Within the block, SIGTERM raises SystemExit, so a killed run is still recorded as failed (CLI only:
    signal handlers belong to the main thread). The previous handler comes back afterwards."""

    def handler(signum: int, frame: Any) -> None:
        raise SystemExit(f"terminated by signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not Path(args.db).is_file():
        print(f"no annotation store at {args.db}", file=sys.stderr)
        return 2
    if not args.replay_data:
        print("finetune: no --replay-data, so the adapter trains on corrections only and may lose old skills; "
              "for the embedded model: python -m training.shapes --out data/replay --split train --num 400 "
              "--seed 404, then --replay-data data/replay", file=sys.stderr)
    try:
        with sigterm_as_exit():
            summary = finetune(settings_from_args(args))
    except (ValueError, StoreError, OSError) as err:
        print(f"finetune: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl+C: one line like SIGTERM's, not a traceback from wherever the loop was
        print(f"finetune: interrupted; {args.out} is as it was before the run (a run already recorded in the store "
              "is marked failed): run the command again to start over", file=sys.stderr)
        return 130
    print(f"adapter {summary['adapter']} ({summary['examples']} samples from "
          f"{summary['corrections']['corrections']} corrections, {summary['steps']} steps, "
          f"{summary['train_seconds']:.0f} s) -> {summary['adapter_dir']}")
    print(f"serve it: python app.py --checkpoint {summary['checkpoint']}  "
          f"(or PixelLLM.from_pretrained({summary['checkpoint']!r}))")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

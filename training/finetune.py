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

Correction -> training sample (one rule, shared with `training.export`):
- image: the stored file (`pixelllm.image.load_image` -> `to_model_input`);
- prompt: what the corrected generation used (`generation.prompts`: box, points + labels, text); none = the
  global box;
- caption corrections: tokens word by word (`encode_text` per word); each token inherits its word's target —
  the word's box normalised to [0, 1] (or, when the annotator recorded a trace, the LN target of that trace:
  `training.export.correction_trace`); words flagged non-visual get no box supervision;
- referring corrections: each expression -> the corrected box at EOS (as the `refer` task trains it);
- dense corrections: each region caption under its corrected box as the box prompt.

Speed: the image encoder is frozen and carries no LoRA, so its features are computed once per image
(`image_features` batches) instead of at every step — the same numbers, about half the CPU. Losses whose graph
holds no LoRA tensor (proposal heatmaps, SAM masks prompted by ground-truth boxes) are not computed.

Outputs in --out: a full checkpoint (base weights in the base file's dtype + `adapters/<name>/` active, so
`PixelLLM.from_pretrained(out)` gives the fine-tuned model) and `finetune.json`. The run is recorded in the
store's `finetune_runs` (running -> metrics updates -> finished, or failed with the error). A running app loads
the adapter without a restart: `predictor.load_adapter(out / "adapters" / name, name)`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from pixelllm.adapters import check_adapter_name
from pixelllm.image import load_image, to_model_input
from pixelllm.modeling.image_encoder import ImageFeatures
from pixelllm.modeling.pixel_llm import PixelLLM
from pixelllm.store import AnnotationStore
from pixelllm.tokenizer import encode_text
from training.data.datasets import TASKS, Collator, MultiTaskSampler, ShapesData, TaskStream
from training.export import correction_trace
from training.train import lr_at

LOC_HEAD_TARGETS = (r"loc_head\.layers\.\d+",)
DEFAULT_REPLAY_TASKS = {"region_box": 2.0, "region_points": 1.0, "refer": 2.0, "sentence": 1.0}
FEATURE_BATCH = 16
REPLAY_MODES = ("alternate", "joint")


@dataclass
class FinetuneSettings:
    """Everything a fine-tuning run needs (the CLI flags; recorded as the run's params)."""

    db: str
    base: str
    out: str
    name: str | None = None  # adapter name; default: the --out folder's name
    steps: int = 600
    batch_size: int = 16
    lr: float = 2e-3
    warmup: int = 20
    rank: int | None = None  # LoRA rank; default: the base config's
    alpha: float | None = None  # LoRA alpha; default 2 * rank when --rank is given, else the config's
    extra_targets: tuple[str, ...] = LOC_HEAD_TARGETS
    statuses: tuple[str, ...] = ("submitted", "accepted")
    replay_data: str | None = None
    replay_split: str = "train"
    # Replay's share of each step's loss ("joint": every step = a corrections batch + a replay batch, one update)
    # or of the steps ("alternate"). Joint at 0.85 is the measured trade-off (docs/closing_the_loop.md).
    replay_ratio: float = 0.85
    replay_mode: str = "joint"
    replay_limit: int | None = 800  # replay images held in memory
    replay_tasks: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_REPLAY_TASKS))
    max_tokens: int = 48
    seed: int = 0
    threads: int | None = None
    log_every: int = 10
    max_minutes: float | None = None  # stop early (and say so) when the training loop exceeds this

    def check(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError("steps and batch size must be at least 1")
        if not 0.0 <= self.replay_ratio <= 1.0:
            raise ValueError(f"replay ratio must be in [0, 1], got {self.replay_ratio}")
        if self.replay_mode not in REPLAY_MODES:
            raise ValueError(f"replay mode must be one of {REPLAY_MODES}, got {self.replay_mode!r}")
        if self.rank is not None and self.rank < 1:
            raise ValueError(f"LoRA rank must be at least 1, got {self.rank}")
        unknown = set(self.replay_tasks) - set(TASKS)
        if unknown:
            raise ValueError(f"unknown replay tasks {sorted(unknown)}; known: {TASKS}")


def grouped_batch_sizes(collate: Collator, batch_size: int) -> dict[str, int]:
    """Images per replay batch of the grouped tasks, whose item is an image bringing up to `*_per_image` rows:
    `batch_size // per_image` of them (at least one), so a grouped batch has about `batch_size` rows like every
    other batch, not `batch_size x per_image`."""
    return {"refer_image": max(1, batch_size // collate.refer_per_image),
            "region_image": max(1, batch_size // collate.region_per_image)}


# ---------------------------------------------------------------------------- image features


class FeatureBank:
    """Image-encoder features of a list of images, computed once (the encoder is frozen during finetuning).

    pixels: 3xSxS uint8 model inputs. ``gather(indices)`` returns the ImageFeatures of those images, B rows."""

    def __init__(self, model: PixelLLM, pixels: list[torch.Tensor]) -> None:
        fused, sam, shared = [], [], True
        was_training = model.training
        model.eval()
        with torch.no_grad():
            for start in range(0, len(pixels), FEATURE_BATCH):
                chunk = torch.stack(pixels[start:start + FEATURE_BATCH]).float().to(model.device)
                feats = model.encode_image(chunk)
                shared &= feats.sam is feats.fused
                fused.append(feats.fused)
                sam.append(feats.sam)
        model.train(was_training)
        self.fused = torch.cat(fused) if fused else torch.empty(0)
        self.sam = self.fused if shared else torch.cat(sam)

    def gather(self, indices: list[int]) -> ImageFeatures:
        idx = torch.as_tensor(indices, dtype=torch.long, device=self.fused.device)
        fused = self.fused.index_select(0, idx)
        return ImageFeatures(fused=fused, sam=fused if self.sam is self.fused else self.sam.index_select(0, idx))


# ---------------------------------------------------------------------------- corrections -> samples


@dataclass
class CorrectionExample:
    """One training sample from a correction. Coordinates normalised to [0, 1] of the image.

    task: "caption" (words with per-word boxes under a prompt) or "refer" (one expression -> box at EOS);
    words: n words; word_boxes: (n, 4); supervised: (n,) bool, False for non-visual words;
    box: (4,) box prompt or None; points: (N, 2) + point_labels (N,) or None; text: text prompt or None.
    """

    correction_id: int
    image: int  # row of the corrections' FeatureBank
    task: str
    words: list[str]
    word_boxes: np.ndarray
    supervised: np.ndarray
    box: np.ndarray | None = None
    points: np.ndarray | None = None
    point_labels: np.ndarray | None = None
    text: str | None = None

    @property
    def group(self) -> tuple:
        """Examples of one group batch together (same prompt structure)."""
        if self.task == "refer":
            return ("refer",)
        return ("caption", self.box is not None, self.points is not None)


def _norm_box(box: Any, width: float, height: float) -> np.ndarray | None:
    try:
        x0, y0, x1, y1 = (float(v) for v in box)
    except (TypeError, ValueError):
        return None
    b = np.clip(np.array([x0 / width, y0 / height, x1 / width, y1 / height]), 0.0, 1.0)
    x0, x1 = sorted(b[[0, 2]])
    y0, y1 = sorted(b[[1, 3]])
    return np.array([x0, y0, max(x1, x0 + 1e-3), max(y1, y0 + 1e-3)], dtype=np.float32)


def _caption_prompt(prompts: Any, width: float, height: float) -> dict[str, Any]:
    """generation.prompts (pixels of the stored image) -> normalised box / points / text; none = global box."""
    prompts = prompts if isinstance(prompts, dict) else {}
    box = _norm_box(prompts["box"], width, height) if prompts.get("box") is not None else None
    points = labels = None
    raw = prompts.get("points") or []
    if len(raw):
        pts = np.asarray(raw, dtype=np.float32).reshape(-1, 2) / np.array([width, height], np.float32)
        labels = np.asarray(prompts.get("point_labels") or [1] * len(pts), dtype=np.int64).reshape(-1)
        if len(labels) == len(pts) and (labels == 1).any():
            points = np.clip(pts, 0.0, 1.0)
        else:
            labels = None
    if box is None and points is None:
        box = np.array([0.0, 0.0, 1.0, 1.0], dtype=np.float32)  # the global box (the paper's default prompt)
    text = prompts.get("text") if isinstance(prompts.get("text"), str) and prompts["text"].strip() else None
    return {"box": box, "points": points, "point_labels": labels, "text": text}


def correction_examples(store: AnnotationStore, image_size: int, statuses: tuple[str, ...] = ("submitted", "accepted")
                        ) -> tuple[list[CorrectionExample], list[torch.Tensor], dict[str, int]]:
    """Training samples from the heads of correction chains with a status in ``statuses``.

    Returns the samples, the images' model inputs (3xSxS uint8, indexed by ``CorrectionExample.image``) and counts
    (corrections used, skipped and why)."""
    examples: list[CorrectionExample] = []
    pixels: list[torch.Tensor] = []
    image_rows: dict[str, int] = {}
    counts = {"corrections": 0, "skipped_no_words": 0, "skipped_missing_image": 0}
    generations: dict[int, dict | None] = {}
    for row in store.training_examples(statuses):
        if not row["words"]:
            counts["skipped_no_words"] += 1
            continue
        sha = row["image_sha"]
        if sha not in image_rows:
            try:
                image = load_image(row["image_path"])
            except (OSError, ValueError):
                counts["skipped_missing_image"] += 1
                continue
            image_rows[sha] = len(pixels)
            pixels.append(to_model_input(image, image_size).round().to(torch.uint8))
        gen_id = row.get("generation_id")
        if gen_id is not None and gen_id not in generations:
            generations[gen_id] = store.get_generation(gen_id)
        generation = generations.get(gen_id) if gen_id is not None else None
        task = generation["task"] if generation else "caption"
        width, height = float(row["image_width"]), float(row["image_height"])
        made = 0
        if task == "refer":
            for text, box in zip(row["words"], row["boxes"]):
                b = _norm_box(box, width, height)
                examples.append(CorrectionExample(row["id"], image_rows[sha], "refer", [text], b[None], np.ones(1, bool)))
                made += 1
        elif task == "dense":
            for text, box in zip(row["words"], row["boxes"]):
                b = _norm_box(box, width, height)
                words = text.split()
                if words:
                    examples.append(CorrectionExample(row["id"], image_rows[sha], "caption", words,
                                                      np.repeat(b[None], len(words), 0), np.ones(len(words), bool),
                                                      box=b))
                    made += 1
        else:
            trace = correction_trace(row)
            supervised = ~np.isin(trace.word_index, np.asarray(row.get("non_visual") or [], dtype=np.int64))
            prompt = _caption_prompt(generation["prompts"] if generation else None, width, height)
            examples.append(CorrectionExample(row["id"], image_rows[sha], "caption", trace.words,
                                              np.clip(trace.boxes, 0.0, 1.0).astype(np.float32), supervised, **prompt))
            made += 1
        counts["corrections"] += made > 0
    return examples, pixels, counts


# ---------------------------------------------------------------------------- batches


class FinetuneCollator(Collator):
    """`Collator` whose batches carry precomputed image features (`image_features`) instead of pixels, with the
    LoRA-relevant targets only (no proposal `gt_boxes`, no SAM `masks`), plus batches of correction samples."""

    def __init__(self, data: ShapesData | None, tokenizer: Any, image_size: int, *, replay_bank: FeatureBank | None,
                 correction_bank: FeatureBank, max_tokens: int) -> None:
        super().__init__(data, tokenizer, image_size, max_tokens=max_tokens)
        self.replay_bank = replay_bank
        self.correction_bank = correction_bank

    def _common(self, recs: list) -> dict:  # replay batches: features instead of images, no proposal targets
        return {"image_features": self.replay_bank.gather([self.data.index[r.image_id] for r in recs])}

    def __call__(self, task: str, indices: list[int], rng: np.random.Generator) -> dict:
        batch = super().__call__(task, indices, rng)
        batch.pop("masks", None)
        batch.pop("mask_valid", None)
        return batch

    def corrections(self, examples: list[CorrectionExample]) -> dict:
        """A batch of correction samples of one group (see `CorrectionExample.group`)."""
        batch: dict[str, Any] = {"image_features": self.correction_bank.gather([ex.image for ex in examples])}
        if examples[0].task == "refer":
            seqs = [(encode_text(self.tokenizer, ex.words[0], eos=False), np.zeros((0, 4), np.float32), False)
                    for ex in examples]
            batch.update(self._pad_targets(seqs))
            batch["refer_boxes"] = torch.tensor(np.stack([ex.word_boxes[0] for ex in examples]), dtype=torch.float32)
            batch["refer_valid"] = torch.ones(len(examples), dtype=torch.bool)
            return batch
        seqs, token_supervised = [], []
        for ex in examples:
            ids, boxes = self._word_tokens(ex.words, ex.word_boxes)
            pieces = [len(encode_text(self.tokenizer, w, eos=False)) for w in ex.words]
            token_supervised.append(np.repeat(ex.supervised, pieces))
            seqs.append((ids, boxes, True))
        batch.update(self._pad_targets(seqs))
        mask = batch["token_box_mask"]
        for i, sup in enumerate(token_supervised):
            n = min(len(sup), mask.shape[1])
            mask[i, :n] &= torch.from_numpy(sup[:n])
        if examples[0].box is not None:
            batch["prompt_boxes"] = torch.tensor(np.stack([ex.box for ex in examples]), dtype=torch.float32)
        if examples[0].points is not None:
            width = max(len(ex.points) for ex in examples)
            points = np.zeros((len(examples), width, 2), np.float32)
            labels = np.full((len(examples), width), -1, np.int64)  # -1: SAM's padding ("not a point")
            for i, ex in enumerate(examples):
                points[i, : len(ex.points)] = ex.points
                labels[i, : len(ex.points)] = ex.point_labels
            batch["prompt_points"] = torch.from_numpy(points)
            batch["point_labels"] = torch.from_numpy(labels)
        if any(ex.text for ex in examples):
            prompts = [encode_text(self.tokenizer, ex.text, eos=False)[:64] if ex.text else [] for ex in examples]
            batch.update(self._pad_prompts(prompts))
        return batch


class CorrectionSampler:
    """Batches of correction samples: a group is drawn with probability proportional to its size, then the
    group's next indices (epoch-shuffled, `TaskStream`)."""

    def __init__(self, examples: list[CorrectionExample], batch_size: int, seed: int) -> None:
        groups: dict[tuple, list[int]] = {}
        for i, ex in enumerate(examples):
            groups.setdefault(ex.group, []).append(i)
        self.groups = list(groups.values())
        sizes = np.array([len(g) for g in self.groups], dtype=np.float64)
        self.probs = sizes / sizes.sum()
        self.streams = [TaskStream(len(g), min(batch_size, len(g)), seed + k, 0, 1) for k, g in enumerate(self.groups)]
        self.seed = seed

    def draw(self, step: int) -> list[int]:
        k = int(np.random.default_rng([self.seed, step, 7]).choice(len(self.groups), p=self.probs))
        return [self.groups[k][i] for i in self.streams[k].next_batch()]


# ---------------------------------------------------------------------------- the run


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

    ``store`` defaults to ``AnnotationStore(settings.db)`` (closed afterwards). Raises ``ValueError`` when there
    is nothing to train on; any failure after the run was recorded marks it ``failed`` and re-raises."""
    settings.check()
    out = Path(settings.out)
    name = check_adapter_name(settings.name or out.name)
    if settings.threads:
        torch.set_num_threads(int(settings.threads))
    own_store = store is None
    store = AnnotationStore(settings.db) if own_store else store
    try:
        return _run(settings, store, out, name, progress)
    finally:
        if own_store:
            store.close()


def _run(settings: FinetuneSettings, store: AnnotationStore, out: Path, name: str, progress: bool) -> dict[str, Any]:
    began = time.perf_counter()
    torch.manual_seed(settings.seed)
    model, trainable = load_base_with_adapter(settings, name)
    size = model.config.image_size
    examples, pixels, counts = correction_examples(store, size, tuple(settings.statuses))
    if not examples:
        raise ValueError(f"no usable corrections with status {'/'.join(settings.statuses)} in {settings.db}")
    params = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(settings).items()}
    params.update({"adapter": name, "trainable_tensors": len(trainable),
                   "trainable_parameters": int(sum(p.numel() for p in model.parameters() if p.requires_grad)),
                   "examples": len(examples)})
    run_id = store.start_finetune_run(name, str(settings.base), num_corrections=counts["corrections"], params=params)
    try:
        summary = _train(settings, store, run_id, model, trainable, examples, pixels, out, name, progress, began)
    except BaseException as err:
        store.finish_finetune_run(run_id, status="failed", metrics={"error": f"{type(err).__name__}: {err}"})
        raise
    summary.update({"run_id": run_id, "corrections": counts, "params": params})
    (out / "finetune.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return summary


def _train(settings: FinetuneSettings, store: AnnotationStore, run_id: int, model: PixelLLM, trainable: list[str],
           examples: list[CorrectionExample], pixels: list[torch.Tensor], out: Path, name: str, progress: bool,
           began: float) -> dict[str, Any]:
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
    adapter_dir = out / "adapters" / name
    final = {"steps": step, "stopped_early": stopped_early, "train_seconds": round(train_seconds, 1),
             "total_seconds": round(time.perf_counter() - began, 1),
             "final_loss": history[-1]["loss_all"] if history else None}
    store.finish_finetune_run(run_id, status="finished", metrics=final, adapter_path=str(adapter_dir.resolve()))
    return {"adapter": name, "adapter_dir": str(adapter_dir), "checkpoint": str(out), **final, "history": history,
            "examples": len(examples), "replay_images": len(replay.records) if replay is not None else 0}


# ---------------------------------------------------------------------------- command line


def parse_task_weights(text: str) -> dict[str, float]:
    tasks = {}
    for item in text.split(","):
        if item.strip():
            task, _, weight = item.partition("=")
            tasks[task.strip()] = float(weight or 1.0)
    return tasks


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training.finetune", description=__doc__.split("\n\n")[0])
    parser.add_argument("--db", default="data/annotations.db", help="annotation store")
    parser.add_argument("--base", default="assets/checkpoints/shapes-tiny", help="base checkpoint directory")
    parser.add_argument("--out", required=True, help="output folder (checkpoint + adapters/<name>/)")
    parser.add_argument("--name", default=None, help="adapter name (default: the --out folder's name)")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--rank", type=int, default=None, help="LoRA rank (default: the base config's)")
    parser.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default 2*rank with --rank)")
    parser.add_argument("--extra-targets", default=",".join(LOC_HEAD_TARGETS),
                        help="comma-separated module-name regexes LoRA adapts besides the LM's q/v "
                             "(default: the location head's layers)")
    parser.add_argument("--statuses", default="submitted,accepted", help="correction statuses to train on")
    parser.add_argument("--replay-data", default=None, help="Shapes data folder replayed to keep old skills")
    parser.add_argument("--replay-split", default="train")
    parser.add_argument("--replay-ratio", type=float, default=0.85,
                        help="replay's share: of the batches (alternate) or of each step's loss (joint)")
    parser.add_argument("--replay-mode", choices=REPLAY_MODES, default="joint",
                        help="alternate: each step is a corrections or a replay batch; joint: each step "
                             "trains on one of each (twice the compute per step)")
    parser.add_argument("--replay-limit", type=int, default=800, help="replay images held in memory")
    parser.add_argument("--replay-tasks", default=",".join(f"{k}={v:g}" for k, v in DEFAULT_REPLAY_TASKS.items()),
                        help="replay task weights, e.g. region_box=2,refer=2,sentence=1; the grouped tasks "
                             "(refer_image, region_image) take batch-size // 8 images, about batch-size rows")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--max-minutes", type=float, default=None, help="stop the loop after this many minutes")
    return parser


def settings_from_args(args: argparse.Namespace) -> FinetuneSettings:
    return FinetuneSettings(
        db=args.db, base=args.base, out=args.out, name=args.name, steps=args.steps, batch_size=args.batch_size,
        lr=args.lr, warmup=args.warmup, rank=args.rank, alpha=args.alpha,
        extra_targets=tuple(t for t in args.extra_targets.split(",") if t.strip()),
        statuses=tuple(s.strip() for s in args.statuses.split(",") if s.strip()),
        replay_data=args.replay_data, replay_split=args.replay_split, replay_ratio=args.replay_ratio,
        replay_mode=args.replay_mode, replay_limit=args.replay_limit,
        replay_tasks=parse_task_weights(args.replay_tasks), max_tokens=args.max_tokens,
        seed=args.seed, threads=args.threads, log_every=args.log_every, max_minutes=args.max_minutes)


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
    except ValueError as err:
        print(f"finetune: {err}", file=sys.stderr)
        return 2
    print(f"adapter {summary['adapter']} ({summary['examples']} samples from "
          f"{summary['corrections']['corrections']} corrections, {summary['steps']} steps, "
          f"{summary['train_seconds']:.0f} s) -> {summary['adapter_dir']}")
    print(f"load it in a running app: predictor.load_adapter({summary['adapter_dir']!r}, {summary['adapter']!r}); "
          f"or PixelLLM.from_pretrained({summary['checkpoint']!r})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Annotators' corrections as fine-tuning samples and batches (used by `training.finetune`).

Correction -> training sample (one rule, shared with `training.export`):
- image: the stored file (`pixelllm.image.load_image` -> `to_model_input`), encoded once (`FeatureBank`: the
  image encoder is frozen and carries no LoRA during finetuning);
- prompt: what the corrected generation used (`generation.prompts`: box, points + labels, text); none = the
  global box;
- caption corrections: tokens word by word (`encode_text` per word); each token inherits its word's target —
  the word's box normalised to [0, 1] (or, when the annotator recorded a trace, the LN target of that trace:
  `training.export.correction_trace`); words flagged non-visual get no box supervision;
- referring corrections: each expression -> the corrected box at EOS (as the `refer` task trains it);
- dense corrections: each region caption under its corrected box as the box prompt.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pixelllm.image import load_image, to_model_input
from pixelllm.modeling.image_encoder import ImageFeatures
from pixelllm.modeling.pixel_llm import PixelLLM
from pixelllm.store import AnnotationStore
from pixelllm.tokenizer import encode_text
from training.data.datasets import Collator, ShapesData
from training.data.sampling import TaskStream
from training.export import correction_trace

FEATURE_BATCH = 16


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
                examples.append(CorrectionExample(row["id"], image_rows[sha], "refer", [text], b[None],
                                                  np.ones(1, bool)))
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

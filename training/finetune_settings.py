"""The settings of a fine-tuning run (`FinetuneSettings`), the command line that makes them, and the checks of
them done before anything trains: the settings' own ranges, the --out folder, the --extra-targets patterns and the
--replay-tasks weights. `training.finetune` (the run) imports them from here and re-exports them.
"""

from __future__ import annotations

import argparse
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft.tuners.tuners_utils import BaseTunerLayer

from pixelllm.modeling.pixel_llm import PixelLLM
from training.data.datasets import TASKS

# the first paragraph of training.finetune's docstring: what `python -m training.finetune --help` says it does
DESCRIPTION = "Fine-tune a LoRA adapter on annotators' corrections, with replay of the base training data."
LOC_HEAD_TARGETS = (r"loc_head\.layers\.\d+",)
DEFAULT_REPLAY_TASKS = {"region_box": 2.0, "region_points": 1.0, "refer": 2.0, "sentence": 1.0}
REPLAY_MODES = ("alternate", "joint")
UNTRAINED_HEADS = ("proposal_head", "mask_head")  # finetuning batches carry no proposal or mask targets


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

    def __post_init__(self) -> None:  # paths may come as Path objects; the run's params are JSON
        for key in ("db", "base", "out", "replay_data"):
            if isinstance(getattr(self, key), os.PathLike):
                setattr(self, key, os.fspath(getattr(self, key)))

    def check(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError("steps and batch size must be at least 1")
        if self.log_every < 1 or self.warmup < 0:
            raise ValueError(f"log every must be at least 1 and warm-up at least 0, got {self.log_every} and "
                             f"{self.warmup}")
        if not 0.0 <= self.replay_ratio <= 1.0:
            raise ValueError(f"replay ratio must be in [0, 1], got {self.replay_ratio}")
        if self.replay_mode not in REPLAY_MODES:
            raise ValueError(f"replay mode must be one of {REPLAY_MODES}, got {self.replay_mode!r}")
        if self.rank is not None and self.rank < 1:
            raise ValueError(f"LoRA rank must be at least 1, got {self.rank}")
        unknown = set(self.replay_tasks) - set(TASKS)
        if unknown:
            raise ValueError(f"unknown replay tasks {sorted(unknown)}; known: {TASKS}")


def check_out(out: Path) -> None:
    """Refuse, before anything trains, an --out the run could not write or must not replace: not a file, nor the
    working directory or a folder holding it, and in a folder this user can write (made here: the run's lock file
    goes there too). What is in --out and beside it is looked at under the lock (`claim_out`)."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder")
    if out == Path.cwd().resolve() or out in Path.cwd().resolve().parents:
        raise ValueError(f"--out {out} is the working directory or holds it: give a folder of its own, e.g. runs/ft1")
    out.parent.mkdir(parents=True, exist_ok=True)
    if not os.access(out.parent, os.W_OK):
        raise ValueError(f"--out {out}: cannot write in {out.parent}")


def check_extra_targets(model: PixelLLM, patterns: tuple[str, ...], base: str) -> None:
    """Refuse an --extra-targets pattern that matches no module (peft skips it: a typo trained without it), or
    that matches a module LoRA must not adapt here, naming them: one in the image encoder (its features are
    computed once, before training), in a head finetuning computes no loss for (it would stay untrained), or not
    a Linear layer (peft's error printed the whole module)."""
    modules = {name: module for name, module in model.named_modules() if name}  # "": the model itself
    for pattern in patterns:
        try:
            matched = [name for name in modules if re.fullmatch(pattern, name)]
        except re.error as err:
            raise ValueError(f"--extra-targets {pattern} is not a regular expression: {err}") from None
        if not matched:
            raise ValueError(f"--extra-targets {pattern} matches no module of {base} (it must match a module's "
                             f"whole name, e.g. {LOC_HEAD_TARGETS[0]} for the location head's layers)")
        reasons = {name: _not_a_target(name, modules[name]) for name in matched}
        why = next((reason for reason in reasons.values() if reason), None)
        if why:
            names = [name for name, reason in reasons.items() if reason == why]
            shown = ", ".join(f"{name} ({type(modules[name]).__name__})" for name in names[:3])
            more = f" and {len(names) - 3} more" if len(names) > 3 else ""
            raise ValueError(f"--extra-targets {pattern} matches {shown}{more}: {why}")


def _not_a_target(name: str, module: torch.nn.Module) -> str | None:
    """Why LoRA on the module `name` could not train in finetuning, or None."""
    component = name.split(".")[0]
    if component == "image_encoder":
        return "the image encoder stays frozen (its features are computed once, before training)"
    if component in UNTRAINED_HEADS:
        return "finetuning computes no loss through the proposal and mask heads: LoRA there would stay untrained"
    # a base that carries an adapter already (a finetune's checkpoint) has its targets wrapped by peft, which adds
    # the new adapter beside the old one: the wrapped layer is what counts
    if isinstance(module, BaseTunerLayer):
        module = module.get_base_layer()
    if not isinstance(module, torch.nn.Linear):  # peft refuses a block or a norm; an embedding's LoRA never trained
        return f"finetuning trains LoRA on Linear layers only (e.g. {LOC_HEAD_TARGETS[0]})"
    return None


# ---------------------------------------------------------------------------- command line


def parse_task_weights(text: str) -> dict[str, float]:
    """`--replay-tasks`' `task=weight,...` (a bare task weighs 1); a weight that is no number, not finite or negative
    is a ValueError naming the flag and the item (float's own message named neither)."""
    tasks = {}
    for item in text.split(","):
        if item.strip():
            task, _, weight = item.partition("=")
            try:
                value = float(weight or 1.0)
            except ValueError:
                raise ValueError(f"--replay-tasks {item.strip()!r}: the weight is not a number (give task=weight, "
                                 "e.g. region_box=2)") from None
            if not 0 <= value < math.inf:  # nan, inf: "params must be JSON-serialisable"; -1: the task silently dropped
                raise ValueError(f"--replay-tasks {item.strip()!r}: the weight must be finite and at least 0 (0 leaves "
                                 "the task out)")
            tasks[task.strip()] = value
    return tasks


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training.finetune", description=DESCRIPTION,
                                     allow_abbrev=False)
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

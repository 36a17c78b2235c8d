"""Train PixelLLM: `python -m training.train --config training/configs/shapes_tiny.yaml [--key.path=value ...]`.

One straight script in nanoGPT's spirit: config -> DDP detection (torchrun sets RANK/WORLD_SIZE; gloo on CPU, nccl
on GPU) -> data -> model (scratch, or a checkpoint) -> stages -> loop with rank-0 logging and checkpoints.
Stages follow the paper (caption pretraining; LN joint caption + trace; multi-task) and each names the trainable
set (`PixelLLM.set_stage`). A killed run resumes from `<out>/checkpoint` (model safetensors + trainer state:
step, optimizer, scheduler, sampler positions), written atomically.

The config's reading and its checks done before any work (`load_config`, `check_config`) are in
`training.train_config`; every name there is importable from here too.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from pixelllm.build import build_pixelllm
from pixelllm.config import PRESETS, get_config
from pixelllm.model_card import training_summary
from pixelllm.modeling.pixel_llm import PixelLLM
from pixelllm.tokenizer import train_tokenizer
from training.data.datasets import TASKS, Collator, ShapesData, read_jsonl
from training.data.localized_narratives import read_localized_narratives
from training.data.sampling import MultiTaskSampler
from training.data.shapes import unfinished_split
from training.run_folder import (
    DECODING_ONLY,
    check_can_write,
    check_same_run,
    export_folder,
    find_resume,
    save_checkpoint,
    save_swapped,
    trained_steps,
)
from training.train_config import (  # noqa: F401 - re-exported: callers use training.train.<name>
    EXPORT_DTYPES,
    GENERATE_KEYS,
    GENERATE_OPTIONS,
    NUMBERS,
    SECTION_KEYS,
    TRAIN_KEYS,
    check_config,
    check_generate,
    check_number,
    load_config,
    read_number,
)


# ---------------------------------------------------------------------------- distributed
def setup_distributed() -> tuple[int, int, torch.device]:
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}") if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    return rank, world, device


# ---------------------------------------------------------------------------- data
def ensure_data(cfg: dict, rank: int, world: int) -> None:
    """Generate missing Shapes splits listed under data.generate (rank 0; others wait)."""
    root = Path(cfg["data"]["root"])
    if rank == 0:
        for split, spec in (cfg["data"].get("generate") or {}).items():
            if not (root / f"{split}.objects.jsonl").is_file():
                from training.data.shapes import generate_split

                print(f"generating Shapes split {split!r}: {spec}", flush=True)
                try:
                    generate_split(root, split, int(spec["num"]), int(spec["seed"]), **spec.get("options", {}))
                except ValueError as err:  # another run generating the same split right now
                    raise SystemExit(f"data.generate {split}: {err}") from None
    if world > 1:
        dist.barrier()


def tokenizer_corpus(root: Path, split: str) -> list[str]:
    """The texts a from-scratch tokenizer is trained on: the split's narratives (as the LN reader keeps them: a bad
    line is skipped and counted), referring expressions and region captions. ValueError when there are none (a
    tokenizer trained on nothing knows single bytes only)."""
    ln, refer, dense = (root / f"{split}.{kind}.jsonl" for kind in ("ln", "refer", "dense"))
    texts = [s.caption for s in read_localized_narratives(ln)[0]] if ln.is_file() else []
    texts += [r["expression"] for r in read_jsonl(refer, "refer")] if refer.is_file() else []
    texts += [g["caption"] for r in read_jsonl(dense, "dense") for g in r.get("regions", [])] if dense.is_file() else []
    if not any(t.strip() for t in texts):
        raise ValueError(f"{root}: split {split!r} holds no text to build the tokenizer from (no narratives, "
                         "referring expressions or region captions)")
    return texts


def check_split(root: Path, split: str) -> None:
    """The training split exists: one of its files is in data.root (a typo'd root or split was a traceback)."""
    problem = unfinished_split(root, split)
    if problem:
        raise SystemExit(f"data.root: {problem}")
    kinds = ("ln", "refer", "dense", "objects")
    if not any((root / f"{split}.{kind}.jsonl").is_file() for kind in kinds):
        raise SystemExit(f"data.root {root}: no split {split!r} there (none of "
                         f"{', '.join(f'{split}.{kind}.jsonl' for kind in kinds)}); generate it (data.generate, "
                         "python -m training.shapes) or convert a dataset into it (docs/data_formats.md)")


# ---------------------------------------------------------------------------- logs and optimisation
def drop_rows_after(metrics_path: Path, step: int) -> None:
    """Forget the metric rows a killed run logged after its last checkpoint: the resumed run trains those steps
    again and logs them anew, so the curve has one row per step and task. A line cut short by the kill goes too."""
    if not metrics_path.exists():
        return

    def kept_row(line: str) -> bool:
        try:
            return json.loads(line)["step"] <= step
        except (json.JSONDecodeError, KeyError, TypeError):
            return False

    lines = metrics_path.read_text().splitlines()
    kept = [line for line in lines if kept_row(line)]
    if len(kept) < len(lines):
        metrics_path.write_text("".join(line + "\n" for line in kept))


def plot_losses(metrics_path: Path, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "loss" in r]
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for task in sorted({r["task"] for r in rows}):
        pts = [(r["step"], r["loss"]) for r in rows if r["task"] == task]
        ax.plot(*zip(*pts), label=task, lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def autocast_context(device: torch.device, name: str | None):
    """`train.autocast`: "" (off, the default) or a torch dtype name ("bfloat16"). Mixed precision: weights,
    gradients and optimizer state stay float32; torch.autocast picks each op's precision (matmuls in the dtype).
    On this machine's AMX CPU a tiny-preset multi-task step is ~1.13x faster (README); elsewhere it may be slower."""
    if not name:
        return torch.autocast(device.type, enabled=False)
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype) or dtype not in (torch.bfloat16, torch.float16):
        raise SystemExit(f"train.autocast must be bfloat16 or float16 (or empty for off), not {name!r}")
    return torch.autocast(device.type, dtype=dtype)


def lr_at(step: int, total: int, warmup: int, peak: float) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def param_groups(named: list[tuple[str, torch.nn.Parameter]], weight_decay: float, lm_lr_scale: float
                 ) -> list[dict[str, Any]]:
    """AdamW groups: weight decay on matrices only; the T5 language model at `lm_lr_scale` x the peak LR.

    Measured on the tiny preset trained from scratch on Shapes (README, "The embedded model"): with T5 at the
    same 1e-3 as the rest, information from the visual prefix stops getting through T5 (a probe that only has to
    copy the prompt box into every token's box stays near the mean-box L1: 0.76 after 100 steps, 0.82 after 150
    at 3e-4), while T5 at 1e-4 learns it (0.79 -> 0.29 in 150 steps); read from the encoder alone, a frozen
    random T5 passes it (0.64 -> 0.14 in 150 steps) and one trained at 1e-3 barely (0.95 -> 0.55 in 100).
    """
    groups = []
    for is_lm in (False, True):
        for decay in (True, False):
            params = [p for n, p in named if n.startswith("language_model.") == is_lm and (p.ndim >= 2) == decay]
            if params:
                groups.append({"params": params, "weight_decay": weight_decay if decay else 0.0,
                               "lr_scale": lm_lr_scale if is_lm else 1.0})
    return groups


# ---------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.train", description=__doc__.split("\n")[0],
                                     allow_abbrev=False)
    parser.add_argument("--config", required=True)
    args, overrides = parser.parse_known_args(argv)
    if not Path(args.config).is_file():
        parser.error(f"--config {args.config}: no such file")
    try:
        cfg = load_config(args.config, overrides)
        check_config(cfg, args.config)
    except SystemExit as refused:
        usage_error(refused)
        raise
    try:
        return train(cfg, args.config)
    except Refused as refused:
        usage_error(refused)
        raise
    except KeyboardInterrupt:  # Ctrl+C: one line saying where the rerun resumes, not a traceback from the loop
        if int(os.environ.get("RANK", 0)) == 0:  # torchrun: every rank gets it; one line, one read of the checkpoint
            print(f"train: interrupted; {interrupted_at(Path(cfg['train']['out']))}", file=sys.stderr)
        return 130


class Refused(SystemExit):
    """A run refused before any work for what its train.out holds (`check_not_past_the_end`): a usage error, as a
    config `check_config` refuses (the other SystemExits of `train` are failures of the run: exit 1)."""


def usage_error(refused: SystemExit) -> None:
    """Make a refusal a usage error, as argparse's (`--config nope.yaml`): its one line printed and exit code 2
    (Python prints a str code itself, with exit 1). str(refused) stays the message."""
    if isinstance(refused.code, str):
        print(refused.code, file=sys.stderr)
        refused.code = 2


def interrupted_at(out: Path) -> str:
    """Where the rerun of an interrupted run starts: the step of its last checkpoint, or the beginning."""
    resume = find_resume(out)
    step = trained_steps(resume) if resume else 0
    if step is None:  # a checkpoint the rerun will refuse, naming it
        return f"the rerun of the same command resumes from {resume}"
    if not step:
        return "no checkpoint was saved yet: the same command starts the run over"
    return f"{resume} holds step {step}: run the same command again to resume from there"


def check_not_past_the_end(out: Path, resume: Path, total: int) -> None:
    """A train.out whose checkpoint has trained more steps than the config's stages add up to (a finished run's
    config rerun with fewer steps) is refused, the folder left as it was: the rerun trained nothing and rewrote
    `final/`, the export and `config.resolved.json` as a run of fewer steps, holding the longer run's weights."""
    step = trained_steps(resume)
    if step is not None and step > total:
        raise Refused(f"train.out {out}: the run there has already trained {step} steps ({resume}), more than "
                      f"the {total} of this config's stages; it is left as it was. To train the shorter run, give "
                      f"another train.out (or move {out} away); to go on with that run, give stages of at least "
                      f"{step} steps")


def train(cfg: dict[str, Any], config_path: str) -> int:
    """The run of a checked config (`check_config`): data, model, stages, final/ and the export."""
    rank, world, device = setup_distributed()
    tcfg = cfg["train"]
    torch.set_num_threads(max(1, int(tcfg.get("threads", os.cpu_count() or 1)) // world))
    amp = autocast_context(device, tcfg.get("autocast"))  # a bad name fails here, before any work
    unknown = set(tcfg.get("task_batch_size") or {}) - set(TASKS)
    if unknown:
        raise SystemExit(f"train.task_batch_size: unknown tasks {sorted(unknown)}; known: {', '.join(TASKS)}")
    out = Path(tcfg["out"])
    check_can_write(out, "train.out")
    export_dir = export_folder(cfg, out)  # refused here, before any work, if it is someone's folder
    resume = find_resume(out)
    if resume is not None:
        check_same_run(out, cfg)
        check_not_past_the_end(out, resume, sum(int(stage["steps"]) for stage in cfg["stages"]))
    ensure_data(cfg, rank, world)
    root = Path(cfg["data"]["root"])
    check_split(root, cfg["data"]["train_split"])

    # the config's model settings: the decoding defaults a resumed run takes, and each stage's `config:` fallbacks
    recipe_config = get_config(cfg["model"].get("preset", "tiny"), **cfg["model"].get("overrides", {}))
    if resume is not None:
        try:
            model = PixelLLM.from_pretrained(str(resume))
            trainer_state = torch.load(resume / "trainer_state.pt", map_location="cpu", weights_only=True)
        except (OSError, ValueError, RuntimeError) as err:  # RuntimeError: torch.load of a truncated file
            raise SystemExit(f"cannot resume from {resume}: {err}; move that folder away to start the run over"
                             ) from None
        for key in DECODING_ONLY:  # the config's decoding defaults, which check_same_run let differ from the run's
            name = key.rsplit(".", 1)[1]
            setattr(model.config, name, getattr(recipe_config, name))
    else:
        mcfg = cfg["model"]
        init = mcfg.get("init", "scratch")
        torch.manual_seed(int(tcfg.get("seed", 0)))
        if init == "scratch":
            config = get_config(mcfg.get("preset", "tiny"), **mcfg.get("overrides", {}))
            tok_dir = out / "tokenizer"
            if rank == 0 and not (tok_dir / "tokenizer.json").is_file():
                vocab = int(config.t5.vocab_size)
                try:
                    corpus = tokenizer_corpus(root, cfg["data"]["train_split"])
                except ValueError as err:
                    raise SystemExit(f"data: {err}") from None
                train_tokenizer(corpus, vocab).save_pretrained(tok_dir)
            if world > 1:
                dist.barrier()
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
            config.t5.vocab_size = max(config.t5.vocab_size, len(tokenizer))
            model = build_pixelllm(config, tokenizer=tokenizer)
        elif init in PRESETS:  # the preset's config with the overrides (build_pixelllm of a name took none)
            model = build_pixelllm(get_config(init, **mcfg.get("overrides", {})), **mcfg.get("components", {}))
        else:
            model = build_pixelllm(init, **mcfg.get("components", {}))
        trainer_state = {"step": 0}
    model.to(device).train()

    try:  # a malformed line is a ValueError naming its file and line
        data = ShapesData(root, cfg["data"]["train_split"], model.config.image_size, cfg["data"].get("limit"),
                          lazy=bool(cfg["data"].get("lazy", model.config.image_size > 256)))
    except ValueError as err:
        raise SystemExit(f"data: {err}") from None
    collate = Collator(data, model.tokenizer, model.config.image_size, max_tokens=int(tcfg.get("max_tokens", 96)),
                       refer_per_image=int(tcfg.get("refer_per_image", 8)),
                       region_per_image=int(tcfg.get("region_per_image", 8)))
    # per-task batch sizes (items per step over all ranks), e.g. {refer_image: 8}: 8 images, each with its expressions
    task_batch = {t: max(1, int(n) // world) for t, n in (tcfg.get("task_batch_size") or {}).items()}
    stages = cfg["stages"]
    bounds = np.cumsum([0] + [int(s["steps"]) for s in stages])
    total = int(bounds[-1])
    step = int(trainer_state["step"])
    metrics_path = out / "metrics.jsonl"
    if rank == 0:
        (out / "config.resolved.json").write_text(json.dumps(cfg, indent=2))
        drop_rows_after(metrics_path, step)
        print(f"PixelLLM {model.config.preset}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M params, "
              f"{len(data.records)} images, world={world}, resume from step {step}", flush=True)

    # A stage's `config:` (per-stage loss weights, e.g. loc_loss_weight) holds for that stage only: a field another
    # stage sets is back at the recipe's value in a stage that does not set it (also after a resume, whose
    # checkpoint saved the stage's values)
    staged = {}
    for stage in stages:
        for key in stage.get("config") or {}:  # each a scalar field of the config (check_config)
            staged[key] = getattr(recipe_config, key)
    while step < total:
        index = int(np.searchsorted(bounds, step, side="right") - 1)
        stage = stages[index]
        for key, value in {**staged, **(stage.get("config") or {})}.items():
            setattr(model.config, key, type(staged[key])(value))
        trainable = model.set_stage(stage.get("stage", "scratch"))
        if "adapter" in stage and stage["adapter"] not in model.adapters:
            model.add_adapter(stage["adapter"])
            trainable = model.set_stage(stage.get("stage", "scratch"))
        named = [(n, p) for n, p in model.named_parameters() if n in set(trainable)]
        params = [p for _, p in named]
        peak = float(stage.get("lr", tcfg["lr"]))
        optimizer = torch.optim.AdamW(param_groups(named, float(tcfg.get("weight_decay", 0.05)),
                                                   float(stage.get("lm_lr_scale", tcfg.get("lm_lr_scale", 1.0)))),
                                      lr=peak, betas=(0.9, 0.98))
        sampler = MultiTaskSampler(data, stage["tasks"], int(tcfg["batch_size"]) // world,
                                   int(tcfg.get("seed", 0)) + 1000 * index, rank, world, batch_sizes=task_batch)
        start, end = int(bounds[index]), int(bounds[index + 1])
        if trainer_state.get("stage_index") == index and step > start:
            # resumed inside this stage; a stage always starts with a fresh optimizer and sampler, also when the
            # run resumes at its first step (e.g. a stage appended to a finished run's config; older checkpoints
            # saved the finished stage's optimizer and sampler at its end, hence `step > start`)
            optimizer.load_state_dict(trainer_state["optimizer"])
            sampler.load_state(trainer_state["sampler"])
        # Tasks use different heads, hence find_unused_parameters. The only buffers are constants (pixel
        # mean/std, SAM's Fourier matrix), so no per-forward buffer broadcast; gradients live in the allreduce
        # buckets and are copied there per bucket, not per parameter (many small T5/SAM tensors).
        engine = DistributedDataParallel(model, find_unused_parameters=True, forward_sync_buffers=False,
                                         gradient_as_bucket_view=True, batched_grad_copy=True) \
            if world > 1 else model
        warmup = int(stage.get("warmup", tcfg.get("warmup", 100)))
        bar = tqdm(total=end - start, initial=step - start, desc=stage["name"], disable=rank != 0, mininterval=5,
                   file=sys.stdout)
        window: dict[str, list[float]] = {}
        last_log = time.time()
        samples = 0
        if trainer_state.get("stage_index") == index and step > start:
            # the steps since the last logged row, so that the first row after a resume averages the same steps
            window, samples = trainer_state.get("window", {}), trainer_state.get("samples", 0)
        while step < end:
            # Dropout, scheduled sampling and LoRA dropout draw from torch's global RNG: seeding it per step and
            # rank makes a resumed run draw what the uninterrupted run drew (the checkpoint holds no RNG state)
            torch.manual_seed(int(np.random.SeedSequence([int(tcfg.get("seed", 0)), step, rank]).generate_state(1)[0]))
            task, indices, rng = sampler.draw(step)
            batch = {k: v.to(device) for k, v in collate(task, indices, rng).items()}
            for group in optimizer.param_groups:
                group["lr"] = group["lr_scale"] * lr_at(step - start, end - start, warmup, peak)
            with amp:
                losses = engine(batch)
            optimizer.zero_grad(set_to_none=True)
            losses["loss"].backward()
            torch.nn.utils.clip_grad_norm_(params, float(tcfg.get("grad_clip", 1.0)))
            optimizer.step()
            step += 1
            samples += len(indices) * world
            bar.update(1)
            for k, v in losses.items():
                window.setdefault(f"{task}/{k}", []).append(float(v.detach()))
            if rank == 0 and (step % int(tcfg.get("log_every", 20)) == 0 or step == end):  # a stage's last too
                elapsed = time.time() - last_log
                for key in sorted({k.split("/")[0] for k in window}):
                    row = {"step": step, "stage": stage["name"], "task": key,
                           "lr": optimizer.param_groups[0]["lr"], "samples_per_s": samples / max(elapsed, 1e-9)}
                    row.update({k.split("/")[1]: float(np.mean(v)) for k, v in window.items()
                                if k.startswith(key + "/")})
                    with open(metrics_path, "a") as handle:
                        handle.write(json.dumps(row) + "\n")
                bar.set_postfix(loss=f"{np.mean([np.mean(v) for k, v in window.items() if k.endswith('/loss')]):.3f}")
                window, samples, last_log = {}, 0, time.time()
            if step % int(tcfg.get("checkpoint_every", 200)) == 0 or step == end:
                if rank == 0:
                    # inside a stage: its optimizer and sampler; at its end only the step (the next stage starts fresh)
                    save_checkpoint(out, model, {"step": step, "stage_index": index,
                                                 "optimizer": optimizer.state_dict(), "sampler": sampler.state(),
                                                 "window": window, "samples": samples}
                                    if step < end else {"step": step})
                    if metrics_path.exists():
                        plot_losses(metrics_path, out / "loss_curves.png")
                if world > 1:
                    dist.barrier()
        bar.close()
        trainer_state = {}

    if rank == 0:
        model.eval()
        card = {"training": training_summary(config_path, stages, str(root), cfg["data"]["train_split"],
                                             len(data.records), float(tcfg["lr"]))}
        # swapped in whole: a failed save (a full disk) keeps the previous final/ and export
        save_swapped(out / "final", lambda folder: model.save_pretrained(folder, model_card_kwargs=card))
        if export_dir is not None:
            dtype_name = cfg["export"].get("dtype", "float32")
            save_swapped(export_dir, lambda folder: model.save_pretrained(
                folder, dtype=getattr(torch, dtype_name), model_card_kwargs=card), private=True)
            print(f"exported {export_dir} ({dtype_name})", flush=True)
        print(f"done: {step} steps -> {out / 'final'}", flush=True)
    if world > 1:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

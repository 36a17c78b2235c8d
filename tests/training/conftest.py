"""Helpers of the training script's tests (this folder only): `SMALL_OVERRIDES` (a model small enough to train in
seconds), `_config` (a two-stage config on a generated Shapes split in a temporary folder), and `_train` / `_finish`
(`python -m training.train` in a child process, and its output once it exited 0). The test modules import them
from here."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


SMALL_OVERRIDES = {
    "image_encoder": {"img_size": 64, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2, "window_size": 4,
                      "global_attn_indexes": [1]},
    "prompt_embed_dim": 32, "num_query_tokens": 8, "extractor_heads": 2, "extractor_mlp_dim": 64,
    "mask_decoder_heads": 2, "mask_decoder_mlp_dim": 64, "loc_head_hidden": 64, "proposal_channels": 16,
    "roi_position": "sine", "refer_prompt": "refer:",  # as the shipped recipe (shapes_tiny.yaml)
    "t5": {"vocab_size": 400, "d_model": 64, "d_kv": 16, "d_ff": 128, "num_layers": 2, "num_decoder_layers": 2,
           "num_heads": 4, "dropout_rate": 0.0, "tie_word_embeddings": True},
}


def _config(tmp: Path, steps: tuple[int, int], checkpoint_every: int = 2) -> Path:
    cfg = {
        "model": {"preset": "tiny", "init": "scratch", "overrides": SMALL_OVERRIDES},
        "data": {"root": str(tmp / "data"), "train_split": "train", "generate": {"train": {"num": 12, "seed": 5}}},
        "train": {"out": str(tmp / "run"), "batch_size": 4, "lr": 2e-3, "lm_lr_scale": 0.1, "warmup": 2, "seed": 0,
                  "threads": 1,
                  "log_every": 1, "checkpoint_every": checkpoint_every, "max_tokens": 48,
                  "task_batch_size": {"refer_image": 2, "region_image": 2}, "refer_per_image": 3,
                  "region_per_image": 2},
        "stages": [
            {"name": "caption_pretraining", "stage": "scratch", "steps": steps[0],
             "tasks": {"narrative": 1, "region_box": 1, "region_image": 1}},
            {"name": "multitask", "stage": "scratch", "steps": steps[1], "config": {"attn_supervision_weight": 1.0},
             "tasks": {"narrative": 1, "sentence": 1, "prefix": 1, "region_box": 1, "region_points": 1, "refer": 1,
                       "refer_image": 1}},
        ],
    }
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _env() -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return env


def _train(config: Path, *extra: str, launcher: list[str] | None = None, timeout: int = 600) -> subprocess.Popen:
    cmd = (launcher or [sys.executable, "-m"]) + ["training.train", "--config", str(config), *extra]
    return subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen, timeout: int = 600) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-3000:]
    return out

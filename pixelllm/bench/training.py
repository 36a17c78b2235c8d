"""Ratio 6: training scale-out, `torchrun --nproc_per_node=2` against one process (CPU, gloo)."""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from pixelllm.bench.core import ROOT, Ratio, Settings


def _train_config(s: Settings, workdir: Path, threads: int, batch: int | None = None) -> Path:
    stage = {"name": "bench", "stage": "scratch", "steps": s.train_steps, "warmup": 2,
             "tasks": {"narrative": 3, "sentence": 1, "region_box": 2, "region_points": 1, "refer": 3}}
    cfg = {
        "model": {"preset": "tiny", "init": "scratch", "overrides": s.train_model},
        "data": {"root": str(workdir / "shapes"), "train_split": "bench",
                 "generate": {"bench": {"num": s.train_images, "seed": 7}}},
        "train": {"out": str(workdir / "train"), "batch_size": batch or s.train_batch, "lr": 5e-4, "seed": 0,
                  "threads": threads, "max_tokens": 96, "log_every": s.train_log_every,
                  "checkpoint_every": 10**9},
        "stages": [stage],
    }
    path = workdir / f"train_bench_{threads}t_{batch or s.train_batch}b.json"
    path.write_text(json.dumps(cfg, indent=2))
    return path


STOP_WAIT_S = 30  # a stopped run's grace to end (torchrun: to stop its workers) before SIGKILL


def _train_cmd(config: Path, out: Path, nproc: int) -> list[str]:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] \
        if nproc > 1 else [sys.executable]
    return [*launcher, "-m", "training.train", "--config", str(config), f"--train.out={out}"]


def _train_runs(runs: list[tuple[Path, Path, int, Path]]) -> list[list[float]]:
    """Training runs (config, out, nproc, log) started together; returns each run's samples/s per log window
    (the first window, which pays for start-up, dropped)."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1"}  # a CPU measurement
    started: list[tuple[list[str], Path, subprocess.Popen]] = []
    with contextlib.ExitStack() as stack:
        try:
            for config, out, nproc, log in runs:
                cmd = _train_cmd(config, out, nproc)
                handle = stack.enter_context(open(log, "wb"))
                started.append((cmd, log, subprocess.Popen(cmd, cwd=str(ROOT), env=env, stdout=handle,
                                                           stderr=subprocess.STDOUT)))
            for cmd, log, proc in started:
                if proc.wait() != 0:
                    raise RuntimeError(f"training run failed ({' '.join(cmd)}): "
                                       f"{log.read_text(errors='replace')[-2000:]}")
        finally:
            # A failed or interrupted run leaves nothing running: SIGTERM first, which torchrun forwards to its
            # workers (it starts them in their own sessions: a SIGKILL to the launcher left them running, orphaned)
            for _, _, proc in started:
                if proc.poll() is None:
                    proc.terminate()
            for _, _, proc in started:
                try:
                    proc.wait(STOP_WAIT_S)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    return [_window_rates(out) for _, out, _, _ in runs]


def _train_run(config: Path, out: Path, nproc: int, log: Path) -> list[float]:
    return _train_runs([(config, out, nproc, log)])[0]


def _window_rates(out: Path) -> list[float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    by_step = {r["step"]: r["samples_per_s"] for r in rows}  # one row per task, same samples_per_s
    values = [by_step[k] for k in sorted(by_step)]
    return values[1:] if len(values) > 1 else values


def bench_training(s: Settings, workdir: Path, threads: int) -> Ratio:
    ratio = Ratio("train_scaleout", "training scale-out: 2 processes / 1 process (CPU)", 1.3, ">=")
    if not (ROOT / "training" / "train.py").is_file():
        ratio.reason = "training package missing"
        return ratio
    config = _train_config(s, workdir, threads)
    runs: dict[int, list[float]] = {1: [], 2: []}
    order = [1, 2, 2, 1] * ((s.train_rounds + 1) // 2)
    for i, nproc in enumerate(order[: 2 * s.train_rounds]):
        out = workdir / f"train_{i}_{nproc}p"
        runs[nproc] += _train_run(config, out, nproc, workdir / f"train_{i}_{nproc}p.log")
    ratio.value = statistics.median(runs[2]) / statistics.median(runs[1])
    ratio.detail = {"one_process_samples_per_s": round(statistics.median(runs[1]), 3),
                    "two_processes_samples_per_s": round(statistics.median(runs[2]), 3),
                    "steps_per_run": s.train_steps, "global_batch": s.train_batch, "runs_each": s.train_rounds,
                    "threads": f"train.threads={threads} divided by world size"}
    if s.train_one_thread and threads > 1:
        # Two processes of one thread can at best double one process of one thread: that bounds this ratio at
        # 2 * rate(1 thread) / rate(threads), however good the DDP implementation is.
        single = statistics.median(_train_run(_train_config(s, workdir, 1), workdir / "train_1thread", 1,
                                              workdir / "train_1thread.log"))
        # Two cores are not two machines: two independent one-thread runs at once share caches and memory
        # bandwidth. Their summed rate (each at a DDP rank's batch) is what this machine can give two processes
        # with no communication at all.
        config1 = _train_config(s, workdir, 1, batch=s.train_batch // 2)
        pair = _train_runs([(config1, workdir / f"train_pair_{k}", 1, workdir / f"train_pair_{k}.log")
                            for k in range(2)])
        pair_rate = sum(statistics.median(r) for r in pair)
        ratio.detail.update(one_process_one_thread_samples_per_s=round(single, 3),
                            ddp_efficiency=round(statistics.median(runs[2]) / (2 * single), 3),
                            ceiling=round(2 * single / statistics.median(runs[1]), 3),
                            independent_pair_samples_per_s=round(pair_rate, 3),
                            ddp_vs_independent_pair=round(statistics.median(runs[2]) / pair_rate, 3),
                            machine_ceiling=round(pair_rate / statistics.median(runs[1]), 3))
    return ratio

"""The benchmark's command line: runs every measurement in one process, prints the table and writes JSON."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from pixelllm.bench.app import app_peak_rss, bench_app
from pixelllm.bench.core import DEFAULT_CHECKPOINT, QUICK, ROOT, Bench, Ratio, Settings
from pixelllm.bench.decoding import bench_dense, bench_location_head, bench_per_token, bench_prompt_reuse
from pixelllm.bench.training import bench_training
from pixelllm.build import count_parameters
from pixelllm.config import get_config
from pixelllm.files import json_target_problem, write_atomically
from pixelllm.modeling.pixel_llm import PixelLLM
from pixelllm.predictor import PixelLLMPredictor


def machine(device: torch.device, threads: int) -> dict[str, Any]:
    import psutil
    import transformers

    cpu = platform.processor() or "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info = {"cpu": cpu, "logical_cores": os.cpu_count(), "physical_cores": psutil.cpu_count(logical=False),
            "torch_threads": threads, "ram_gb": round(psutil.virtual_memory().total / 2**30, 1),
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "device": str(device),
            "load_avg_at_start": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def paper_preset() -> dict[str, Any]:
    params = count_parameters(get_config("paper"))
    return {"paper_parameters": params, "paper_bf16_weights_gb": round(params * 2 / 1e9, 2)}


STEPS = ("location_head_overhead", "prompt_reuse_speedup", "batched_dense_speedup", "per_token_cost_ratio",
         "app_overhead", "app_peak_rss", "train_scaleout")  # in the order they run


def render(ratios: list[Ratio], absolute: dict[str, Any], info: dict[str, Any]) -> str:
    lines = ["machine: " + ", ".join(f"{k}={v}" for k, v in info.items()), ""]
    width = max((len(r.label) for r in ratios), default=len("ratio"))
    if ratios:  # `--only app_peak_rss` measures no ratio
        lines.append(f"{'ratio':<{width}}  {'measured':>9}  {'target':>8}  result")
        lines.append("-" * (width + 32))
    for r in ratios:
        value = f"{r.value:.3f}" if r.status != "n/a" else "n/a"
        note = f"  ({r.reason})" if r.status == "n/a" and r.reason else ""
        lines.append(f"{r.label:<{width}}  {value:>9}  {r.op + ' ' + format(r.target, 'g'):>8}  {r.status}{note}")
    lines.append("")
    lines.append("absolute: " + ", ".join(f"{k}={v}" for k, v in absolute.items()))
    lines.append("")
    for r in ratios:  # the measurements behind each ratio (all of them are in --json)
        shown = {k: v for k, v in r.detail.items() if not isinstance(v, (list, dict))}
        lines.append(f"{r.key}: " + ", ".join(f"{k}={v}" for k, v in shown.items()))
    return "\n".join(lines)


@contextlib.contextmanager
def stopped_by_sigterm_as_by_ctrl_c() -> Iterator[None]:
    """SIGTERM (`kill`, a cancelled CI job, a timeout) stops the bench as Ctrl+C does, by KeyboardInterrupt: the
    temporary folder (bench images, the app's store, training runs) is removed and the app.py and torchrun children
    are stopped on the way out. SIGTERM used to end the process where it stood, leaving both behind (SIGKILL still
    does: it cannot be caught). A second SIGTERM ends it at once. Only the main thread can set a handler: elsewhere
    (main() called from a thread) SIGTERM keeps its action."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: object) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pixelllm.bench",
                                     description="PixelLLM performance benchmark (docs/benchmark.md): every figure a "
                                                 "ratio of two things measured side by side",
                                     allow_abbrev=False)
    parser.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help="PixelLLM checkpoint folder or hub id")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="cuda runs in bfloat16")
    parser.add_argument("--json", type=Path, help="write every figure and its details here")
    parser.add_argument("--quick", action="store_true", help="small sizes and repetitions (CI smoke run)")
    parser.add_argument("--no-fail", action="store_true", help="exit 0 even when a target is missed")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch intra-op threads")
    parser.add_argument("--only", help="comma-separated subset to run (ratio keys, app_peak_rss); for diagnosis")
    args = parser.parse_args(argv)
    only = set(args.only.split(",")) if args.only else None
    if only is not None and only - set(STEPS):
        parser.error(f"--only: unknown {', '.join(sorted(only - set(STEPS)))}; choose from {', '.join(STEPS)}")

    if args.threads < 1:  # torch's RuntimeError traceback
        parser.error(f"--threads must be at least 1, got {args.threads}")
    # an unwritable report failed with a traceback at the first measurement's write
    problem = json_target_problem(args.json, "runs/bench/full.json") if args.json is not None else None
    if problem:
        parser.error(f"--json {args.json}: {problem}")

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    checkpoint = args.checkpoint
    if not Path(checkpoint).is_absolute() and not Path(checkpoint).exists() and (ROOT / checkpoint).exists():
        checkpoint = str(ROOT / checkpoint)
    try:
        model = PixelLLM.from_pretrained(checkpoint)
    except (FileNotFoundError, ValueError) as err:
        print(f"cannot load the checkpoint {checkpoint}: {err}", file=sys.stderr)
        return 2
    if model.tokenizer is None:  # PixelLLMPredictor's ValueError traceback told the user to use from_pretrained
        print(f"cannot load the checkpoint {checkpoint}: it has no tokenizer (tokenizer.json or spiece.model beside "
              "its weights)", file=sys.stderr)
        return 2
    settings = QUICK if args.quick else Settings()
    predictor = PixelLLMPredictor(model, device=device, dtype=torch.bfloat16 if device.type == "cuda" else None)
    info = machine(device, args.threads)
    info["dtype"] = str(predictor.model.dtype).replace("torch.", "")
    info["checkpoint"] = checkpoint
    absolute: dict[str, Any] = {}
    ratios: list[Ratio] = []

    def write_json(complete: bool) -> None:  # after every measurement: a killed run keeps what it measured
        if args.json:  # atomically: a kill while writing left part of a JSON file, and no measurement
            write_atomically(args.json, json.dumps({
                "machine": info, "quick": args.quick, "complete": complete, "settings": asdict(settings),
                "ratios": {r.key: {"label": r.label, "value": r.value, "target": r.target, "op": r.op,
                                   "status": r.status, "reason": r.reason, "detail": r.detail} for r in ratios},
                "absolute": absolute, "failed": [r.key for r in ratios if r.status == "FAIL"],
            }, indent=2, default=str))

    absolute.update(paper_preset())
    # SIGTERM as Ctrl+C: the folder (and the app / torchrun children) are cleaned up on the way out
    with stopped_by_sigterm_as_by_ctrl_c(), tempfile.TemporaryDirectory(prefix="pixelllm-bench-") as tmp:
        workdir = Path(tmp)
        os.environ.setdefault("GRADIO_TEMP_DIR", str(workdir / "gradio"))
        bench = Bench(predictor, settings, workdir)
        steps: list[tuple[str, Callable[[], Ratio | None]]] = [
            ("location_head_overhead", lambda: bench_location_head(bench)),
            ("prompt_reuse_speedup", lambda: bench_prompt_reuse(bench)),
            ("batched_dense_speedup", lambda: bench_dense(bench)),
            ("per_token_cost_ratio", lambda: bench_per_token(bench)),
            ("app_overhead", lambda: bench_app(bench, absolute)),
            ("app_peak_rss", lambda: absolute.update(app_peak_rss(checkpoint, args.device, workdir,
                                                                  settings.rss_calls))),
            ("train_scaleout", lambda: bench_training(settings, workdir, args.threads)),
        ]
        assert tuple(key for key, _ in steps) == STEPS
        for key, run in steps:
            if only is not None and key not in only:
                continue
            print(f"... {key}", file=sys.stderr, flush=True)
            result = run()
            if isinstance(result, Ratio):
                ratios.append(result)
                print(f"    {result.value if result.value is None else round(result.value, 3)} "
                      f"({result.op} {result.target:g}) {result.status}", file=sys.stderr, flush=True)
            write_json(complete=False)
    if hasattr(os, "getloadavg"):  # other work on the machine skews every figure: say how busy it was
        info["load_avg_at_end"] = round(os.getloadavg()[0], 2)
    print(render(ratios, absolute, info))
    write_json(complete=True)
    failed = [r.key for r in ratios if r.status == "FAIL"]
    return 1 if failed and not args.no_fail else 0

"""`python -m pixelllm.bench` runs end to end (plumbing only).

A smoke run of the benchmark with `--quick --no-fail` on a small random checkpoint: it checks that every
measurement runs (streaming vs generate(), cache hit vs miss, batched vs single dense captions, the per-step
profile, the in-process app called through gradio_client, the app.py subprocess, one- and two-process training,
and the two ceilings printed beside bounded ratios: prompt reuse on a second preset, the independent-pair run)
and that the JSON report holds every ratio as a positive finite number. It asserts no timing: speed is the
benchmark's job, and wall-clock thresholds do not belong in tests (TESTING.md).
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys

import pytest

from tests.conftest import ROOT
from tests.helpers import save_small_checkpoint

RATIOS = ["location_head_overhead", "prompt_reuse_speedup", "batched_dense_speedup", "per_token_cost_ratio",
          "app_overhead", "train_scaleout"]


def run_process_group(cmd: list[str], timeout: float, **kwargs) -> subprocess.CompletedProcess:
    """`subprocess.run` in a session of its own; on timeout the whole group is killed. The bench starts `app.py`
    and torchrun children: killing only the bench (what `subprocess.run`'s timeout does) would leave them
    running, an app server holding ~1 GB for the rest of the suite."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            **kwargs)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{' '.join(cmd)} timed out after {timeout} s: {out[-2000:]}{err[-2000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@pytest.mark.slow
def test_bench_quick_run_reports_every_ratio(tmp_path):
    checkpoint = save_small_checkpoint(tmp_path / "checkpoint")
    report = tmp_path / "bench.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False",
           "GRADIO_TEMP_DIR": str(tmp_path / "gradio")}
    done = run_process_group(
        [sys.executable, "-m", "pixelllm.bench", "--quick", "--no-fail", "--checkpoint", str(checkpoint),
         "--json", str(report)],
        cwd=ROOT, env=env, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    data = json.loads(report.read_text())
    assert data["quick"] is True
    for key in RATIOS:
        entry = data["ratios"][key]
        assert entry["status"] in ("PASS", "FAIL"), (key, entry)
        assert isinstance(entry["value"], float) and math.isfinite(entry["value"]) and entry["value"] > 0, (key, entry)
        assert entry["label"] in done.stdout  # the table names every ratio
    absolute = data["absolute"]
    assert absolute["app_peak_rss_mb"] > 0
    assert absolute["words_per_s"] > 0 and absolute["time_to_first_word_ms"] > 0
    assert absolute["paper_parameters"] > 3_000_000_000  # ≈ 4B, as in the paper
    assert data["machine"]["torch"] and data["machine"]["cpu"]
    # The two explanations printed beside the bounded ratios ran too: prompt reuse on a second (randomly
    # initialised) preset, and the per-core / independent-pair ceilings of the DDP figure (more than one thread).
    reuse = data["ratios"]["prompt_reuse_speedup"]["detail"]
    assert reuse["tiny_preset_speedup"] > 0 and reuse["tiny_preset_encode_image_ms"] > 0
    if data["machine"]["torch_threads"] > 1:
        scale = data["ratios"]["train_scaleout"]["detail"]
        assert scale["independent_pair_samples_per_s"] > 0 and scale["machine_ceiling"] > 0


def test_only_refuses_an_unknown_measurement(capsys):
    from pixelllm.bench.run import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--only", "app_overhead,app_rss"])
    assert exit_info.value.code == 2
    assert "--only: unknown app_rss; choose from location_head_overhead" in capsys.readouterr().err


def test_a_report_without_ratios_prints_the_absolute_figures():
    """`--only app_peak_rss` measures no ratio: the report is the machine and the absolute figures."""
    from pixelllm.bench.run import render

    text = render([], {"app_peak_rss_mb": 950.5}, {"cpu": "test"})
    assert "absolute: app_peak_rss_mb=950.5" in text and "machine: cpu=test" in text
    assert "ratio" not in text


def test_time_to_first_word_leaves_out_the_warm_up_calls(monkeypatch, small_predictor, tmp_path):
    """The absolute figures beside the app ratio come from the timed calls only, like every ratio: two warm-up
    calls 10 s to their first word and two timed calls 1 ms must report 1 ms (the median of all four was 5 s)."""
    import pixelllm.bench.app as bench_app
    from pixelllm.bench.core import Bench, Settings

    calls = []

    def fake_stream(predictor, array, words):
        calls.append(words)
        return words, (10.0 if len(calls) <= 2 else 0.001)

    monkeypatch.setattr(bench_app, "predictor_stream", fake_stream)
    monkeypatch.setattr(bench_app, "_app_times", lambda b, build_demo, path, alone, ratio: b.interleave(
        {"predictor": alone}, reps=b.settings.app_reps))
    bench = Bench(small_predictor, Settings(warmup=2, app_reps=2), tmp_path)
    absolute: dict = {}
    bench_app.bench_app(bench, absolute)
    assert len(calls) == 4 and absolute["time_to_first_word_ms"] == 1.0

"""`python -m pixelllm.bench` runs end to end (plumbing only).

A smoke run of the benchmark with `--quick --no-fail` on a small random checkpoint: it checks that every
measurement runs (streaming vs generate(), cache hit vs miss, batched vs single dense captions, the per-step
profile, the in-process app called through gradio_client, the app.py subprocess, one- and two-process training,
and the two ceilings printed beside bounded ratios: prompt reuse on a second preset, the independent-pair run)
and that the JSON report holds every ratio as a positive finite number. It asserts no timing: speed is the
benchmark's job, and wall-clock thresholds do not belong in tests (TESTING.md).

The benchmark's own logic has unit tests without timing: a ratio's PASS/FAIL/n/a against its target, the median
ratio, the interleaved timer (order of the arms, warm-up discarded; a fake clock stands in for the real one), the
two decoding switches that make both arms of a comparison do the same work (`fixed_length`, `ban_eos`) and the exit
code of `main` when a target is missed (measurements replaced by canned ratios).
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from pixelllm.bench.core import Bench, Ratio, Settings, ban_eos, fixed_length, ratio_of
from tests.conftest import ROOT
from tests.helpers import save_small_checkpoint, small_model

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
    (tmp_path / "tmp").mkdir()  # its temporary folder: left here, not in /tmp, if the timeout below kills it
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False",
           "GRADIO_TEMP_DIR": str(tmp_path / "gradio"), "TMPDIR": str(tmp_path / "tmp")}
    done = run_process_group(
        [sys.executable, "-m", "pixelllm.bench", "--quick", "--no-fail", "--checkpoint", str(checkpoint),
         "--json", str(report)],
        cwd=ROOT, env=env, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert not list((tmp_path / "tmp").glob("pixelllm-bench-*"))  # its temporary folder is removed
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


# ---------------------------------------------------------------------------------------------- Ratio, ratio_of

@pytest.mark.parametrize("op, target, value, status", [
    # "<=": a cost ratio, met at or below the target
    ("<=", 1.1, 1.0, "PASS"), ("<=", 1.1, 1.1, "PASS"), ("<=", 1.1, 1.2, "FAIL"),
    # ">=": a speed-up, met at or above the target
    (">=", 5.0, 6.0, "PASS"), (">=", 5.0, 5.0, "PASS"), (">=", 5.0, 4.0, "FAIL"),
    # not measured, or no number (a zero median in a denominator): not available, neither PASS nor FAIL
    ("<=", 1.1, None, "n/a"), (">=", 5.0, None, "n/a"), ("<=", 1.1, math.nan, "n/a"), (">=", 5.0, math.nan, "n/a"),
    ("<=", 1.1, math.inf, "n/a"), (">=", 5.0, math.inf, "n/a"),
])
def test_ratio_status_against_its_target(op, target, value, status):
    assert Ratio("k", "label", target, op, value=value).status == status


def test_ratio_of_is_numerator_median_over_denominator_median():
    assert ratio_of([2, 2, 2], [1, 1, 1]) == 2.0  # the first argument is the numerator
    assert ratio_of([1, 1, 1], [2, 2, 2]) == 0.5
    # medians, not means: median(1, 9, 3) = 3, median(2, 100, 1) = 2 -> 1.5 (the means would give 13/103)
    assert ratio_of([1, 9, 3], [2, 100, 1]) == 1.5


# ---------------------------------------------------------------------------------------------- interleave

def test_interleave_alternates_the_arms_and_discards_the_warm_up(monkeypatch, small_predictor, tmp_path):
    """Arms record their calls and advance a fake clock by a duration of their own per call: the warm-up calls
    (100 s each) must not appear in the times, and the timed rounds run a, b, c then c, b, a."""
    import pixelllm.bench.core as core

    clock = [0.0]
    monkeypatch.setattr(core, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    calls: list[str] = []
    durations = {"a": iter([100, 100, 1, 2, 3, 4]), "b": iter([100, 100, 10, 20, 30, 40]),
                 "c": iter([100, 100, 0.5, 0.25, 0.125, 0.0625])}

    def arm(name):
        def call():
            calls.append(name)
            clock[0] += next(durations[name])
        return call

    bench = Bench(small_predictor, Settings(warmup=2, reps=4), tmp_path)
    times = bench.interleave({name: arm(name) for name in "abc"})
    assert calls == list("abc" "abc"              # two warm-up rounds, in order
                         "abc" "cba" "abc" "cba")  # four timed rounds (settings.reps), every other one reversed
    assert times == {"a": [1, 2, 3, 4], "b": [10, 20, 30, 40], "c": [0.5, 0.25, 0.125, 0.0625]}

    calls.clear()
    durations = {"a": iter([100, 100, 7]), "b": iter([100, 100, 8])}
    assert bench.interleave({"a": arm("a"), "b": arm("b")}, reps=1) == {"a": [7], "b": [8]}  # reps overrides
    assert calls == list("ab" "ab" "ab")


# ---------------------------------------------------------------------------------------------- decoding switches

def _prefix(model):
    images = torch.rand(1, 3, model.config.image_size, model.config.image_size,
                        generator=torch.Generator().manual_seed(0)) * 255
    with torch.no_grad():
        return model.encode_prefix(model.encode_image(images))


def _tokens(model, prefix, n):
    with torch.no_grad():
        return [int(step.tokens[0]) for step, _ in model.stream(prefix, max_new_tokens=n, with_boxes=False)]


def _prefer(model, *token_ids):
    """A forward hook on the LM head making the given tokens the most likely ones, in that order."""
    def hook(_module, _inputs, logits):
        logits = logits.clone()
        for rank, token in enumerate(token_ids):
            logits[..., token] = 1e4 - rank
        return logits
    return model.language_model.lm_head.register_forward_hook(hook)


def test_fixed_length_decodes_exactly_n_steps_and_keeps_the_tokens():
    """A model that picks EOS at every step stops after one step; under `fixed_length` it runs all N steps, the
    tokens still the model's own (EOS every time), and the switch is undone on exit."""
    model = small_model(seed=0)
    prefix = _prefix(model)
    eos = model.config.eos_token_id
    n = 7
    handle = _prefer(model, eos)
    try:
        assert _tokens(model, prefix, n) == [eos]
        with fixed_length(model):
            assert _tokens(model, prefix, n) == [eos] * n
        assert model.config.eos_token_id == eos
        assert _tokens(model, prefix, n) == [eos]
    finally:
        handle.remove()


def test_ban_eos_runs_n_steps_of_the_next_most_likely_tokens():
    """With EOS the most likely token and pad the second, `ban_eos` decodes N steps that are neither: at each step
    the token is the argmax of the model's logits with EOS and pad left out (recorded before the ban applies)."""
    model = small_model(seed=0)
    prefix = _prefix(model)
    eos, pad = model.config.eos_token_id, model.config.pad_token_id
    n = 7
    seen: list[torch.Tensor] = []
    handles = [_prefer(model, eos, pad),
               model.language_model.lm_head.register_forward_hook(lambda _m, _i, out: seen.append(out[0, -1].clone()))]
    try:
        with ban_eos(model):
            tokens = _tokens(model, prefix, n)
        assert len(tokens) == n and eos not in tokens and pad not in tokens, tokens
        expected = []
        for logits in seen:
            logits[[eos, pad]] = -math.inf
            expected.append(int(logits.argmax()))
        assert tokens == expected
        assert _tokens(model, prefix, n) == [eos]  # the ban is lifted on exit
    finally:
        for handle in handles:
            handle.remove()


# ---------------------------------------------------------------------------------------------- exit code

@pytest.mark.parametrize("overhead, reuse, flags, code, failed", [
    (1.0, 6.0, [], 0, []),                                       # both targets met
    (2.0, 6.0, [], 1, ["location_head_overhead"]),               # 2.0 > 1.1: a "<=" target missed
    (1.0, 4.0, [], 1, ["prompt_reuse_speedup"]),                 # 4.0 < 5.0: a ">=" target missed
    (2.0, 4.0, ["--no-fail"], 0, ["location_head_overhead", "prompt_reuse_speedup"]),  # reported, exit 0
    (None, 6.0, [], 0, []),                                      # not measured is no failure
])
def test_main_exits_non_zero_when_a_target_is_missed(monkeypatch, small_checkpoint, tmp_path, overhead, reuse,
                                                     flags, code, failed):
    """The two measurements are replaced by canned ratios (targets: overhead <= 1.1, reuse >= 5): the exit code and
    the report's `failed` list follow the targets alone."""
    import pixelllm.bench.run as run

    monkeypatch.setattr(run, "paper_preset", lambda: {})  # builds a 4B model on the meta device: not under test
    monkeypatch.setattr(run, "bench_location_head", lambda b: Ratio("location_head_overhead", "overhead", 1.1, "<=",
                                                                      value=overhead))
    monkeypatch.setattr(run, "bench_prompt_reuse", lambda b: Ratio("prompt_reuse_speedup", "reuse", 5.0, ">=",
                                                                     value=reuse))
    report = tmp_path / "bench.json"
    argv = ["--checkpoint", str(small_checkpoint), "--only", "location_head_overhead,prompt_reuse_speedup",
            "--threads", str(torch.get_num_threads()), "--json", str(report), *flags]
    assert run.main(argv) == code
    data = json.loads(report.read_text())
    assert data["complete"] is True and data["failed"] == failed
    assert set(data["ratios"]) == {"location_head_overhead", "prompt_reuse_speedup"}


# The bench with its two decoding measurements replaced by canned ratios, killed by the kernel part-way through the
# JSON write after the second one: the process may write no file past 100 bytes from then on, and SIGXFSZ (which
# Python ignores) is back to its default action, so the write past byte 100 ends the process, as a SIGKILL there.
_KILLED_WRITING_THE_SECOND_REPORT = """import resource, signal, sys
import pixelllm.bench.run as run
from pixelllm.bench.core import Ratio
def killed_in_the_next_write(bench):
    signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
    resource.setrlimit(resource.RLIMIT_FSIZE, (100, 100))
    return Ratio("prompt_reuse_speedup", "reuse", 5.0, ">=", value=6.0)
run.paper_preset = lambda: {}
run.bench_location_head = lambda bench: Ratio("location_head_overhead", "overhead", 1.1, "<=", value=1.0)
run.bench_prompt_reuse = killed_in_the_next_write
sys.exit(run.main(sys.argv[1:]))
"""


def test_a_bench_killed_while_it_writes_its_json_keeps_the_measurements_written_before(small_checkpoint, tmp_path):
    """The report is rewritten after every measurement so that a killed run keeps what it measured; it was written
    in place, so a kill during a rewrite left the first 100 bytes of a JSON file and no measurement at all.

    Nothing can clean up after such a kill: the bench's temporary folder (its images) stays. The bench gets a temp
    root of the test's own (TMPDIR), so it stays there; it was left in /tmp, one `pixelllm-bench-*` a suite run."""
    report, temp_root = tmp_path / "bench.json", tmp_path / "tmp"
    temp_root.mkdir()
    killed = subprocess.run(
        [sys.executable, "-c", _KILLED_WRITING_THE_SECOND_REPORT, "--checkpoint", str(small_checkpoint), "--only",
         "location_head_overhead,prompt_reuse_speedup", "--threads", "1", "--json", str(report)],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TMPDIR": str(temp_root)},
        capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGXFSZ, killed.stderr[-2000:]
    data = json.loads(report.read_text())  # the report of the first measurement, whole
    assert data["complete"] is False
    assert list(data["ratios"]) == ["location_head_overhead"]
    assert data["ratios"]["location_head_overhead"]["value"] == 1.0
    left = [p.name for p in temp_root.iterdir()]  # in the temp root it was given, not /tmp
    assert len(left) == 1 and left[0].startswith("pixelllm-bench-"), left
    assert (temp_root / left[0] / "bench_0.png").is_file()


# The bench (through `python -m pixelllm.bench`'s own entry) with its first measurement canned and its second one
# taking a minute: stopped by a signal while it runs that second one.
_MEASURING_FOR_A_MINUTE = """import runpy, sys, time
import pixelllm.bench.run as run
from pixelllm.bench.core import Ratio
def measuring_for_a_minute(bench):
    time.sleep(60)
run.paper_preset = lambda: {}
run.bench_location_head = lambda bench: Ratio("location_head_overhead", "overhead", 1.1, "<=", value=1.0)
run.bench_prompt_reuse = measuring_for_a_minute
runpy.run_module("pixelllm.bench", run_name="__main__", alter_sys=True)
"""


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl+C"])
def test_a_bench_stopped_while_it_measures_removes_its_temporary_folder(small_checkpoint, tmp_path, stop):
    """SIGTERM (`kill`, a cancelled CI job) ended the bench where it stood: its temporary folder (bench images, the
    app's store, training runs) stayed in /tmp, and the app.py / torchrun children it had started kept running. It
    now stops as on Ctrl+C: the folder is removed and the children stopped on the way out, with one line (Ctrl+C
    printed a KeyboardInterrupt traceback), exit 130; the report keeps the measurement finished before."""
    report, temp_root = tmp_path / "bench.json", tmp_path / "tmp"
    temp_root.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-c", _MEASURING_FOR_A_MINUTE, "--checkpoint", str(small_checkpoint), "--only",
         "location_head_overhead,prompt_reuse_speedup", "--threads", "1", "--json", str(report)],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TMPDIR": str(temp_root)},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        seen = []
        for line in proc.stderr:  # the bench says which measurement it starts
            seen.append(line)
            if line.strip() == "... prompt_reuse_speedup":
                break
        else:
            pytest.fail(f"the bench ended before its second measurement: {''.join(seen)[-2000:]}")
        assert list(temp_root.glob("pixelllm-bench-*/bench_0.png"))  # its folder, while it measures
        proc.send_signal(stop)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert [p.name for p in temp_root.glob("*/*")] == []  # nothing left: no folder, no bench image
    assert proc.returncode == 130, err[-2000:]
    assert err.strip().splitlines()[-1] == ("interrupted: the bench stopped (a --json report keeps the measurements "
                                            "finished before)"), err[-2000:]
    assert "Traceback" not in err, err[-2000:]
    assert list(temp_root.iterdir()) == []
    data = json.loads(report.read_text())
    assert data["complete"] is False and list(data["ratios"]) == ["location_head_overhead"]


@pytest.mark.parametrize("target, flags, match", [
    ("a_folder", [], "--json {target}: is a folder; give a file name"),
    ("a_file/bench.json", [], "--json {target}: cannot write in"),  # its folder is a file
    ("bench.json", ["--threads", "0"], "--threads must be at least 1, got 0"),
])
def test_a_json_it_cannot_write_or_no_threads_is_refused_before_any_measurement(tmp_path, capsys, target, flags,
                                                                               match):
    """`--json` naming a folder (or a path under a file) failed with a traceback at the report's first write,
    after the first measurement; `--threads 0` with torch's RuntimeError traceback."""
    from pixelllm.bench.run import main

    (tmp_path / "a_folder").mkdir()
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(SystemExit) as exit_info:
        main(["--checkpoint", str(tmp_path / "no-model"), "--json", str(tmp_path / target), *flags])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert match.format(target=tmp_path / target) in err and "cannot load the checkpoint" not in err, err


def test_checking_json_leaves_no_folder_behind(tmp_path, capsys):
    """Checking that `--json` can be written made its folders and left them there when the bench then stopped (here
    at a checkpoint it cannot load): the check now removes the folders it made (writing the report makes them)."""
    from pixelllm.bench.run import main

    assert main(["--checkpoint", str(tmp_path / "no-model"), "--json", str(tmp_path / "new" / "sub" / "b.json"),
                 "--threads", "1"]) == 2
    assert "cannot load the checkpoint" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_checkpoint_without_its_tokenizer_is_one_line(tmp_path, capsys):
    """A checkpoint folder without tokenizer.json loads without a tokenizer: the bench then ended in the predictor's
    traceback, which told the user to load it with PixelLLM.from_pretrained (it had)."""
    from pixelllm.bench.run import main

    checkpoint = save_small_checkpoint(tmp_path / "model")
    (checkpoint / "tokenizer.json").unlink()
    assert main(["--checkpoint", str(checkpoint), "--only", "per_token_cost_ratio", "--threads", "1"]) == 2
    assert capsys.readouterr().err.strip() == (f"cannot load the checkpoint {checkpoint}: it has no tokenizer "
                                               "(tokenizer.json or spiece.model beside its weights)")

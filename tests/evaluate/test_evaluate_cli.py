"""`python -m training.evaluate` end to end on a random tiny model (plumbing, not the numbers): one split,
several splits with their mean and standard error, the finished splits kept when a later one fails, and Ctrl+C
in one line saying what the JSON holds."""

from __future__ import annotations

import json
import math

import pytest

from training.data.localized_narratives import read_localized_narratives
from training.data.shapes import generate_split
from training.evaluate import (
    main,
)
from training.scoring import (
    METRIC_KEYS,
)


def _random_tiny_checkpoint(tmp_path, data):
    """A randomly initialised tiny model (one T5 layer each side) with a tokenizer of `data`'s test captions."""
    import torch

    from pixelllm.build import build_pixelllm
    from pixelllm.config import get_config
    from pixelllm.tokenizer import train_tokenizer

    captions = [s.caption for s in read_localized_narratives(data / "test.ln.jsonl")[0]]
    tokenizer = train_tokenizer(captions * 4, vocab_size=400)
    config = get_config("tiny")
    config.t5.vocab_size = len(tokenizer)
    config.t5.num_layers = config.t5.num_decoder_layers = 1
    torch.manual_seed(0)
    build_pixelllm(config, tokenizer=tokenizer).save_pretrained(tmp_path / "ckpt")
    return config


def test_cli_smoke_random_model(tmp_path, capsys) -> None:
    """Plumbing only: a randomly initialised tiny model through the real CLI on a 3-image split. Checks that
    every metric key is in the JSON with values in [0, 1]; the numbers themselves mean nothing. The
    point-in-object rate may be null (a random caption rarely names an object); it must be null exactly when
    no content word was matched."""
    data = tmp_path / "data"
    generate_split(data, "test", 3, seed=11)
    config = _random_tiny_checkpoint(tmp_path, data)

    out = tmp_path / "out" / "eval.json"
    assert main(["--checkpoint", str(tmp_path / "ckpt"), "--data", str(data), "--limit", "3", "--json", str(out),
                 "--threads", "1", "--max-regions", "3", "--max-new-tokens", "12"]) == 0
    printed = capsys.readouterr().out
    assert "3 images" in printed and "P@0.5" in printed
    assert f"repetition penalty {config.repetition_penalty:g} (the checkpoint's default" in printed
    result = json.loads(out.read_text())
    assert set(result["metrics"]) == set(METRIC_KEYS)
    assert result["counts"]["images"] == 3
    for key, pair in result["metrics"].items():
        for side in ("model", "baseline"):
            value = pair[side]
            if value is None:
                assert key == "dense_ap@0.5" and side == "baseline" or (
                    key == "trace_point_in_object" and result["counts"]["trace_content_words"] == 0), key
            else:
                assert 0.0 <= value <= 1.0 and not math.isnan(value), (key, side, value)
    assert result["seconds"]["total"] > 0
    assert result["settings"]["lbm_empty_cost"] == 1.0
    assert result["settings"]["repetition_penalty"] == config.repetition_penalty  # the effective value


def test_several_splits_give_each_result_and_their_mean_and_standard_error(tmp_path, capsys) -> None:
    """`--split a --split b`: each split's result is the one a run on that split alone gives, and the summary is
    the mean and standard error of the per-split values (computed here by hand from the single-split runs)."""
    data = tmp_path / "data"
    generate_split(data, "test", 2, seed=11)
    generate_split(data, "other", 2, seed=12)
    _random_tiny_checkpoint(tmp_path, data)
    common = ["--checkpoint", str(tmp_path / "ckpt"), "--data", str(data), "--threads", "1", "--max-regions", "2",
              "--max-new-tokens", "8"]
    alone = {}
    for split in ("test", "other"):
        assert main([*common, "--split", split, "--json", str(tmp_path / f"{split}.json")]) == 0
        alone[split] = json.loads((tmp_path / f"{split}.json").read_text())["metrics"]
    capsys.readouterr()
    assert main([*common, "--split", "test", "--split", "other", "--json", str(tmp_path / "both.json")]) == 0
    printed = capsys.readouterr().out
    assert "[test]" in printed and "[other]" in printed and "Over 2 splits" in printed
    both = json.loads((tmp_path / "both.json").read_text())
    assert list(both["splits"]) == ["test", "other"]
    for split in ("test", "other"):
        assert both["splits"][split]["metrics"] == alone[split]
    for key in METRIC_KEYS:
        a, b = alone["test"][key]["model"], alone["other"][key]["model"]
        row = both["summary"][key]
        assert row["values"] == {"test": a, "other": b}
        if a is None or b is None:
            assert row["mean"] is None and row["se"] is None
        else:  # s.e. of two values: |a - b| / 2
            assert row["mean"] == pytest.approx((a + b) / 2) and row["se"] == pytest.approx(abs(a - b) / 2)


def test_several_splits_keep_the_finished_ones_when_a_later_one_fails(tmp_path, monkeypatch, capsys) -> None:
    """The JSON is written after every split, so a crash in the second keeps the first; a split named like a
    column of the summary table is refused before the model loads."""
    import training.evaluate as ev

    data = tmp_path / "data"
    generate_split(data, "test", 2, seed=11)
    generate_split(data, "other", 2, seed=12)
    _random_tiny_checkpoint(tmp_path, data)
    real, calls = ev.evaluate, []

    def second_fails(*args, **kwargs):
        calls.append(args[2])
        if len(calls) == 2:
            raise RuntimeError("boom")
        return real(*args, **kwargs)

    monkeypatch.setattr(ev, "evaluate", second_fails)
    out = tmp_path / "both.json"
    with pytest.raises(RuntimeError, match="boom"):
        main(["--checkpoint", str(tmp_path / "ckpt"), "--data", str(data), "--threads", "1", "--max-regions", "2",
              "--max-new-tokens", "8", "--split", "test", "--split", "other", "--json", str(out)])
    kept = json.loads(out.read_text())
    assert list(kept["splits"]) == ["test"] and kept["summary"] is None
    assert set(kept["splits"]["test"]["metrics"]) == set(METRIC_KEYS)
    with pytest.raises(SystemExit):
        main(["--checkpoint", "unused", "--data", str(data), "--split", "test", "--split", "mean"])
    assert "'mean' is a column of the summary table" in capsys.readouterr().err


# `python -m training.evaluate ARGS` in a child process that says "paused" before its second split and waits for a
# line on stdin (or a Ctrl+C: SIGINT, handled as at a terminal: a background job of a script ignores it)
_EVALUATE_PAUSED = """import signal, sys
import training.evaluate as ev
signal.signal(signal.SIGINT, signal.default_int_handler)
real, calls = ev.evaluate, []
def pause_before_the_second(*args, **kwargs):
    calls.append(args[2])
    if len(calls) == 2:
        print("paused", flush=True)
        sys.stdin.readline()
    return real(*args, **kwargs)
ev.evaluate = pause_before_the_second
sys.exit(ev.main(sys.argv[1:]))
"""


def test_ctrl_c_ends_an_evaluation_in_one_line_saying_what_the_json_holds(tmp_path) -> None:
    """Ctrl+C (a real SIGINT) in the middle of an evaluation was a KeyboardInterrupt traceback. One line now, exit
    130, saying what --json holds: the splits finished before, without the summary."""
    import os
    import signal
    import subprocess
    import sys

    from tests.helpers import ROOT

    data = tmp_path / "data"
    generate_split(data, "test", 2, seed=11)
    generate_split(data, "other", 2, seed=12)
    _random_tiny_checkpoint(tmp_path, data)
    out = tmp_path / "both.json"
    child = subprocess.Popen(
        [sys.executable, "-c", _EVALUATE_PAUSED, "--checkpoint", str(tmp_path / "ckpt"), "--data", str(data),
         "--threads", "1", "--max-regions", "2", "--max-new-tokens", "8", "--split", "test", "--split", "other",
         "--json", str(out)], cwd=ROOT, text=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, env=dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1"))
    for line in child.stdout:  # the first split's table, then "paused"
        if line.strip() == "paused":
            break
    child.send_signal(signal.SIGINT)
    err = child.communicate(timeout=120)[1]
    assert child.returncode == 130 and err.splitlines() == [
        f"evaluate: interrupted; {out} holds the splits finished before (test), without the summary"], err
    kept = json.loads(out.read_text())
    assert list(kept["splits"]) == ["test"] and kept["summary"] is None

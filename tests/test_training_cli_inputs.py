"""Inputs the training command lines refused late or not at all: a hub id `model.init` offline, a malformed
`data.generate` entry, a Shapes `--size` too large to draw, an evaluation split without referring expressions, a
finished run's config rerun with fewer steps, and whole numbers (read by the library's one rule). Each row of
docs/hardening.md names the test that keeps it true."""

from __future__ import annotations

import json
import math
import re
import shutil

import numpy as np
import pytest
import yaml

# a model of a few hundred thousand parameters (as tests/training/'s), so that a real run takes seconds
SMALL_OVERRIDES = {
    "image_encoder": {"img_size": 64, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2, "window_size": 4,
                      "global_attn_indexes": [1]},
    "prompt_embed_dim": 32, "num_query_tokens": 8, "extractor_heads": 2, "extractor_mlp_dim": 64,
    "mask_decoder_heads": 2, "mask_decoder_mlp_dim": 64, "loc_head_hidden": 64, "proposal_channels": 16,
    "t5": {"vocab_size": 400, "d_model": 64, "d_kv": 16, "d_ff": 128, "num_layers": 2, "num_decoder_layers": 2,
           "num_heads": 4, "dropout_rate": 0.0, "tie_word_embeddings": True},
}


def _cfg(tmp, steps=(1, 1)) -> dict:
    return {
        "model": {"preset": "tiny", "init": "scratch", "overrides": SMALL_OVERRIDES},
        "data": {"root": str(tmp / "data"), "train_split": "train",
                 "generate": {"train": {"num": 4, "seed": 5, "options": {"size": 64}}}},
        "train": {"out": str(tmp / "run"), "batch_size": 2, "lr": 2e-3, "warmup": 1, "seed": 0, "threads": 1,
                  "log_every": 1, "checkpoint_every": 1, "max_tokens": 32},
        "stages": [{"name": "first", "steps": steps[0], "tasks": {"narrative": 1, "refer": 1}},
                   {"name": "second", "steps": steps[1], "tasks": {"narrative": 1, "region_box": 1}}],
    }


def _write(tmp, cfg: dict):
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _refused(config, match: str, capsys) -> None:
    """`training.train --config config` refuses it: exit 2 (a usage error) and one line on stderr matching."""
    from training.train import main

    with pytest.raises(SystemExit, match=match) as refused:
        main(["--config", str(config)])
    assert refused.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and re.search(match, err), err


# ------------------------------------------------------------------------------------------ model.init offline

@pytest.fixture()
def hub_cache(tmp_path, monkeypatch):
    """An empty hub cache of this test's own, and the hub offline (what HF_HUB_OFFLINE=1 sets)."""
    from huggingface_hub import constants

    cache = tmp_path / "hub-cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def test_a_hub_id_init_that_offline_cannot_load_is_refused_before_any_data(tmp_path, hub_cache, capsys):
    """`model.init: someone/model` (no such folder) with the hub offline and no cached copy failed with
    huggingface_hub's LocalEntryNotFoundError traceback only after the data had been generated."""
    cfg = _cfg(tmp_path)
    cfg["model"] = {"init": "someone/model"}
    config = _write(tmp_path, cfg)
    _refused(config, r"model: someone/model is not a folder and the hub is offline \(HF_HUB_OFFLINE=1\) with no "
                     r"copy of it in the local hub cache", capsys)
    assert not (tmp_path / "data").exists() and not (tmp_path / "run").exists()


def test_a_hub_id_init_in_the_cache_or_online_is_not_refused(tmp_path, hub_cache, monkeypatch, small_checkpoint):
    """Offline, a hub id whose snapshot is in the hub cache loads (as from_pretrained reads it offline), and a run
    that resumes from its checkpoint does not read `init` at all; online nothing is looked up before the run (the
    model is downloaded when it is built, as before)."""
    from huggingface_hub import constants

    from pixelllm.checkpoint import _resolve
    from training.train import check_config

    cfg = _cfg(tmp_path)
    cfg["model"] = {"init": "someone/model"}
    config = _write(tmp_path, cfg)
    snapshot = hub_cache / "models--someone--model" / "snapshots" / "0123abc"
    shutil.copytree(small_checkpoint, snapshot)
    (hub_cache / "models--someone--model" / "refs").mkdir()
    (hub_cache / "models--someone--model" / "refs" / "main").write_text("0123abc")
    check_config(cfg, config)
    assert _resolve("someone/model", revision=None, cache_dir=None, token=None, local_files_only=True) == snapshot

    shutil.rmtree(hub_cache / "models--someone--model")
    with pytest.raises(SystemExit, match="not a folder and the hub is offline"):
        check_config(cfg, config)
    checkpoint = tmp_path / "run" / "checkpoint"
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainer_state.pt").write_bytes(b"x")
    (checkpoint / "model.safetensors").write_bytes(b"x")
    check_config(cfg, config)  # resumed: the checkpoint is loaded, not init
    shutil.rmtree(tmp_path / "run")

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)

    def no_lookup(*args, **kwargs):
        pytest.fail("online, the hub is not looked up before the run")

    monkeypatch.setattr("huggingface_hub.snapshot_download", no_lookup)
    check_config(cfg, config)


# ------------------------------------------------------------------------------------------ data.generate

@pytest.mark.parametrize("entry, match", [
    ({"num": 4}, r"data.generate 'train': seed is missing"),
    ({"seed": 1}, r"data.generate 'train': num is missing"),
    ({"num": "abc", "seed": 1}, r"data.generate 'train': num must be a whole number >= 1, got 'abc'"),
    ({"num": 0, "seed": 1}, r"num must be a whole number >= 1, got 0"),
    ({"num": 4, "seed": -1}, r"seed must be a whole number >= 0, got -1"),
    (12, r"data.generate 'train' must be a mapping with num: and seed:"),
    ({"nm": 4, "seed": 1}, r"data.generate 'train': unknown settings \['nm'\]; known: num, seed, options"),
    ({"num": 4, "seed": 1, "options": {"sise": 64}}, r"unknown options \['sise'\]; known: size, world, holdout_only"),
    ({"num": 4, "seed": 1, "options": [64]}, r"options must be a mapping"),
    ({"num": 4, "seed": 1, "options": {"size": "big"}}, r"size must be a whole number >= 64, got 'big'"),
    ({"num": 4, "seed": 1, "options": {"size": 100000}}, r"image size must be between 64 and 2048"),
    ({"num": 4, "seed": 1, "options": {"world": "mars"}}, r"world must be one of"),
    ({"num": 4, "seed": 1, "options": {"holdout_only": "yes"}}, r"options.holdout_only must be true or false"),
])
def test_a_malformed_data_generate_entry_is_one_line_naming_it_before_any_work(tmp_path, entry, match, capsys):
    """A data.generate entry without `seed:` was a KeyError traceback, a typo'd or mistyped option a TypeError
    (`size: big`), a size beyond the generator's bound a MemoryError, after the folders (and the earlier splits)
    were made."""
    cfg = _cfg(tmp_path)
    cfg["data"]["generate"] = {"train": entry}
    _refused(_write(tmp_path, cfg), match, capsys)
    assert not (tmp_path / "data").exists() and not (tmp_path / "run").exists()


def test_data_generate_as_a_list_or_with_a_bad_split_name_is_one_line(tmp_path):
    from training.train import check_config

    for generate, match in (([{"num": 4, "seed": 1}], r"data.generate must map split names to \{num:, seed:\}"),
                            ({"my split": {"num": 4, "seed": 1}}, r"data.generate 'my split': split must be letters"),
                            ({2024: {"num": 4, "seed": 1}}, r"data.generate 2024: a split name must be text")):
        cfg = _cfg(tmp_path)
        cfg["data"]["generate"] = generate
        with pytest.raises(SystemExit, match=match):
            check_config(cfg, "c.yaml")


# ------------------------------------------------------------------------------------------ training.shapes --size

@pytest.mark.parametrize("size", ["100000", "2049"])
def test_shapes_refuses_an_image_size_beyond_its_bound_in_one_line(tmp_path, capsys, size):
    """`python -m training.shapes --size 100000` was a MemoryError traceback (149 GiB for one array) that left the
    split's `.partial` files behind; 2049 px is above the documented bound (twice the largest model input)."""
    from training.data.shapes import generate_scene, main

    with pytest.raises(SystemExit) as exit_info:
        main(["--out", str(tmp_path / "data"), "--split", "t", "--num", "1", "--seed", "1", "--size", size])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"image size must be between 64 and 2048 pixels (the largest model input is 1024), got {size}" in err, err
    assert not (tmp_path / "data").exists()
    with pytest.raises(ValueError, match="between 64 and 2048"):  # the library call too
        generate_scene(1, 0, size=int(size))


# ------------------------------------------------------------------------------------------ evaluate, no referring

def test_evaluate_a_split_without_referring_expressions_reports_the_others_and_referring_as_not_available(
        tmp_path, capsys, small_checkpoint):
    """A split with no referring expressions (an empty refer file) failed with "no referring expressions in the
    evaluated images" (a ValueError traceback) after every image had been predicted, so the caption, dense and
    trace metrics of the run were lost; the referring metrics are null (as every undefined metric is) and the
    rest is evaluated."""
    from training.data.shapes import generate_split
    from training.evaluate import main

    data = tmp_path / "data"
    generate_split(data, "test", 2, seed=3, size=64)
    (data / "test.refer.jsonl").write_text("")
    out = tmp_path / "eval.json"
    assert main(["--checkpoint", str(small_checkpoint), "--data", str(data), "--json", str(out), "--threads", "1",
                 "--max-regions", "2", "--max-new-tokens", "4"]) == 0
    printed = capsys.readouterr().out
    assert "0 expressions" in printed
    assert "Referring: not available (the split has no referring expressions; its metrics are null)" in printed
    result = json.loads(out.read_text())
    for key in ("refer_p@0.5", "mask_mean_iou", "mask_ciou", "refer_score_auroc"):
        assert result["metrics"][key] == {"model": None, "baseline": None}, key
    for key in ("loc_caption_accuracy", "object_recall", "hallucination_rate", "trace_lbm_given_caption"):
        assert result["metrics"][key]["model"] is not None and result["metrics"][key]["baseline"] is not None, key
    assert result["counts"]["expressions"] == 0 and result["counts"]["images"] == 2


# ------------------------------------------------------------------------------------------ a shorter rerun

def test_a_finished_run_rerun_with_fewer_steps_is_refused_and_left_as_it_was(tmp_path, capsys):
    """Rerunning a finished 2-step run's folder with a 1-step config trained nothing and rewrote `final/`, the
    export and `config.resolved.json` as a 1-step run (holding the 2-step weights), exit 0. The same steps (a
    rerun of the finished command) still end at once and rewrite them as before."""
    from training.train import main

    cfg = _cfg(tmp_path)
    cfg["export"] = {"dtype": "float16"}
    config = _write(tmp_path, cfg)
    assert main(["--config", str(config)]) == 0
    run = tmp_path / "run"
    kept = [run / "final" / "model.safetensors", run / "final" / "README.md", run / "config.resolved.json",
            run / "export" / "model.safetensors", run / "metrics.jsonl"]
    before = {path: path.read_bytes() for path in kept}
    shorter = _write(tmp_path, dict(cfg, stages=cfg["stages"][:1]))
    capsys.readouterr()
    _refused(shorter, r"train.out .*run: the run there has already trained 2 steps \(.*checkpoint\), more than the 1 "
                      r"of this config's stages; it is left as it was\. To train the shorter run, give another "
                      r"train.out", capsys)
    assert {path: path.read_bytes() for path in kept} == before
    assert main(["--config", str(_write(tmp_path, cfg))]) == 0  # the same steps: ends at once, as before
    assert "resume from step 2" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------ whole numbers

WHOLE = [64, 64.0, "64", "64.0", np.int64(64), 64.5, "64.5", True, "abc", float("nan"), math.inf, "1e400", None, [64]]


@pytest.mark.parametrize("value", WHOLE, ids=repr)
def test_the_trainer_reads_whole_numbers_by_the_librarys_rule_and_hands_on_ints(tmp_path, value):
    """train.py read whole numbers by a rule of its own (32.0 refused, "32" taken) while the library's
    `as_whole_number` (the app's forms, the predictor's counts) takes 32.0 too. One rule now, the library's, for
    every count of the config: train.*, a stage's steps and warmup, data.limit, data.generate's num / seed /
    size. A value it accepts is written back as an int, since the trainer reads them with int() ("32.0" would
    fail there)."""
    from pixelllm.arguments import as_whole_number
    from training.train import check_config

    expected = as_whole_number(value)
    settings = [("train", "batch_size"), ("train", "log_every"), ("stage", "steps"), ("stage", "warmup"),
                ("data", "limit"), ("generate", "num"), ("size", "size")]
    for where, key in settings:
        if value is None and key == "limit":
            continue  # data.limit: null is every image
        cfg = _cfg(tmp_path)
        node = {"train": cfg["train"], "stage": cfg["stages"][0], "data": cfg["data"],
                "generate": cfg["data"]["generate"]["train"],
                "size": cfg["data"]["generate"]["train"]["options"]}[where]
        node[key] = value
        if expected is None:
            with pytest.raises(SystemExit, match=rf"{key} must be a whole number"):
                check_config(cfg, "c.yaml")
        else:
            check_config(cfg, "c.yaml")
            assert type(node[key]) is int and node[key] == 64, (where, key)


def test_other_numbers_are_handed_on_as_floats_text_included(tmp_path):
    """A learning rate YAML reads as text ("1e-4") is still the number, and the trainer is handed the float; a
    value that is no number is refused as before."""
    from training.train import check_config

    cfg = _cfg(tmp_path)
    cfg["train"]["lr"], cfg["stages"][0]["lr"], cfg["train"]["grad_clip"] = "1e-4", "3e-4", 1
    check_config(cfg, "c.yaml")
    assert (cfg["train"]["lr"], cfg["stages"][0]["lr"], cfg["train"]["grad_clip"]) == (1e-4, 3e-4, 1.0)
    assert all(type(v) is float for v in (cfg["train"]["lr"], cfg["stages"][0]["lr"], cfg["train"]["grad_clip"]))
    for bad in ("abc", True, "nan", float("inf"), -1e-3, [1e-3]):
        cfg = _cfg(tmp_path)
        cfg["train"]["lr"] = bad
        with pytest.raises(SystemExit, match=r"train.lr must be a number >= 0, got "):
            check_config(cfg, "c.yaml")


def test_a_config_the_run_cannot_use_exits_2_with_one_line_in_a_real_process(tmp_path):
    """Every refusal of the config (check_config's and the run folder's) is a usage error: exit 2 and the one line,
    as argparse's own `--config nope.yaml: no such file` (they exited 1 as Python prints a SystemExit message)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    config = _write(tmp_path, _cfg(tmp_path))
    proc = subprocess.run([sys.executable, "-m", "training.train", "--config", str(config), "--train.lr=abc"],
                          cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]),
                                   HF_HUB_OFFLINE="1"))
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == f"config {config}: train.lr must be a number >= 0, got 'abc'\n"
    assert not (tmp_path / "data").exists()

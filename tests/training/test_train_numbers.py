"""training.train's config checks (check_config's numbers written back, check_same_run on resume) and
the library's whole-number rule they read counts by."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("text", ["12345678901234567891", "9007199254740993", "-9007199254740993"])
def test_a_whole_number_written_as_text_is_read_exactly(text):
    """train.py read "N" with int() (exact); the library's rule it now uses read text through float(), which
    rounds past 2**53: a quoted seed "12345678901234567891" became 12345678901234567168, another seed (another
    Shapes split for data.generate, other random draws for train.seed) with no word said."""
    from pixelllm.arguments import as_whole_number

    assert as_whole_number(text) == int(text)


def test_a_quoted_seed_is_written_back_as_the_same_number(tmp_path):
    from training.train import check_config, load_config

    cfg = load_config(ROOT / "training/configs/shapes_tiny.yaml",
                      ["--train.seed='12345678901234567891'", "--data.generate.train.seed='9007199254740993'",
                       f"--train.out={tmp_path / 'run'}"])
    check_config(cfg, "shapes_tiny.yaml")
    assert cfg["train"]["seed"] == 12345678901234567891
    assert cfg["data"]["generate"]["train"]["seed"] == 9007199254740993


def test_whole_numbers_still_read_as_before():
    from pixelllm.arguments import as_whole_number

    for value, expected in (("32", 32), (" 32 ", 32), ("32.0", 32), ("1e3", 1000), ("1_000", 1000), (32.0, 32),
                            ("2.5", None), ("abc", None), ("nan", None), ("inf", None), ("", None), (True, None)):
        assert as_whole_number(value) == expected, value


@pytest.mark.parametrize("shipped", sorted((ROOT / "training" / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_the_shipped_configs_are_accepted_and_their_values_kept(shipped):
    """check_config writes the numbers it reads back into the config: for a shipped config that changes no value
    (32 stays 32, 1e-3 stays 1e-3), only adds the empty `options` of a data.generate entry."""
    from training.train import check_config, load_config

    cfg = load_config(shipped, [])
    before = copy.deepcopy(cfg)
    check_config(cfg, shipped)
    for entry in (cfg["data"].get("generate") or {}).values():
        assert entry.pop("options") == {}
    assert json.dumps(cfg, sort_keys=True) == json.dumps(before, sort_keys=True)


def test_a_run_started_with_numbers_as_text_resumes_as_the_same_run(tmp_path):
    """A run started before the write-back saved `batch_size: "32"`, `lr: "1e-4"` as text in config.resolved.json;
    resumed now, check_config hands on 32 and 0.0001. check_same_run compares the model: section only (which the
    write-back does not touch), so the run is not refused as another one."""
    from training.run_folder import check_same_run
    from training.train import check_config, load_config

    overrides = ["--train.batch_size='32'", "--train.lr=1e-4", "--stages.0.lr=2e-4", "--train.seed='3'",
                 f"--train.out={tmp_path}"]
    old = load_config(ROOT / "training/configs/shapes_tiny.yaml", overrides)
    assert old["train"]["batch_size"] == "32" and old["train"]["lr"] == "1e-4"
    (tmp_path / "config.resolved.json").write_text(json.dumps(old, indent=2))
    cfg = load_config(ROOT / "training/configs/shapes_tiny.yaml", overrides)
    check_config(cfg, "shapes_tiny.yaml")
    assert (cfg["train"]["batch_size"], cfg["train"]["lr"], cfg["train"]["seed"]) == (32, 1e-4, 3)
    assert cfg["model"] == old["model"]
    check_same_run(tmp_path, cfg)  # no SystemExit

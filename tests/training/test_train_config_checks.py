"""A config or a flag the trainer cannot use is refused in one line before any work: a missing or broken
config, stages that cannot train, typo'd or wrong-kind settings, overrides naming nothing or meant for a
checkpoint; the key lists match what the trainer reads; every command refuses an abbreviated flag."""

from __future__ import annotations

import re

import pytest
import yaml

from tests.training.conftest import ROOT, SMALL_OVERRIDES, _config


def test_a_misspelt_task_batch_size_is_refused_before_any_work(tmp_path):
    from training.train import main

    config = _config(tmp_path, (1, 1))
    cfg = yaml.safe_load(config.read_text())
    cfg["train"]["task_batch_size"] = {"refer_images": 2}
    config.write_text(yaml.safe_dump(cfg))
    with pytest.raises(SystemExit, match="refer_images"):
        main(["--config", str(config)])
    assert not (tmp_path / "data").exists()  # refused before generating data


def test_a_missing_or_broken_config_is_refused_with_one_line(tmp_path, capsys):
    from training.train import main

    with pytest.raises(SystemExit) as missing:
        main(["--config", str(tmp_path / "nope.yaml")])
    assert missing.value.code == 2 and "nope.yaml: no such file" in capsys.readouterr().err
    broken = tmp_path / "broken.yaml"
    broken.write_text("train: {steps: [1, 2\n")
    with pytest.raises(SystemExit, match=r"broken.yaml is not valid YAML"):
        main(["--config", str(broken)])
    scalar = tmp_path / "scalar.json"
    scalar.write_text("3")
    with pytest.raises(SystemExit, match=r"scalar.json must be a mapping .* got int"):
        main(["--config", str(scalar)])
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize("change, match", [
    (lambda c: c["stages"][0].update(steps=0), r"stage 1 \('caption_pretraining'\): steps must be a whole number"),
    (lambda c: c["stages"][1].update(steps=-3), r"stage 2 \('multitask'\): steps must be a whole number"),
    (lambda c: c.update(stages=[]), r"stages must be a non-empty list"),
    (lambda c: c["stages"][1].pop("steps"), r"stage 2 \('multitask'\): steps must be a whole number"),
    (lambda c: c["stages"][1].update(tasks={"narative": 1}), r"stage 2 \('multitask'\): unknown tasks \['narative'\]"),
    (lambda c: c["train"].pop("lr"), r"train.lr is missing"),
    (lambda c: c["train"].pop("batch_size"), r"train.batch_size is missing"),
    (lambda c: c.pop("stages"), r"no `stages:` section"),
    (lambda c: c["train"].update(checkpoint_evry=5), r"unknown train settings \['checkpoint_evry'\]"),
])
def test_a_config_whose_stages_cannot_train_is_refused_before_any_work(tmp_path, change, match):
    """A stage of 0 or negative steps used to finish with exit 0 and an untrained `final/` (and export); a typo'd
    task or key in a later stage failed with a traceback only after the earlier stages had trained."""
    from training.train import main

    config = _config(tmp_path, (1, 1))
    cfg = yaml.safe_load(config.read_text())
    change(cfg)
    config.write_text(yaml.safe_dump(cfg))
    with pytest.raises(SystemExit, match=match):
        main(["--config", str(config)])
    assert not (tmp_path / "data").exists() and not (tmp_path / "run").exists()


@pytest.mark.parametrize("override", ["--stages.5.steps=3", "--train.lr.x=1", "--stages.first.steps=2"])
def test_an_override_that_names_nothing_is_one_line(tmp_path, override):
    """An override past the last stage was an IndexError traceback (a key under a number: AttributeError)."""
    from training.train import main

    config = _config(tmp_path, (1, 1))
    with pytest.raises(SystemExit, match=rf"override '{re.escape(override)}' names nothing in"):
        main(["--config", str(config), override])
    assert not (tmp_path / "data").exists()


def test_train_keys_are_the_settings_the_trainer_reads():
    """check_config refuses a train.* setting outside TRAIN_KEYS: the list must name every setting main() reads
    (a new `tcfg.get("x")` missing from it would refuse every config that sets x), and nothing it does not."""
    import inspect

    import training.train as train

    read = set(re.findall(r'tcfg(?:\.get\(|\[)"([a-z_]+)"', inspect.getsource(train)))
    assert read == set(train.TRAIN_KEYS)


@pytest.mark.parametrize("override, match", [
    ("--trian.lr=1", r"unknown sections \['trian'\]"),
    ("--data.limt=3", r"unknown data settings \['limt'\]"),
    ("--model.overide.roi_grid=4", r"unknown model settings \['overide'\]"),
    ("--stages.1.lrr=1e-4", r"stage 2 \('multitask'\): unknown settings \['lrr'\]"),
    ("--export.dype=float16", r"unknown export settings \['dype'\]"),
])
def test_a_typo_in_a_setting_or_section_name_is_refused_before_any_work(tmp_path, override, match):
    """A misspelt section or setting (outside train.*, already checked) was ignored: `--trian.lr=1` or a stage's
    `lrr:` trained at the config's own learning rate, `--data.limt=3` on every image, exit 0 and no word."""
    from training.train import main

    config = _config(tmp_path, (1, 1))
    with pytest.raises(SystemExit, match=match):
        main(["--config", str(config), override])
    assert not (tmp_path / "data").exists() and not (tmp_path / "run").exists()


@pytest.mark.parametrize("override, match", [
    ("--train.lr=abc", r"train.lr must be a number >= 0, got 'abc'"),
    ("--train.log_every=0", r"train.log_every must be a whole number >= 1, got 0"),
    ("--train.batch_size=2.5", r"train.batch_size must be a whole number >= 1, got 2.5"),
    ("--stages.0.warmup=-1", r"stage 1 \('caption_pretraining'\): warmup must be a whole number >= 0, got -1"),
    ("--model.preset=tinny", r"model: unknown preset 'tinny'"),
    ("--model.overrides.roi_grd=4", r"model: .*unexpected keyword argument 'roi_grd'"),
    ("--stages.1.stage=multitsk", r"stage 2 \('multitask'\): stage must be one of scratch, .*got 'multitsk'"),
    ("--export.dtype=float61", r"export.dtype must be one of float32, float16, bfloat16, got 'float61'"),
])
def test_a_setting_of_the_wrong_kind_is_one_line_before_any_work(tmp_path, override, match):
    """A value the trainer cannot use was a traceback once the data was generated (a typo'd preset or override,
    `lr: abc`), at the first step (`log_every: 0`: ZeroDivisionError), when the typo'd stage began after the
    stages before it had trained, or, for `export.dtype`, after the whole run (`AttributeError: module 'torch' has
    no attribute 'float61'`, exit 1)."""
    from training.train import main

    config = _config(tmp_path, (1, 1))
    with pytest.raises(SystemExit, match=match):
        main(["--config", str(config), override])
    assert not (tmp_path / "data").exists() and not (tmp_path / "run").exists()


def test_numbers_yaml_reads_as_text_are_still_numbers(tmp_path):
    """YAML reads `--train.lr=1e-4` as the text "1e-4" (no dot); the trainer's float() takes it, so the check does."""
    from training.train import check_config, load_config

    config = _config(tmp_path, (1, 1))
    cfg = load_config(config, ["--train.lr=1e-4", "--stages.0.lr=3e-4"])
    assert cfg["train"]["lr"] == "1e-4"
    check_config(cfg, config)
    for shipped in sorted((ROOT / "training" / "configs").glob("*.yaml")):
        check_config(load_config(shipped, []), shipped)


def test_section_keys_are_the_settings_the_trainer_reads():
    """As TRAIN_KEYS: every stage / data / model / export setting main() reads is in SECTION_KEYS (a missing one
    would refuse every config that sets it)."""
    import inspect

    import pixelllm.model_card as model_card
    import training.run_folder as run_folder
    import training.train as train

    source = inspect.getsource(train) + inspect.getsource(model_card) + inspect.getsource(run_folder)
    for section, pattern in (("stage", r'stage(?:\.get\(|\[)"([a-z_]+)"'),
                             ("data", r'cfg\["data"\](?:\.get\(|\[)"([a-z_]+)"'),
                             ("model", r'(?:mcfg|cfg\["model"\])(?:\.get\(|\[)"([a-z_]+)"'),
                             ("export", r'(?:export|cfg\["export"\])\.get\("([a-z_]+)"')):
        assert set(re.findall(pattern, source)) == set(train.SECTION_KEYS[section]), section


class _Parsed(Exception):
    """Raised in place of running a command once argparse has taken all of its arguments."""


@pytest.mark.parametrize(("module", "argv", "refused"), [
    ("training.export", ["--out", "o", "--stat", "accepted"], "unrecognized arguments: --stat accepted"),
    ("training.average", ["--checkpoints", "a", "--out", "o", "--dt", "float32"], "unrecognized arguments: --dt"),
    ("training.data.shapes.splits", ["--out", "o", "--split", "s", "--num", "1", "--seed", "1", "--hold"],
     "unrecognized arguments: --hold"),
    ("training.evaluate", ["--checkpoint", "c", "--data", "d", "--lim", "3"], "unrecognized arguments: --lim 3"),
    ("training.simulate_annotators", ["--step", "1"], "unrecognized arguments: --step 1"),
    ("training.finetune", ["--out", "o", "--step", "1"], "unrecognized arguments: --step 1"),
    ("training.convert", ["vg", "--regions", "r", "--out", "o", "--max-reg", "3"],
     "unrecognized arguments: --max-reg 3"),
    ("training.train", ["--conf", "c.yaml"], "the following arguments are required: --config"),
    ("pixelllm.bench.run", ["--qui"], "unrecognized arguments: --qui"),
    ("app", ["--conc", "3"], "unrecognized arguments: --conc 3"),
])
def test_every_command_refuses_an_abbreviated_flag(module, argv, refused, monkeypatch, capsys):
    """argparse took any unambiguous prefix for a flag (`--step 1` for `--steps 1`): a half-remembered flag set
    another one silently, and a flag added later could change what an old command meant. Every command refuses
    it now (exit 2). argparse is spied on so that a command that takes its arguments stops there, doing nothing."""
    import argparse
    import importlib

    real = argparse.ArgumentParser.parse_known_args

    def parse_known_args(self, args=None, namespace=None):
        parsed, extras = real(self, args, namespace)
        if not extras:
            raise _Parsed(parsed)
        return parsed, extras

    command = importlib.import_module(module)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", parse_known_args)
    with pytest.raises(SystemExit) as exited:
        (command.parse_args if module == "app" else command.main)(argv)
    assert exited.value.code == 2 and refused in capsys.readouterr().err


class _Built(Exception):
    """Raised in place of building the model, carrying what build_pixelllm was given."""


def test_overrides_reach_a_model_built_from_a_preset_and_are_refused_for_a_checkpoint(tmp_path, monkeypatch):
    """`model.init: <preset>` built the preset by name, so `model.overrides` were silently dropped (the run trained
    the preset's defaults); a checkpoint folder brings its own config, so overrides there are refused up front."""
    import training.train as train

    config = _config(tmp_path, (1, 1))
    cfg = yaml.safe_load(config.read_text())
    cfg["model"]["init"] = "tiny"
    config.write_text(yaml.safe_dump(cfg))

    def build(what, **components):
        raise _Built(what)

    monkeypatch.setattr(train, "build_pixelllm", build)
    with pytest.raises(_Built) as built:
        train.main(["--config", str(config)])
    for key, value in SMALL_OVERRIDES.items():
        if not isinstance(value, dict):
            assert getattr(built.value.args[0], key) == value, key

    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text("{}")
    cfg["model"]["init"] = str(checkpoint)
    config.write_text(yaml.safe_dump(cfg))
    with pytest.raises(SystemExit, match="overrides apply to init: scratch or a preset, not to the checkpoint"):
        train.main(["--config", str(config)])

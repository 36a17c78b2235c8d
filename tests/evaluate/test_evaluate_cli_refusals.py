"""What `python -m training.evaluate` refuses in one line, before the model loads or any image is evaluated:
options out of range, a missing split or checkpoint, a truncated weights file, a checkpoint without its
tokenizer, a JSON target it cannot write, a malformed or bad record, a missing image, a device this machine
lacks."""

from __future__ import annotations

import json
import re

import pytest
import torch

from training.data.shapes import generate_split
from training.evaluate import (
    main,
)


def test_cli_rejects_a_repetition_penalty_out_of_range(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--checkpoint", "unused", "--data", "unused", "--repetition-penalty", "0.5"])
    assert exit_info.value.code == 2
    assert "--repetition-penalty must be between 1 (off) and 2, got 0.5" in capsys.readouterr().err


def test_cli_names_a_missing_split_or_checkpoint_in_one_line(tmp_path, capsys) -> None:
    """The user's mistakes end as argparse errors (exit 2, no traceback), the data checked before the model
    is loaded."""
    with pytest.raises(SystemExit) as exit_info:
        main(["--checkpoint", str(tmp_path / "no-model"), "--data", str(tmp_path / "no-data")])
    assert exit_info.value.code == 2
    assert "--data/--split: no Shapes split 'test' in" in capsys.readouterr().err
    generate_split(tmp_path / "data", "test", 1, seed=3)
    with pytest.raises(SystemExit) as exit_info:
        main(["--checkpoint", str(tmp_path / "no-model"), "--data", str(tmp_path / "data")])
    assert exit_info.value.code == 2
    assert "--checkpoint: checkpoint directory not found" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["--checkpoint", str(tmp_path / "no-model"), "--data", str(tmp_path / "data"), "--limit", "0"])
    assert "--limit must be at least 1, got 0" in capsys.readouterr().err


def test_cli_names_a_truncated_weights_file_in_one_line(tmp_path, capsys) -> None:
    """A checkpoint whose model.safetensors was cut short (a copy or download interrupted) used to end in a
    safetensors traceback; it is an argparse error naming the file, before any image is evaluated."""
    from tests.helpers import save_small_checkpoint

    checkpoint = save_small_checkpoint(tmp_path / "model")
    weights = checkpoint / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    generate_split(tmp_path / "data", "test", 1, seed=3)
    with pytest.raises(SystemExit) as exit_info:
        main(["--checkpoint", str(checkpoint), "--data", str(tmp_path / "data"), "--threads", "1"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"--checkpoint: {weights} is not a readable safetensors file" in err and "Traceback" not in err


@pytest.mark.parametrize("target, match", [
    ("a_folder", r"is a folder; give a file name"),
    ("a_file/results.json", r"cannot write in .*a_file"),  # its folder is a file
])
def test_cli_refuses_a_json_target_it_cannot_write_before_evaluating(tmp_path, capsys, target, match) -> None:
    """--json to a folder (or under a file) failed with a traceback only after the whole evaluation had run."""
    (tmp_path / "a_folder").mkdir()
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(SystemExit) as exit_info:
        main(["--checkpoint", str(tmp_path / "no-model"), "--data", str(tmp_path / "no-data"),
              "--json", str(tmp_path / target)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert re.search(match, err) and "Traceback" not in err and "--checkpoint:" not in err  # refused first


def test_cli_names_the_file_and_line_of_a_malformed_jsonl_record(tmp_path, capsys) -> None:
    """A broken line of a split's JSONL was reported as json's "Expecting property name ...: line 1 column 2",
    without the file, and with a line number that was not the file's."""
    generate_split(tmp_path / "data", "test", 2, seed=3)
    refer = tmp_path / "data" / "test.refer.jsonl"
    lines = refer.read_text().splitlines()
    refer.write_text("\n".join([lines[0], "{'expression': 'single quotes'}", *lines[1:]]) + "\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["--checkpoint", str(tmp_path / "no-model"), "--data", str(tmp_path / "data")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"{refer}, line 2: not JSON" in err and "Traceback" not in err


@pytest.mark.parametrize("kind, change, match", [
    ("refer", lambda r: r.__setitem__("box", [float("nan"), 0, 50, 50]), "box has a NaN or infinite value"),
    ("refer", lambda r: r.__setitem__("box", [None, 0, 50, 50]), r"box must be \[x0, y0, x1, y1\]"),
    ("objects", lambda r: r["objects"][0].__setitem__("box", [0, 0, float("inf"), 5]), r"objects\[0\]: box has a"),
], ids=["refer-nan", "refer-null", "objects-infinity"])
def test_cli_names_a_bad_box_of_a_split_in_one_line_before_the_model_loads(tmp_path, capsys, kind, change, match
                                                                           ) -> None:
    """A NaN referring box failed in the metrics after every image was predicted (a traceback without the file), a
    null one with a TypeError traceback; an infinite object box went to the model as a box prompt."""
    generate_split(tmp_path / "data", "test", 2, seed=3)
    path = tmp_path / "data" / f"test.{kind}.jsonl"
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    change(lines[1])
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    with pytest.raises(SystemExit) as exit_info:
        main(["--checkpoint", str(tmp_path / "no-model"), "--data", str(tmp_path / "data")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert re.search(rf"{re.escape(str(path))}, line 2: {match}", err), err
    assert "Traceback" not in err and "--checkpoint:" not in err  # refused before the model is loaded


@pytest.mark.parametrize("device, match", [("cuda", "no CUDA device is available"), ("gpu", "--device gpu: ")])
def test_cli_names_a_device_this_machine_lacks_before_the_model_loads(tmp_path, capsys, monkeypatch, device, match
                                                                     ) -> None:
    """`--device cuda` without a GPU was a RuntimeError traceback ("Found no NVIDIA driver") after the model and
    every split had loaded; app.py and the bench already said so in one line."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a machine without one, also on a GPU host
    with pytest.raises(SystemExit) as exit_info:
        main(["--checkpoint", str(tmp_path / "no-model"), "--data", str(tmp_path / "no-data"), "--device", device])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert match in err and "--data/--split" not in err and "--checkpoint:" not in err  # before data and model


@pytest.mark.parametrize("flags, match", [
    (["--max-regions", "0"], "--max-regions must be a whole number between 1 and 100, got 0"),
    (["--max-new-tokens", "1000"], "--max-new-tokens must be a whole number between 1 and 512, got 1000"),
    (["--score-threshold", "2"], "--score-threshold must be between 0 and 1, got 2.0"),
    (["--score-threshold", "nan"], "--score-threshold must be between 0 and 1, got nan"),
])
def test_cli_refuses_a_decoding_or_dense_option_the_predictor_refuses_before_the_model_loads(tmp_path, capsys,
                                                                                           flags, match) -> None:
    """`--max-new-tokens 1000` (a longer narrative), `--max-regions 0` or `--score-threshold 2` passed argparse
    and failed at the first image, a ValueError traceback from the predictor, after the data and the model had
    loaded."""
    with pytest.raises(SystemExit) as exit_info:
        main(["--checkpoint", str(tmp_path / "no-model"), "--data", str(tmp_path / "no-data"), *flags])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert match in err and "--data/--split" not in err and "--checkpoint:" not in err  # before data and model


def test_cli_names_a_checkpoint_without_its_tokenizer_in_one_line(tmp_path, capsys) -> None:
    """A checkpoint folder that lost its tokenizer.json (the weights copied alone) loads without a tokenizer; the
    evaluation then ended in a traceback telling the user to "load it with PixelLLM.from_pretrained", which it
    had."""
    from tests.helpers import save_small_checkpoint

    checkpoint = save_small_checkpoint(tmp_path / "model")
    (checkpoint / "tokenizer.json").unlink()
    generate_split(tmp_path / "data", "test", 1, seed=3)
    with pytest.raises(SystemExit) as exit_info:
        main(["--checkpoint", str(checkpoint), "--data", str(tmp_path / "data"), "--threads", "1"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"--checkpoint {checkpoint}: it has no tokenizer (tokenizer.json or spiece.model" in err, err


def test_cli_names_a_missing_image_of_a_split_in_one_line_before_the_model_loads(tmp_path, capsys) -> None:
    """A split whose images/ lacks a file (the JSONL files copied without every image) was a FileNotFoundError
    traceback when that image's turn came: after the model had loaded and every image before it was evaluated."""
    data = tmp_path / "data"
    generate_split(data, "test", 2, seed=3)
    (data / "images" / "test_000001.png").unlink()
    with pytest.raises(SystemExit) as exit_info:
        main(["--checkpoint", str(tmp_path / "no-model"), "--data", str(data)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert (f"--data/--split: test: image 'test_000001' (images/test_000001.png): no such file: "
            f"{data / 'images' / 'test_000001.png'}") in err and "--checkpoint:" not in err, err

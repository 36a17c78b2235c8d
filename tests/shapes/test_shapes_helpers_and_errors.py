"""The Shapes world generator's helpers and errors: mention parsing, bad options refused (library and CLI), an
`--out` that is a file, a colour instance map, a missing split."""

import pytest
from PIL import Image

from training.data.shapes import (
    generate_split,
    load_instance_map,
    load_split,
    main,
    parse_mentions,
)


def test_parse_mentions_is_tolerant():
    text = "In this picture: a LARGE red Circle, and a small-blue cross! Red large star; large green."
    assert parse_mentions(text) == [("large", "red", "circle"), ("small", "blue", "cross")]
    assert parse_mentions("nothing here") == []


@pytest.mark.parametrize(
    "kwargs",
    [dict(split="a/b"), dict(world="moon"), dict(num=0), dict(size=16), dict(seed=-1)],
)
def test_bad_options_raise_value_error(tmp_path, kwargs):
    options = dict(split="train", num=1, seed=0) | kwargs
    world = options.pop("world", "standard")
    size = options.pop("size", 256)
    with pytest.raises(ValueError):
        generate_split(tmp_path, options["split"], options["num"], options["seed"], size=size, world=world)


def test_cli_rejects_bad_options(tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main(["--out", str(tmp_path), "--split", "x", "--num", "0", "--seed", "1"])
    assert exit_info.value.code == 2


def test_cli_names_an_out_that_is_a_file_in_one_line(tmp_path, capsys):
    """`--out` naming a file (e.g. a split's JSONL) was a NotADirectoryError traceback."""
    (tmp_path / "train.ln.jsonl").write_text("{}\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["--out", str(tmp_path / "train.ln.jsonl"), "--split", "x", "--num", "1", "--seed", "1"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"--out {tmp_path / 'train.ln.jsonl'}: cannot write the split there: Not a directory" in err, err


def test_load_instance_map_rejects_colour_images(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "rgb.png")
    with pytest.raises(ValueError):
        load_instance_map(tmp_path, "rgb.png")


def test_load_split_reports_missing_files(tmp_path):
    with pytest.raises(ValueError, match="missing"):
        load_split(tmp_path, "nothing")

"""The shared split of the Shapes generator's tests (this folder only): `data_dir`, 12 standard, 5 --holdout-only
and 5 --world shift images made through the CLI (module-scoped, so each test module makes its own), `SPLITS` (its
images per split) and `objects_of` (a split's objects records). The test modules import them from here."""

from pathlib import Path

import pytest

from training.data.shapes import load_split, main

SPLITS = {"train": 12, "heldout": 5, "shifted": 5}  # images per split in the shared fixture


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """12 standard, 5 --holdout-only and 5 --world shift images in one directory, through the CLI."""
    root = tmp_path_factory.mktemp("shapes")
    main(["--out", str(root), "--split", "train", "--num", "12", "--seed", "11"])
    main(["--out", str(root), "--split", "heldout", "--num", "5", "--seed", "12", "--holdout-only"])
    main(["--out", str(root), "--split", "shifted", "--num", "5", "--seed", "13", "--world", "shift"])
    return root


def objects_of(data_dir: Path, split: str) -> list[dict]:
    return load_split(data_dir, split).objects

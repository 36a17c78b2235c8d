"""The Shapes world generator interrupted: a split cut short does not look complete (and training regenerates it),
a regeneration killed part-way is refused by every reader until the rerun makes it whole, and a second generator of
the same split is refused while the first runs."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from training.data.shapes import (
    generate_split,
    load_split,
    main,
)


def test_a_split_cut_short_does_not_look_complete_and_training_regenerates_it(tmp_path, monkeypatch):
    """A kill mid-generation left four half-written JSONL files (of different lengths) that `training.train`
    took for a complete split on the rerun the README advises."""
    from training.data.shapes import splits
    from training.train import ensure_data

    generate_split(tmp_path, "t", 3, seed=1)  # a complete earlier split of the same name
    real = splits.generate_scene

    def killed_at_the_third(seed, index, **kwargs):
        if index == 2:
            raise KeyboardInterrupt  # stands for the kill
        return real(seed, index, **kwargs)

    monkeypatch.setattr(splits, "generate_scene", killed_at_the_third)
    with pytest.raises(KeyboardInterrupt):
        generate_split(tmp_path, "t", 5, seed=2)
    assert not (tmp_path / "t.objects.jsonl").exists()
    monkeypatch.undo()
    ensure_data({"data": {"root": str(tmp_path), "generate": {"t": {"num": 5, "seed": 2}}}}, rank=0, world=1)
    lengths = {kind: len(splits.load_jsonl(tmp_path / f"t.{kind}.jsonl")) for kind in ("ln", "dense", "objects")}
    assert lengths == {"ln": 5, "dense": 5, "objects": 5}
    assert not list(tmp_path.glob("*.partial"))


# `python -m training.shapes`, in a child process whose generator stops before the image PAUSE_AT: with "die" it
# dies there (os._exit: no `finally`, no cleanup, as a SIGKILL); with "wait" it says "paused" and waits for a line
# on stdin, then goes on.
_GENERATOR_STOPPED_AT = """import os, sys
import training.data.shapes.splits as splits
real = splits.generate_scene
def stop_at(seed, index, **kwargs):
    if index == int(os.environ["PAUSE_AT"]):
        if os.environ["HOW"] == "die":
            os._exit(9)
        print("paused", flush=True)
        sys.stdin.readline()
    return real(seed, index, **kwargs)
splits.generate_scene = stop_at
sys.exit(splits.main(sys.argv[1:]))
"""


_ROOT = Path(__file__).resolve().parents[2]


def _stopped_generator(how: str, out: Path, *args: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(_ROOT), PAUSE_AT="2", HOW=how, OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-c", _GENERATOR_STOPPED_AT, "--out", str(out), *args], cwd=_ROOT,
                            env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def _split_files(root: Path, split: str) -> dict[str, bytes]:
    files = [f"{split}.{kind}.jsonl" for kind in ("ln", "refer", "dense", "objects")]
    files += [f"{folder}/{split}_{i:06d}.png" for folder in ("images", "masks") for i in range(5)]
    return {name: (root / name).read_bytes() for name in files}


def test_a_regeneration_killed_part_way_is_refused_by_every_reader_and_the_rerun_makes_it_whole(tmp_path):
    """A split regenerated with another seed and killed at its third image kept the earlier run's ln / refer /
    dense files beside two new images: `training.train` without a data.generate entry for the split (and
    `training.finetune --replay-data`) trained on narratives of other pictures as if the split were whole."""
    from training.data.datasets import ShapesData
    from training.train import check_split

    data, fresh = tmp_path / "data", tmp_path / "fresh"
    main(["--out", str(data), "--split", "t", "--num", "5", "--seed", "1", "--size", "64"])
    command = ["--split", "t", "--num", "5", "--seed", "2", "--size", "64"]
    killed = _stopped_generator("die", data, *command)
    killed.communicate(timeout=120)
    assert killed.returncode == 9
    with pytest.raises(ValueError, match="cut short while it was generated"):
        ShapesData(data, "t", 64)
    with pytest.raises(SystemExit, match="run the same python -m training.shapes command again"):
        check_split(data, "t")
    with pytest.raises(ValueError, match="cut short"):
        load_split(data, "t")
    main(["--out", str(data), *command])  # the rerun needs no cleaning up by hand
    main(["--out", str(fresh), *command])
    assert _split_files(data, "t") == _split_files(fresh, "t")
    assert not list(data.glob("*.partial"))
    assert len(ShapesData(data, "t", 64).records) == 5


def test_a_second_generator_of_the_same_split_is_refused_while_the_first_runs(tmp_path, capsys):
    """Two generators of one split at once wrote into the same `.partial` files and images; the second (seed 2)
    finished and renamed them into place, then the first (seed 1) went on writing into the renamed files: a split
    that looked complete, mixing both runs."""
    data, fresh = tmp_path / "data", tmp_path / "fresh"
    first = _stopped_generator("wait", data, "--split", "t", "--num", "5", "--seed", "1", "--size", "64")
    try:
        assert first.stdout.readline().strip() == "paused"
        with pytest.raises(SystemExit) as refused:
            main(["--out", str(data), "--split", "t", "--num", "5", "--seed", "2", "--size", "64"])
        assert refused.value.code == 2
        assert "another process is writing split 't'" in capsys.readouterr().err
        main(["--out", str(data), "--split", "u", "--num", "2", "--seed", "3", "--size", "64"])  # other splits may
    finally:
        out, _ = first.communicate("go\n", timeout=120)
    assert first.returncode == 0, out
    main(["--out", str(fresh), "--split", "t", "--num", "5", "--seed", "1", "--size", "64"])
    assert _split_files(data, "t") == _split_files(fresh, "t")
    # the lock files stay (removing one lets two generators in at once: see splits._only_writer), and only they
    assert sorted(p.name for p in data.iterdir() if p.name.startswith(".")) == [".t.lock", ".u.lock"]

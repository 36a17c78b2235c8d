"""`python -m training.average`: the parameter-wise mean of checkpoints (docs/referring.md §17)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from pixelllm import PixelLLM
from tests.helpers import run_with_file_size_limit, save_small_checkpoint, small_model
from training import average


def test_average_of_three_checkpoints_is_their_mean_and_loads(tmp_path):
    folders = [save_small_checkpoint(tmp_path / f"run{seed}", seed=seed) for seed in (0, 1, 2)]
    runs = [PixelLLM.from_pretrained(str(folder)) for folder in folders]
    assert average.main(["--checkpoints", *map(str, folders), "--out", str(tmp_path / "soup"),
                         "--dtype", "float32"]) == 0

    soup = PixelLLM.from_pretrained(str(tmp_path / "soup"))
    params = [dict(run.named_parameters()) for run in runs]
    differing = 0
    for name, value in soup.named_parameters():
        expected = sum(p[name] for p in params) / 3
        torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6)
        differing += not torch.equal(params[0][name], params[1][name])
    assert differing > 10  # the three runs really differ, so the mean is not any one of them
    assert soup.config.to_dict() == runs[0].config.to_dict()
    assert soup.tokenizer is not None and len(soup.tokenizer) == len(runs[0].tokenizer)
    assert "training.average" in (tmp_path / "soup" / "README.md").read_text()


def test_float16_output_and_refusals(tmp_path):
    a = save_small_checkpoint(tmp_path / "a", seed=0)
    b = save_small_checkpoint(tmp_path / "b", seed=1)
    average.main(["--checkpoints", str(a), str(b), "--out", str(tmp_path / "half")])
    weights = load_file(tmp_path / "half" / "model.safetensors")
    assert {w.dtype for w in weights.values() if w.is_floating_point()} == {torch.float16}

    with pytest.raises(ValueError, match="at least two"):
        average.average_checkpoints([a])
    other = tmp_path / "other"
    small_model(seed=0, loc_head_hidden=32).save_pretrained(other)
    with pytest.raises(SystemExit, match="another config"):
        average.main(["--checkpoints", str(a), str(other), "--out", str(tmp_path / "bad")])
    assert not (tmp_path / "bad").exists()
    tuned = small_model(seed=0)
    tuned.add_adapter("corrections")  # a LoRA adapter the mean would silently drop
    tuned.save_pretrained(tmp_path / "tuned")
    with pytest.raises(SystemExit, match="LoRA adapters"):
        average.main(["--checkpoints", str(a), str(tmp_path / "tuned"), "--out", str(tmp_path / "bad")])
    with pytest.raises(SystemExit, match="is the checkpoint .* or holds it"):
        average.main(["--checkpoints", str(a), str(b), "--out", str(b)])
    assert (b / "model.safetensors").exists()


def test_an_out_that_is_not_a_checkpoint_is_refused_and_left_as_it_was(tmp_path):
    """`--out` used to be removed whatever it held: `--out runs` took every run with it."""
    runs = tmp_path / "runs"
    a = save_small_checkpoint(runs / "a", seed=0)
    b = save_small_checkpoint(runs / "b", seed=1)
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "plan.txt").write_text("keep me")
    for out, reason in ((runs, "or holds it"), (notes, "not a checkpoint folder"),
                        (notes / "plan.txt", "is a file")):
        with pytest.raises(SystemExit, match=reason):
            average.main(["--checkpoints", str(a), str(b), "--out", str(out)])
    assert (notes / "plan.txt").read_text() == "keep me"
    assert sorted(p.name for p in runs.iterdir()) == ["a", "b"] and (a / "model.safetensors").is_file()

    soup = tmp_path / "soup"  # a checkpoint folder from an earlier average is replaced, as before
    assert average.main(["--checkpoints", str(a), str(b), "--out", str(soup)]) == 0
    assert average.main(["--checkpoints", str(a), str(b), "--out", str(soup), "--dtype", "float32"]) == 0
    assert {w.dtype for w in load_file(soup / "model.safetensors").values()} == {torch.float32}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes", "runs", "soup"]  # nothing left beside it


def test_a_save_that_does_not_fit_keeps_the_previous_average(tmp_path):
    a = save_small_checkpoint(tmp_path / "a", seed=0)
    b = save_small_checkpoint(tmp_path / "b", seed=1)
    soup = tmp_path / "soup"
    average.main(["--checkpoints", str(a), str(b), "--out", str(soup)])  # float16
    before = (soup / "model.safetensors").read_bytes()
    limit = len(before) + len(before) // 2  # float32 weights are twice the size: the write really fails
    proc = run_with_file_size_limit("training.average", limit, "--checkpoints", str(a), str(b), "--out", str(soup),
                                    "--dtype", "float32")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    assert "cannot save" in proc.stderr and "soup is kept as it was" in proc.stderr, proc.stderr
    assert (soup / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "soup"]  # no half-written folder beside it

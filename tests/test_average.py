"""`python -m training.average`: the parameter-wise mean of checkpoints (docs/referring.md §17)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from pixelllm import PixelLLM
from tests.helpers import save_small_checkpoint, small_model
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
    with pytest.raises(SystemExit, match="one of the checkpoints"):
        average.main(["--checkpoints", str(a), str(b), "--out", str(b)])
    assert (b / "model.safetensors").exists()

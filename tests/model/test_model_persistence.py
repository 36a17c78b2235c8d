"""The model library's persistence (issue: PixelLLM model library): a bit-exact save/load round trip with
adapters, pickle weights refused, an old checkpoint of a tied Flan-T5 head, config.json, the model card, and
loading into the dtype asked for."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file

from pixelllm.build import read_state_dict
from pixelllm.modeling.pixel_llm import PixelLLM
from tests.helpers import small_model
from tests.model.conftest import _decode, _prefix


def _outputs(model: PixelLLM) -> dict:
    prefix = _prefix(model, seed=7, box=[0.2, 0.1, 0.9, 0.7])
    tokens, boxes = _decode(model, prefix, n=12)
    gen = torch.Generator().manual_seed(1)
    images = torch.rand(1, 3, model.config.image_size, model.config.image_size, generator=gen) * 255
    with torch.no_grad():
        feats = model.encode_image(images)
        refer = model.refer(feats, torch.tensor([[10, 11, 12]]), torch.ones(1, 3, dtype=torch.long))
        proposals = model.propose(feats, score_threshold=0.0)
    # model.refer also returns "boxes": its keys get a prefix of their own, or the referral box would overwrite the
    # caption's per-word boxes and the round-trip checks would never compare the latter
    return {"tokens": tokens, "caption_boxes": boxes, **{f"refer_{k}": v for k, v in refer.items()},
            "proposals": proposals[0][0]}


def test_save_load_round_trip_is_bit_exact(tmp_path):
    model = small_model(seed=4)
    model.add_adapter("fix")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    before = _outputs(model)
    model.save_pretrained(tmp_path / "ckpt")
    files = {p.name for p in (tmp_path / "ckpt").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "adapters", "adapters.json"} <= files
    assert not any(f.endswith((".bin", ".pt", ".pth")) for f in files)
    loaded = PixelLLM.from_pretrained(tmp_path / "ckpt")
    assert loaded.active_adapter == "fix" and loaded.adapters == ["fix"]
    after = _outputs(loaded)
    assert before["tokens"] == after["tokens"]
    assert set(before) == set(after) == {"tokens", "caption_boxes", "refer_boxes", "refer_score", "refer_mask_rows",
                                         "refer_mask_logits", "refer_mask_iou", "proposals"}
    assert before["caption_boxes"].shape == (len(before["tokens"]), 4)
    for key in sorted(set(before) - {"tokens"}):
        assert torch.equal(before[key], after[key]), key
    # the base model (adapter off) differs from the adapted one, so the adapter really was restored
    loaded.set_adapter(None)
    base = _outputs(loaded)
    assert not torch.equal(base["caption_boxes"], after["caption_boxes"])
    assert not torch.equal(base["refer_boxes"], after["refer_boxes"])


def test_saving_over_a_folder_drops_the_previous_saves_adapters(tmp_path):
    """Saving into a folder that held another model's adapters: loading the folder gave back the new weights with
    the old adapters, the old active one switched on."""
    with_adapter = small_model(seed=4)
    with_adapter.add_adapter("old")
    with_adapter.save_pretrained(tmp_path / "ckpt")
    small_model(seed=5).save_pretrained(tmp_path / "ckpt")
    loaded = PixelLLM.from_pretrained(tmp_path / "ckpt")
    assert loaded.adapters == [] and loaded.active_adapter is None
    assert not (tmp_path / "ckpt" / "adapters").exists()


def test_pickle_weights_are_refused(tmp_path):
    model = small_model(seed=5)
    model.save_pretrained(tmp_path / "ckpt")
    ckpt = tmp_path / "ckpt"
    (ckpt / "model.safetensors").unlink()
    torch.save(model.state_dict(), ckpt / "pytorch_model.bin")
    with pytest.raises(ValueError, match="pickle"):
        PixelLLM.from_pretrained(ckpt)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    bad = tmp_path / "sam.pth"
    bad.write_bytes(pickle.dumps({"image_encoder.x": Evil()}))
    with pytest.raises(ValueError, match="weights_only"):
        read_state_dict(bad)


def test_missing_checkpoint_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        PixelLLM.from_pretrained(str(tmp_path / "nope"))


def test_a_checkpoint_saved_while_flan_t5_s_head_was_tied_still_loads(tmp_path):
    """Before Flan-T5's lm_head was untied, a base/paper-style checkpoint stored no lm_head (it was the input
    embeddings): such a file, and a run's checkpoint to resume, load with the head set to those embeddings."""
    import dataclasses

    from tests.helpers import small_config

    tokenizer = small_model(seed=0).tokenizer
    config = small_config(len(tokenizer))
    model = PixelLLM(config.replace(t5=dataclasses.replace(config.t5, tie_word_embeddings=False)))
    model.tokenizer = tokenizer
    model.save_pretrained(tmp_path / "old")
    weights = tmp_path / "old" / "model.safetensors"
    state = load_file(str(weights))
    del state["language_model.lm_head.weight"]  # the layout a tied head was saved in
    save_file(state, str(weights), metadata={"format": "pt"})
    with pytest.warns(UserWarning, match="saved when Flan-T5's output head was tied"):
        loaded = PixelLLM.from_pretrained(tmp_path / "old")
    lm = loaded.language_model
    assert torch.equal(lm.lm_head.weight, lm.shared.weight)
    assert lm.lm_head.weight.data_ptr() != lm.shared.weight.data_ptr()  # equal now, its own weight to train
    del state["language_model.shared.weight"]  # anything else missing is still refused
    save_file(state, str(weights), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="does not match the model"):
        PixelLLM.from_pretrained(tmp_path / "old")


def test_config_json_is_plain_and_round_trips(tmp_path):
    model = small_model(seed=8)
    model.save_pretrained(tmp_path / "c")
    data = json.loads((tmp_path / "c" / "config.json").read_text())
    assert data["num_query_tokens"] == model.config.num_query_tokens
    assert PixelLLM.from_pretrained(tmp_path / "c").config == model.config


def test_saved_folder_has_a_model_card_describing_it(tmp_path):
    """README.md beside the weights (pixelllm.model_card): what the network is, its size, the dtype the weights
    were saved in, its adapters; how it was trained when the caller says (training.train does), else that it is
    not recorded."""
    model = small_model(seed=4)
    model.add_adapter("fix")
    model.save_pretrained(tmp_path / "half", dtype=torch.float16)
    card = (tmp_path / "half" / "README.md").read_text()
    count = sum(p.numel() for p in model.parameters())
    assert "# PixelLLM `tiny`" in card and f"{count / 1e6:.2f} M parameters" in card
    assert "weights, float16" in card and "(fix)" in card and "Not recorded" in card
    assert "More Information Needed" not in card  # not huggingface_hub's generic mixin text
    plain = small_model(seed=4)
    plain.save_pretrained(tmp_path / "full", model_card_kwargs={"training": "1 step of `narrative`"})
    card = (tmp_path / "full" / "README.md").read_text()
    assert "weights, float32" in card and "1 step of `narrative`" in card and "Not recorded" not in card
    assert "adapters/" not in card
    PixelLLM.from_pretrained(tmp_path / "half")  # the card does not disturb loading


def test_loading_reads_the_weights_into_the_dtype_asked_for_and_draws_no_random_initialisation(small_checkpoint):
    """from_pretrained builds the model without computing an initialisation the file overwrites (minutes and a
    float32 copy for the paper preset) and holds the weights in the dtype asked for; tied tensors stay one
    tensor, and the constants no file holds (pixel mean/std) are set."""
    from pixelllm import PixelLLM

    file = load_file(small_checkpoint / "model.safetensors")
    before = torch.get_rng_state()
    full = PixelLLM.from_pretrained(small_checkpoint)
    assert torch.equal(torch.get_rng_state(), before)  # nothing drawn: the weights were read, not initialised
    half = PixelLLM.from_pretrained(small_checkpoint, dtype=torch.bfloat16)
    for name, value in full.state_dict().items():
        if name in file:
            assert torch.equal(value, file[name].float()), name
    for name, value in half.state_dict().items():  # SAM's Fourier matrix (shared by two modules) stays float32
        if value.is_floating_point() and not name.endswith("pe_layer.positional_encoding_gaussian_matrix"):
            assert value.dtype == torch.bfloat16 and torch.equal(value, full.state_dict()[name].bfloat16()), name
    for model in (full, half):
        lm = model.language_model
        assert lm.shared.weight is lm.encoder.embed_tokens.weight is lm.decoder.embed_tokens.weight
        assert model.pixel_mean.flatten().tolist() == pytest.approx(list(model.config.pixel_mean), rel=1e-2)
        assert model.pixel_std.flatten().tolist() == pytest.approx(list(model.config.pixel_std), rel=1e-2)

"""The model library's builds (issue: PixelLLM model library): the paper preset's size and LoRA targets, and a SAM
checkpoint and a Flan-T5 folder loaded into a base-style build."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from pixelllm.build import count_parameters, load_sam_weights
from pixelllm.config import get_config
from pixelllm.modeling.pixel_llm import PixelLLM
from tests.helpers import small_model


def test_paper_preset_size_and_lora_targets():
    config = get_config("paper")
    params = count_parameters(config)
    assert 3.5e9 <= params <= 4.5e9, params
    assert config.semantic_encoder is not None
    with torch.device("meta"):
        model = PixelLLM(config)
        model.add_adapter("paper")
    lora = model.adapter_configs["paper"]
    assert lora.r == 32
    targeted = {n for n, m in model.named_modules() if getattr(m, "lora_A", None)}
    assert targeted, "no LoRA layers injected"
    assert {n.rsplit(".", 2)[-2] + "." + n.rsplit(".", 1)[-1] for n in targeted} == {"SelfAttention.q",
                                                                                   "SelfAttention.v"}
    # every self-attention q and v of both stacks: 24 encoder + 24 decoder layers
    assert len(targeted) == 2 * (config.t5.num_layers + config.t5.num_decoder_layers)


def test_sam_checkpoint_and_t5_directory_load_into_base_style_build(tmp_path):
    """Component loading, with small random stand-ins of the real classes saved the way the originals are."""
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
    from transformers import T5Config, T5ForConditionalGeneration

    from pixelllm.build import build_pixelllm
    from tests.helpers import small_config, small_tokenizer

    tok = small_tokenizer()
    config = small_config(len(tok))
    vit, c, grid = config.image_encoder, config.prompt_embed_dim, config.grid_size
    sam = Sam(
        image_encoder=ImageEncoderViT(img_size=vit.img_size, patch_size=vit.patch_size, embed_dim=vit.embed_dim,
                                      depth=vit.depth, num_heads=vit.num_heads, out_chans=c, use_rel_pos=True,
                                      window_size=vit.window_size, global_attn_indexes=tuple(vit.global_attn_indexes),
                                      norm_layer=lambda d: torch.nn.LayerNorm(d, eps=1e-6)),
        prompt_encoder=PromptEncoder(embed_dim=c, image_embedding_size=(grid, grid),
                                     input_image_size=(vit.img_size, vit.img_size), mask_in_chans=16),
        mask_decoder=MaskDecoder(transformer_dim=c, transformer=TwoWayTransformer(
            depth=config.mask_decoder_depth, embedding_dim=c, num_heads=config.mask_decoder_heads,
            mlp_dim=config.mask_decoder_mlp_dim), num_multimask_outputs=3, iou_head_depth=3, iou_head_hidden_dim=c),
    )
    torch.save(sam.state_dict(), tmp_path / "sam_vit_test.pth")  # how the official checkpoints are stored
    t5 = T5ForConditionalGeneration(T5Config(vocab_size=len(tok), d_model=48, d_kv=12, d_ff=96, num_layers=2,
                                             num_decoder_layers=3, num_heads=4, feed_forward_proj="gated-gelu",
                                             tie_word_embeddings=False, decoder_start_token_id=0))
    flan_dir = tmp_path / "flan-t5-test"
    t5.save_pretrained(flan_dir)
    # Flan-T5's files hold an lm_head of its own and say tie_word_embeddings: false (T5Config's argument only
    # drops the output scaling, so a model built from it ties the head: write the files as Flan's are)
    weights = {k: v.clone() for k, v in load_file(str(flan_dir / "model.safetensors")).items()}
    weights["lm_head.weight"] = torch.randn_like(weights["shared.weight"])
    save_file(weights, str(flan_dir / "model.safetensors"), metadata={"format": "pt"})
    settings = json.loads((flan_dir / "config.json").read_text())
    (flan_dir / "config.json").write_text(json.dumps({**settings, "tie_word_embeddings": False}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t5 = T5ForConditionalGeneration.from_pretrained(flan_dir).eval()  # transformers' own reading of them
    assert t5.lm_head.weight.data_ptr() != t5.shared.weight.data_ptr()
    assert t5.encoder.embed_tokens.weight.data_ptr() == t5.shared.weight.data_ptr()
    tok.save_pretrained(tmp_path / "flan-t5-test")

    model = build_pixelllm(config, sam_checkpoint=tmp_path / "sam_vit_test.pth", t5_dir=tmp_path / "flan-t5-test")
    assert model.config.t5.d_model == 48 and model.config.t5.num_decoder_layers == 3
    assert not model.language_model.config.scale_decoder_outputs  # Flan-T5 convention carried over
    for ours, theirs in [(model.image_encoder.sam_encoder, sam.image_encoder),
                         (model.prompt_extractor.prompt_encoder, sam.prompt_encoder),
                         (model.mask_head.mask_decoder, sam.mask_decoder), (model.language_model, t5)]:
        for (name, a), (_, b) in zip(sorted(ours.state_dict().items()), sorted(theirs.state_dict().items())):
            assert torch.equal(a, b), name
    assert model.tokenizer is not None
    # the head stays its own: tied, loading wrote lm_head over the input embeddings (both keys, one storage)
    lm = model.language_model.eval()
    assert lm.lm_head.weight.data_ptr() != lm.shared.weight.data_ptr()
    assert lm.encoder.embed_tokens.weight.data_ptr() == lm.decoder.embed_tokens.weight.data_ptr() \
        == lm.shared.weight.data_ptr()  # the input embeddings stay one tensor
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        ours, theirs = (m(input_ids=ids, decoder_input_ids=ids).logits for m in (lm, t5))
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    model.save_pretrained(tmp_path / "pixelllm-base-style")
    again = PixelLLM.from_pretrained(tmp_path / "pixelllm-base-style").language_model
    assert torch.equal(again.lm_head.weight, t5.lm_head.weight) and torch.equal(again.shared.weight, t5.shared.weight)
    assert again.lm_head.weight.data_ptr() != again.shared.weight.data_ptr()

    # a SAM checkpoint of another size is refused with the offending tensors named
    other = small_model(seed=1, prompt_embed_dim=16)
    with pytest.raises(ValueError, match="does not match"):
        load_sam_weights(other, tmp_path / "sam_vit_test.pth")

"""Inference optimisations keep the model's results: SDPA attention in SAM's ViT, T5's fused GELU, bfloat16
predictor.

- `build_vit` swaps segment_anything's hand-written ViT attention for `SDPAAttention`: outputs and gradients must
  equal the original's (relative positions, windows with padding, global blocks) and checkpoints keep their keys.
- `build_t5` runs "gated-gelu" T5s with the fused tanh GELU instead of transformers' seven-op `gelu_new`: the
  language model's logits and gradients must equal those of the same weights with `gelu_new` put back.
- The predictor in bfloat16 (what the app uses on CUDA) runs every task; checked on CPU, which has bf16 kernels
  too. Regression: SAM's prompt encoder casts coordinates to float32 before multiplying them with its
  random-Fourier matrix, so a model cast with `.to(torch.bfloat16)` failed on the first prompt; PixelLLM keeps
  that matrix in float32 and casts its outputs.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from segment_anything.modeling import ImageEncoderViT
from segment_anything.modeling import image_encoder as sam_vit
from transformers.activations import NewGELUActivation

from pixelllm.config import ViTConfig
from pixelllm.image import to_model_input
from pixelllm.modeling.image_encoder import SDPAAttention, build_vit
from pixelllm.predictor import PixelLLMPredictor
from tests.helpers import random_image, small_model


def test_sdpa_vit_attention_matches_segment_anything():
    # 8x8 grid, windows of 3 (padded to 9x9), one global block; relative positions made non-trivial.
    cfg = ViTConfig(img_size=64, patch_size=8, embed_dim=32, depth=2, num_heads=2, window_size=3,
                    global_attn_indexes=[1])
    torch.manual_seed(0)
    ours = build_vit(cfg, 16)
    with torch.no_grad():
        for block in ours.blocks:
            block.attn.rel_pos_h.normal_(0, 0.5)
            block.attn.rel_pos_w.normal_(0, 0.5)
    reference = ImageEncoderViT(img_size=64, patch_size=8, embed_dim=32, depth=2, num_heads=2, out_chans=16,
                                qkv_bias=True, norm_layer=lambda d: torch.nn.LayerNorm(d, eps=1e-6),
                                use_rel_pos=True, rel_pos_zero_init=True, window_size=3, global_attn_indexes=(1,))
    assert set(reference.state_dict()) == set(ours.state_dict())
    reference.load_state_dict(ours.state_dict(), strict=True)
    assert all(type(b.attn) is SDPAAttention for b in ours.blocks)
    assert all(type(b.attn) is sam_vit.Attention for b in reference.blocks)

    x = torch.randn(2, 3, 64, 64)
    out, ref = ours(x), reference(x)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    out.square().mean().backward()
    ref.square().mean().backward()
    grads = dict(reference.named_parameters())
    for name, param in ours.named_parameters():
        torch.testing.assert_close(param.grad, grads[name].grad, atol=1e-6, rtol=1e-4, msg=name)


def test_fused_gelu_matches_transformers_gelu_new():
    model = small_model(seed=3).train()
    lm = model.language_model
    reference = copy.deepcopy(lm)
    fused = [m for m in lm.modules() if hasattr(m, "act") and hasattr(m, "wi_0")]
    assert fused and model.config.t5.feed_forward_proj == "gated-gelu"
    assert not any(isinstance(m.act, NewGELUActivation) for m in fused)
    for m in reference.modules():
        if hasattr(m, "act") and hasattr(m, "wi_0"):
            m.act = NewGELUActivation()
    # T5 weights at their init are tiny (GELU inputs near 0, where every GELU variant agrees): scale them up so
    # the inputs span the range where the exact GELU and its tanh approximation differ.
    with torch.no_grad():
        for a, b in zip(lm.parameters(), reference.parameters()):
            a.mul_(4.0)
            b.copy_(a)
    torch.manual_seed(0)
    embeds = torch.randn(2, 7, lm.config.d_model)
    labels = torch.randint(2, lm.config.vocab_size, (2, 5))
    out = lm(inputs_embeds=embeds, labels=labels)
    ref = reference(inputs_embeds=embeds, labels=labels)
    # logits up to ~50: the fused kernel differs by rounding (~3e-5); the exact erf GELU would differ by ~3e-3
    torch.testing.assert_close(out.logits, ref.logits, atol=2e-4, rtol=1e-6)
    out.loss.backward()
    ref.loss.backward()
    # per tensor, relative to its norm: the fused kernel ~2e-4 at worst, the exact GELU ~2e-2
    grads = dict(reference.named_parameters())
    for name, param in lm.named_parameters():
        expected = grads[name].grad
        assert float((param.grad - expected).norm()) <= 2e-3 * float(expected.norm()) + 1e-8, name


def test_bfloat16_predictor_runs_every_task():
    model = small_model(seed=3)
    predictor = PixelLLMPredictor(model, device="cpu", dtype=torch.bfloat16)
    assert model.language_model.shared.weight.dtype == torch.bfloat16
    assert model.prompt_extractor.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix.dtype == torch.float32
    state = predictor.set_image(random_image(1, 48, 80))
    assert state.features.fused.dtype == torch.bfloat16

    for prompt in ({"box": [5, 5, 40, 30]}, {"points": [[10, 10], [60, 40]], "point_labels": [1, 0]},
                   {"text": "In this picture"}, {}):
        caption = predictor.caption(state, max_new_tokens=6, **prompt)
        for word in caption.words:
            assert np.isfinite(word.box).all() and 0 <= word.box[0] <= word.box[2] <= 80
    captions = predictor.caption_boxes(state, [[5, 5, 40, 30], [20, 10, 70, 45]], max_new_tokens=6)
    assert len(captions) == 2
    regions = predictor.dense_caption(state, score_threshold=0.0, max_regions=3, max_new_tokens=4)
    assert 1 <= len(regions) <= 3 and all(np.isfinite(r.box).all() for r in regions)
    referral = predictor.refer(state, ["the red circle"])[0]
    assert np.isfinite(referral.box).all() and referral.mask.shape == (48, 80)


def test_bfloat16_prompt_embedding_stays_close_to_float32():
    """The position encoding runs in float32 inside a bf16 model: prompt tokens match the float32 model's up to
    bf16 rounding of the learned embeddings (a bf16 Fourier matrix would scramble sin/cos of large arguments)."""
    model = small_model(seed=4)
    half = copy.deepcopy(model).to(torch.bfloat16)
    boxes = torch.tensor([[0.1, 0.2, 0.7, 0.9], [0.33, 0.01, 0.99, 0.5]])
    points = torch.tensor([[[0.25, 0.75], [0.9, 0.1]]]).expand(2, -1, -1)
    labels = torch.tensor([[1, 0], [1, 1]])
    with torch.no_grad():
        for kwargs in ({"boxes": boxes}, {"points": points, "point_labels": labels}):
            full = model.prompt_extractor.embed_prompt(**kwargs)
            low = half.prompt_extractor.embed_prompt(**kwargs)
            assert low.dtype == torch.bfloat16
            torch.testing.assert_close(low.float(), full, atol=2e-2, rtol=2e-2)


def test_refer_without_some_masks_keeps_every_box_score_and_other_mask():
    # The evaluation reads only the scores of its absent expressions: skipping their masks must change nothing
    # else. The masks of a random model are neither all empty nor all full, so a mix-up between rows shows.
    predictor = PixelLLMPredictor(small_model(seed=5), device="cpu")
    state = predictor.set_image(random_image(2, 48, 80))
    asked = ["the red circle", "a small blue square", "", "the large green triangle"]
    full = predictor.refer(state, asked)
    part = predictor.refer(state, asked, masks=[False, True, True, False])  # "" is dropped with its flag
    assert [r.expression for r in part] == [r.expression for r in full] == [asked[0], asked[1], asked[3]]
    for whole, partial in zip(full, part):
        assert partial.box == whole.box and partial.score == whole.score
    assert part[0].mask is None and part[2].mask is None and part[0].to_dict()["mask_area"] is None
    # one row through SAM's decoder instead of three: the same numbers up to float rounding (the predicted IoU
    # differed in its 8th digit under load)
    assert np.array_equal(part[1].mask, full[1].mask) and part[1].mask_score == pytest.approx(full[1].mask_score,
                                                                                              rel=1e-5)
    assert len({full[i].mask.tobytes() for i in range(3)}) > 1  # the rows' masks differ: a row mix-up would show
    none = predictor.refer(state, asked, masks=False)
    assert all(r.mask is None and r.mask_score is None for r in none)
    assert [r.score for r in none] == [r.score for r in full]
    with pytest.raises(ValueError, match="masks: 2 flags for 4 expressions"):
        predictor.refer(state, asked, masks=[True, False])


def _lora_b_random(model) -> None:
    with torch.no_grad():  # LoRA B starts at zero: an adapter changes nothing until it is trained
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)


@pytest.mark.filterwarnings("ignore:Already found a `peft_config`:UserWarning")  # two adapters, on purpose
def test_image_cache_keeps_apart_the_features_of_an_adapter_on_the_image_encoder():
    image = random_image(4, 48, 64)
    model = small_model(seed=6)
    model.add_adapter("encoder", extra_targets=(r"image_encoder\.sam_encoder\.blocks\.0\.mlp\.lin1",))
    model.add_adapter("words")  # the default targets: language model only
    _lora_b_random(model)
    predictor = PixelLLMPredictor(model, device="cpu")
    predictor.set_adapter(None)
    base = predictor.set_image(image).features.fused.clone()
    predictor.set_adapter("words")
    assert torch.equal(predictor.set_image(image).features.fused, base) and predictor.cache_hits == 1  # shared
    predictor.set_adapter("encoder")
    served = predictor.set_image(image).features.fused
    with torch.inference_mode():
        own = model.encode_image(to_model_input(image, model.config.image_size)[None]).fused
    assert not torch.equal(served, base) and torch.allclose(served, own)  # was: the base model's features
    predictor.set_adapter(None)
    assert torch.equal(predictor.set_image(image).features.fused, base)


def test_a_model_cast_by_another_predictor_gets_its_image_encoded_again():
    """Two predictors sharing one model: the second casts it to bfloat16. The first one's cached float32 features
    are not served to the bfloat16 model (a dtype error in every task), and a state it handed out is refused with
    a message instead."""
    image = random_image(8, 48, 64)
    model = small_model(seed=8)
    first = PixelLLMPredictor(model, device="cpu")
    old = first.set_image(image)
    PixelLLMPredictor(model, device="cpu", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="another model version, dtype or device"):
        first.caption(old, max_new_tokens=2)
    again = first.set_image(image)
    assert first.cache_misses == 2 and again.features.fused.dtype == torch.bfloat16
    assert len(first.trace(again, "a red circle").words) == 3  # was: a float/bfloat16 mismatch in every task
    assert isinstance(first.dense_caption(again, max_regions=2), list)


def test_using_adapter_holds_other_requests_until_it_ends():
    import threading

    model = small_model(seed=7)
    model.add_adapter("fix")
    _lora_b_random(model)
    predictor = PixelLLMPredictor(model, device="cpu")
    state = predictor.set_image(random_image(5, 48, 64))
    served = predictor.trace(state, "a red circle").words  # the active adapter, "fix"
    other: list = []
    thread = threading.Thread(target=lambda: other.append(predictor.trace(state, "a red circle").words))
    with predictor.using_adapter(None):
        base = predictor.trace(state, "a red circle").words  # this thread may run requests in the block
        thread.start()
        thread.join(timeout=1.0)
        assert thread.is_alive() and not other  # the other user's request waits ...
    thread.join()
    assert predictor.adapter == "fix"
    assert [w.box for w in other[0]] == [w.box for w in served] != [w.box for w in base]  # ... for the served model

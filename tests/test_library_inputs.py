"""The Python library used directly (README *The library*): unusual-but-plausible inputs a researcher passes to
`PixelLLMPredictor` and `pixelllm.image` either give the right output in the image's pixel frame or a
`ValueError` naming the argument — never a silently wrong result."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from pixelllm import PixelLLMPredictor
from pixelllm import image as imaging
from tests.conftest import _talkative
from tests.helpers import random_image, small_model

# ------------------------------------------------------------------------------------------ images


_MASK = np.zeros((48, 80), bool)
_MASK[10:30, 20:60] = True
ARRAYS = [
    ("uint16", (np.arange(48 * 80).reshape(48, 80) * 13).astype(np.uint16)),  # 0 .. 49907
    ("float-0-1", np.linspace(0.0, 1.0, 48 * 80, dtype=np.float32).reshape(48, 80)),
    ("bool", _MASK),
]


@pytest.mark.parametrize("array", [a for _, a in ARRAYS], ids=[i for i, _ in ARRAYS])
def test_16_bit_float_and_bool_arrays_give_the_pixels_of_the_same_pil_image(array, small_predictor):
    """An array and the PIL image made from it are one picture: a uint16 array was clipped to 255 (almost all
    white) while its I;16 image was scaled; a float image in [0, 1] (PIL mode F) came out black while the same
    array was scaled by 255; a bool mask was 0/1 (black) while its mode-1 image was 0/255."""
    from_pil = imaging.as_rgb_array(Image.fromarray(array))
    from_array = imaging.as_rgb_array(array)
    assert from_array.dtype == np.uint8 and from_array.shape == (48, 80, 3)
    np.testing.assert_array_equal(from_array, from_pil)
    assert from_array.min() == 0 and from_array.max() == 255  # the full range: not clipped white, not black
    assert 40 < from_array.mean() < 155  # a ramp is mid-grey on average; a fifth of the mask is white
    assert small_predictor.set_image(array).key == small_predictor.set_image(Image.fromarray(array)).key


def test_a_premultiplied_la_image_is_converted():
    # PIL's "La" (grey + premultiplied alpha) was refused as "the image could not be decoded (truncated or
    # corrupt file?)"
    la = Image.new("LA", (5, 4), (100, 255)).convert("La")
    assert (imaging.as_rgb_array(la) == 100).all()


@pytest.mark.parametrize("image, message", [
    ("assets/examples/example_000000.png", "the image must be an HxWx3 array or a PIL image, got str"),
    (None, "the image must be an HxWx3 array or a PIL image, got NoneType"),
    (np.zeros((3, 48, 80), np.uint8), "got an array of shape (3, 48, 80) (channels first? give HxWxC)"),
], ids=["path", "none", "channels-first"])
def test_set_image_names_what_it_takes(image, message, small_predictor):
    # a path or None used to be "expected an HxWx3 RGB image, got an array of shape ()"
    with pytest.raises(ValueError) as info:
        small_predictor.set_image(image)
    assert message in str(info.value)


# ------------------------------------------------------------------------------------------ prompts


def test_malformed_points_and_boxes_are_refused_naming_the_prompt(small_predictor):
    """Ragged point lists (also in trace) and boxes for caption_boxes that are not Kx4 gave numpy's own message
    ("setting an array element with a sequence", "cannot reshape array of size 6 into shape (4)")."""
    state = small_predictor.set_image(random_image(1))
    with pytest.raises(ValueError, match=r"the point prompt must be a list of \[x, y\] pixel pairs"):
        small_predictor.caption(state, points=[[10, 10], [20]], max_new_tokens=2)
    with pytest.raises(ValueError, match=r"the point prompt must be a list of \[x, y\] pixel pairs"):
        small_predictor.trace(state, "a red circle", points=[[10, 10], [20]])
    with pytest.raises(ValueError, match=r"boxes must be K boxes of 4 numbers \(x0, y0, x1, y1\), got 6 numbers"):
        small_predictor.caption_boxes(state, [1, 2, 30, 40, 5, 6])
    with pytest.raises(ValueError, match=r"boxes must be K boxes of 4 numbers"):
        small_predictor.caption_boxes(state, [[1, 2, 30, 40], [5, 6]])
    assert small_predictor.caption_boxes(state, []) == []
    assert len(small_predictor.caption_boxes(state, (1, 2, 30, 40), max_new_tokens=2)) == 1  # one flat box


def test_refer_refuses_a_single_string_instead_of_reading_each_letter(small_predictor):
    """`refer(state, "the red circle")` returned 14 referrals, one per character ("t", "h", "e", " " dropped…)."""
    state = small_predictor.set_image(random_image(2))
    with pytest.raises(ValueError, match=r"expressions must be a list of strings, got str .*pass \[expression\]"):
        small_predictor.refer(state, "the red circle")
    with pytest.raises(ValueError, match="expressions must be a list of strings, got NoneType"):
        small_predictor.refer(state, None)
    with pytest.raises(ValueError, match="masks must be True, False or one flag per expression"):
        small_predictor.refer(state, ["the red circle"], masks=None)
    one = small_predictor.refer(state, ["the red circle"], masks=np.True_)
    assert [r.expression for r in one] == ["the red circle"] and one[0].mask.shape == (48, 80)
    assert [r.expression for r in small_predictor.refer(state, (e for e in ["a", "b"]), masks=False)] == ["a", "b"]


# ------------------------------------------------------------------------------------------ numbers


def test_every_call_checks_max_new_tokens(small_predictor):
    """caption_boxes and dense_caption did not check it: 0 silently meant the checkpoint's default (96 tokens),
    a negative count gave empty captions, 600 decoded past the 512 limit; stream_caption turned 1.7 into a
    TypeError ("'float' object cannot be interpreted as an integer") and "abc" / a huge seed into messages
    that named no argument."""
    state = small_predictor.set_image(random_image(3))
    calls = {
        "caption_boxes": lambda n: small_predictor.caption_boxes(state, [[5, 5, 40, 30]], max_new_tokens=n),
        "dense_caption": lambda n: small_predictor.dense_caption(state, score_threshold=0.0, max_new_tokens=n),
        "caption": lambda n: small_predictor.caption(state, max_new_tokens=n),
    }
    for name, call in calls.items():
        for bad in (0, -5, 600, 1.7, "abc", float("nan"), True):
            with pytest.raises(ValueError, match="max_new_tokens must be a whole number between 1 and 512"):
                call(bad)
        # in range: obeyed (each word costs at least one token)
        assert all(len(c.words) <= 2 for c in _captions(call(2))), name
    with pytest.raises(ValueError, match="seed must be a whole number"):
        small_predictor.caption(state, do_sample=True, seed=2**70, max_new_tokens=2)
    with pytest.raises(ValueError, match="max_regions must be a whole number between 1 and 100"):
        small_predictor.dense_caption(state, max_regions=5.9)


def _captions(result):
    if isinstance(result, list):
        return [r.caption if hasattr(r, "caption") else r for r in result]
    return [result]


@pytest.mark.parametrize("nms_iou", [float("nan"), -1.0, 1.5])
def test_dense_caption_refuses_an_nms_iou_outside_0_1(nms_iou, small_predictor):
    """NaN suppressed nothing (100 overlapping regions of one object came back) and -1 all but one box,
    silently; score_threshold was already checked."""
    state = small_predictor.set_image(random_image(4))
    with pytest.raises(ValueError, match="nms_iou must be between 0 and 1"):
        small_predictor.dense_caption(state, max_regions=100, score_threshold=0.0, nms_iou=nms_iou, max_new_tokens=1)
    kept = small_predictor.dense_caption(state, max_regions=100, score_threshold=0.0, nms_iou=0.5, max_new_tokens=1)
    everything = small_predictor.dense_caption(state, max_regions=100, score_threshold=0.0, nms_iou=1.0,
                                               max_new_tokens=1)
    assert 1 <= len(kept) <= len(everything)


# ------------------------------------------------------------------------------------------ states


def test_a_state_encoded_before_its_image_encoder_adapter_was_reloaded_with_other_weights_is_refused(tmp_path):
    """load_adapter(dir2, "enc") over an adapter "enc" with LoRA layers in the image encoder emptied the cache, but
    a state encoded under the first weights was still accepted (same adapter name) and captioned with stale
    features."""
    from pixelllm import adapters

    model = small_model(seed=0)
    _talkative(model)
    model.add_adapter("enc", extra_targets=(r"image_encoder\..*\.attn\.qkv",))
    for i in range(2):
        with torch.no_grad():
            for key, p in model.named_parameters():
                if "lora_B" in key:
                    p.normal_(0, 0.5, generator=torch.Generator().manual_seed(i))
        adapters.save_adapter(model, "enc", tmp_path / f"v{i}", model.adapter_configs["enc"])
    predictor = PixelLLMPredictor(model.eval(), device="cpu")
    image = random_image(5)
    predictor.load_adapter(tmp_path / "v0", "enc")
    old = predictor.set_image(image)
    predictor.load_adapter(tmp_path / "v0", "enc")  # the same weights again: the state stays valid
    assert predictor.caption(old, max_new_tokens=2).words
    predictor.load_adapter(tmp_path / "v1", "enc")
    new = predictor.set_image(image)
    assert not torch.equal(old.features.fused, new.features.fused)
    with pytest.raises(ValueError, match="encoded by another model version"):
        predictor.caption(old, max_new_tokens=2)
    with pytest.raises(ValueError, match="encoded by another model version"):
        predictor.refer(old, ["a circle"])
    assert predictor.caption(new, max_new_tokens=2).words

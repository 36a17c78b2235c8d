"""The Python library used directly (README *The library*): unusual-but-plausible inputs a researcher passes to
`PixelLLMPredictor` and `pixelllm.image` either give the right output in the image's pixel frame or a
`ValueError` naming the argument — never a silently wrong result."""

from __future__ import annotations

import io
import tracemalloc

import numpy as np
import pytest
import torch
from PIL import Image

from pixelllm import PixelLLMPredictor
from pixelllm import image as imaging
from tests.conftest import _talkative
from tests.helpers import png_claiming, random_image, small_model

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


# (format, the three frames' sizes): TIFF pages may each have their own size; GIF / WebP / APNG frames share one
FRAME_COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
MULTI_FRAME = [("GIF", [(40, 30)] * 3), ("TIFF", [(40, 30), (24, 20), (36, 12)]), ("WEBP", [(40, 30)] * 3),
               ("PNG", [(40, 30)] * 3)]


@pytest.mark.parametrize("fmt, sizes", MULTI_FRAME, ids=[f for f, _ in MULTI_FRAME])
def test_a_pil_image_seeked_to_a_frame_is_converted_as_that_frame(fmt, sizes, small_predictor):
    """set_image(img) of an animation (or multi-page TIFF) the caller had seek()'d to frame k gave frame 0 — and
    seek(0)'d the caller's image as a side effect; a TIFF page of another size even came out at frame 0's pixels
    downscaled to page k's longest side."""
    frames = [Image.new("RGB", size, colour) for size, colour in zip(sizes, FRAME_COLOURS)]
    buf = io.BytesIO()
    frames[0].save(buf, format=fmt, save_all=True, append_images=frames[1:], **({"lossless": True} if fmt == "WEBP"
                                                                                  else {}))
    img = Image.open(io.BytesIO(buf.getvalue()))
    assert getattr(img, "n_frames", 1) == 3
    for k in (2, 1, 0):
        img.seek(k)
        (width, height), colour = sizes[k], FRAME_COLOURS[k]
        state = small_predictor.set_image(img)
        assert (state.width, state.height) == (width, height)
        assert state.key == small_predictor.set_image(np.full((height, width, 3), colour, np.uint8)).key
        assert img.tell() == k  # the caller's image still shows its frame
        pixels = imaging.load_image(img)
        assert img.tell() == k and pixels.shape == (height, width, 3)
        assert (pixels == colour).all(), (k, np.unique(pixels.reshape(-1, 3), axis=0))
    assert (imaging.load_image(buf.getvalue()) == FRAME_COLOURS[0]).all()  # a file still opens on its first frame


def _refusal_and_peak(image) -> tuple[str, int]:
    """as_rgb_array(image)'s refusal message and the peak bytes Python allocated while it refused."""
    tracemalloc.start()
    try:
        with pytest.raises(ValueError) as refused:
            imaging.as_rgb_array(image)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return str(refused.value), peak


def test_an_array_above_the_pixel_limit_is_refused_like_a_pil_image_before_any_copy(small_predictor):
    """Arrays escaped the 40 MP limit PIL images get: a 7000x6000 array was copied, stacked to RGB and converted
    (hundreds of MB) and then encoded. Now the same message as the PIL image of that size, from the shape alone."""
    width, height = 7000, 6000  # 42 MP
    with pytest.raises(ValueError) as from_pil:
        small_predictor.set_image(Image.open(io.BytesIO(png_claiming(width, height))))  # a header: nothing decoded
    assert "the limit is 40 MP" in str(from_pil.value)
    arrays = {  # read-only views of one value: they cost no memory until something copies them
        "rgb": np.broadcast_to(np.zeros((1, 1, 3), np.uint8), (height, width, 3)),
        "rgba": np.broadcast_to(np.zeros((1, 1, 4), np.uint8), (height, width, 4)),
        "grey": np.broadcast_to(np.zeros((1, 1), np.uint8), (height, width)),
        "bool": np.broadcast_to(np.zeros((1, 1), bool), (height, width)),
    }
    for name, array in arrays.items():
        message, peak = _refusal_and_peak(array)
        assert message == str(from_pil.value), name
        assert peak < 5_000_000, (name, peak)
    with pytest.raises(ValueError) as through_set_image:
        small_predictor.set_image(arrays["rgb"])
    assert str(through_set_image.value) == str(from_pil.value)
    assert imaging.as_rgb_array(np.broadcast_to(np.zeros((1, 1, 3), np.uint8), (1000, 800, 3))).shape == (1000, 800, 3)


def _nested_lists(width: int, height: int) -> dict[str, list | tuple]:
    """Nested lists (and tuples) of an image's shape that cost a few kB: every row is the same object."""
    return {
        "rgb-lists": [[[0, 0, 0]] * width] * height,
        "grey-lists": [[0] * width] * height,
        "rgb-tuples": ((((0, 0, 0),) * width),) * height,
        "rows-as-arrays": [np.zeros((width, 3), np.uint8)] * height,
    }


@pytest.mark.parametrize("name", list(_nested_lists(1, 1)))
def test_a_nested_list_above_the_pixel_limit_is_refused_from_its_shape_before_numpy_converts_it(name,
                                                                                               small_predictor):
    """A nested Python list reached np.asarray before the 40 MP check: a 7000x6000 RGB list of ints became a
    1 GB int64 array (15 s) before it was refused. Now the PIL image's message, from the lengths alone."""
    width, height = 7000, 6000  # 42 MP
    with pytest.raises(ValueError) as from_pil:
        imaging.as_rgb_array(Image.open(io.BytesIO(png_claiming(width, height))))
    nested = _nested_lists(width, height)[name]
    message, peak = _refusal_and_peak(nested)
    assert message == str(from_pil.value) == "image is 7000x6000 = 42 MP; the limit is 40 MP"
    assert peak < 5_000_000, peak
    with pytest.raises(ValueError) as through_set_image:
        small_predictor.set_image(nested)
    assert str(through_set_image.value) == str(from_pil.value)


def test_a_channels_first_nested_list_above_the_pixel_limit_is_refused_from_its_lengths():
    """A CHW tensor's `tolist()` (3 x 6000 x 7000) passed the nested-list check, which took 3 for the height and
    6000 for the width: numpy converted it (5 s, 1 GB) before refusing it as channels first. Its planes' lengths are
    measured now: the PIL image's message, from the lengths alone; a small one is still refused as channels first."""
    height, width = 6000, 7000
    plane = np.broadcast_to(np.zeros((1, 1)), (height, width))  # a few bytes
    for name, chw in (("lists", [[[0] * width] * height] * 3), ("planes-as-arrays", [plane] * 3)):
        message, peak = _refusal_and_peak(chw)
        assert message == "image is 7000x6000 = 42 MP; the limit is 40 MP", name
        assert peak < 5_000_000, (name, peak)
    with pytest.raises(ValueError, match=r"shape \(3, 12, 20\) \(channels first"):
        imaging.as_rgb_array([[[0] * 20] * 12] * 3)


def test_a_list_holding_arrays_is_refused_from_their_shape_before_numpy_copies_them():
    """A list or tuple of arrays that is no image (`[chw_array]`, a batch `[nhwc_array]`, a tensor in a list) went
    through np.asarray, which copied every array into one (126 MB for 3 x 7000 x 6000) only to refuse the result as
    4-D. The shape numpy would give is read from the first item's shape now, and refused before any copy."""
    height, width = 7000, 6000
    chw = np.broadcast_to(np.zeros((1, 1, 1), np.uint8), (3, height, width))  # views: a few bytes until copied
    nhwc = np.broadcast_to(np.zeros((1, 1, 1, 3), np.uint8), (1, height, width, 3))
    tensor = torch.zeros(1, 1, 1, dtype=torch.uint8).expand(3, height, width)
    for name, items, shape in (("[chw]", [chw], (1, 3, height, width)), ("(chw,)", (chw,), (1, 3, height, width)),
                               ("[nhwc]", [nhwc], (1, 1, height, width, 3)), ("[tensor]", [tensor],
                                                                           (1, 3, height, width))):
        message, peak = _refusal_and_peak(items)
        assert message == f"expected an HxWx3 RGB image, got an array of shape {shape}", name
        assert peak < 5_000_000, (name, peak)
    small = random_image(3, height=12, width=20)
    assert _refusal_and_peak([small])[0] == "expected an HxWx3 RGB image, got an array of shape (1, 12, 20, 3)"


def test_small_nested_lists_are_still_images(small_predictor):
    array = random_image(3, height=12, width=20)
    for nested in (array.tolist(), tuple(map(tuple, array.tolist())), list(array)):  # list(array): rows as arrays
        np.testing.assert_array_equal(imaging.as_rgb_array(nested), array)
        assert small_predictor.set_image(nested).key == small_predictor.set_image(array).key
    np.testing.assert_array_equal(imaging.as_rgb_array(array[..., 0].tolist()), np.stack([array[..., 0]] * 3, -1))
    for bad, message in (([], "got an array of shape (0,)"), ([1, 2, 3], "got an array of shape (3,)"),
                         ([[[1, 2]]] * 2, "got an array of shape (2, 1, 2)")):
        with pytest.raises(ValueError) as info:
            imaging.as_rgb_array(bad)
        assert message in str(info.value), bad


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


def test_point_labels_without_points_are_refused_naming_the_argument(small_predictor):
    """point_labels given without points (None or an empty list) were ignored: the caption / trace came from the
    whole image (or the box) as if no labels had been given."""
    state = small_predictor.set_image(random_image(6))
    calls = {
        "caption": lambda **kw: small_predictor.caption(state, max_new_tokens=2, **kw),
        "stream_caption": lambda **kw: next(small_predictor.stream_caption(state, max_new_tokens=2, **kw), None),
        "trace": lambda **kw: small_predictor.trace(state, "a red circle", **kw),
    }
    for call in calls.values():  # each lambda is its own line in a failure's traceback
        for kwargs, count in [(dict(point_labels=[1]), 1), (dict(points=[], point_labels=[1, 0]), 2),
                              (dict(point_labels=np.array([0, 1, 1]), box=[5, 5, 40, 30]), 3),
                              (dict(point_labels=1), 1)]:
            with pytest.raises(ValueError, match=rf"point_labels given without points: {count} labels but 0 points"):
                call(**kwargs)
    # no labels for no points is no point prompt (what a logged prompt replays: points [] and point_labels [])
    plain = small_predictor.caption(state, max_new_tokens=4)
    assert small_predictor.caption(state, points=[], point_labels=[], max_new_tokens=4).words == plain.words
    assert small_predictor.caption(state, point_labels=None, max_new_tokens=4).words == plain.words


def test_point_labels_that_do_not_match_the_points_are_refused(small_predictor):
    state = small_predictor.set_image(random_image(7))
    for call in (lambda **kw: small_predictor.caption(state, max_new_tokens=2, **kw),
                 lambda **kw: small_predictor.trace(state, "a red circle", **kw)):
        with pytest.raises(ValueError, match="2 points but 1 labels"):
            call(points=[[10, 10], [20, 20]], point_labels=[1])
        with pytest.raises(ValueError, match="1 points but 3 labels"):
            call(points=[[10, 10]], point_labels=[1, 0, 1])
        with pytest.raises(ValueError, match="1 points but 0 labels"):
            call(points=[[10, 10]], point_labels=[])


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

"""Two visitors at once while an adapter comparison switches the shared model (`predictor.using_adapter`): every
output is computed by, and logged and downloaded under, the adapter that really served it."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import torch

from pixelllm import PixelLLMPredictor
from pixelllm.ui import api, records
from pixelllm.ui import callbacks as cb
from pixelllm.ui import workspace as ws
from tests.conftest import _talkative
from tests.helpers import random_image, small_model

VISITOR = records.Visitor("visitor-a")


def _with_adapter(name: str, **kwargs) -> PixelLLMPredictor:
    model = small_model(seed=0)
    _talkative(model)
    model.add_adapter(name, **kwargs)
    with torch.no_grad():
        for key, p in model.named_parameters():
            if "lora_B" in key:
                p.normal_(0, 0.5)
    model.eval()
    return PixelLLMPredictor(model, device="cpu")


class CompareMeanwhile:
    """An annotation store during whose `add_image` (the first thing logging an output does) another visitor's
    adapter comparison switches the shared model to the base model, and holds it until `release()`."""

    def __init__(self, store, predictor: PixelLLMPredictor) -> None:
        self.store, self.predictor, self.pending = store, predictor, []

    def add_image(self, *args, **kwargs):
        switched, done = threading.Event(), threading.Event()

        def compare() -> None:
            with self.predictor.using_adapter(None):
                switched.set()
                done.wait(30)

        thread = threading.Thread(target=compare)
        thread.start()
        assert switched.wait(30)
        self.pending.append((done, thread))
        return self.store.add_image(*args, **kwargs)

    def release(self) -> None:
        for done, thread in self.pending:
            done.set()
            thread.join(30)

    def __getattr__(self, name):
        return getattr(self.store, name)


@pytest.mark.parametrize("task", ["generate", "trace", "refer", "dense", "api-caption", "api-refer"])
def test_an_output_is_logged_under_the_adapter_that_computed_it(task, annotation_store, example_images, tmp_path):
    predictor = _with_adapter("ft")
    store = CompareMeanwhile(annotation_store, predictor)
    studio = ws.Studio(predictor=predictor, store=store, min_word_interval=0.0, download_root=tmp_path / "dl")
    image = str(example_images[0])
    try:
        if task == "generate":
            *_, (_, _, files, _) = list(cb.generate(studio, ws.load_image(studio, image, None)[0], "", 4, False,
                                                    1.0, 1.0, None, VISITOR))
            record = json.loads(open(files[0]).read())
        elif task == "trace":
            _, _, files, _ = cb.trace(studio, ws.load_image(studio, image, None)[0], "a red circle", VISITOR)
            record = json.loads(open(files[0]).read())
        elif task == "refer":
            _, _, files = cb.refer(studio, ws.load_image(studio, image, None)[0], "the red circle", VISITOR)
            record = json.loads(open(files[0]).read())
        elif task == "dense":
            _, _, files = cb.dense(studio, ws.load_image(studio, image, None)[0], 0.0, 2, VISITOR)
            record = json.loads(open(files[0]).read())
        elif task == "api-caption":
            record = api.caption(studio, image, "", "", 3, False, 1, 1, None, VISITOR)
        else:
            record = api.refer(studio, image, "the red circle", VISITOR)
        assert predictor.adapter is None  # the comparison is still running
    finally:
        store.release()
    assert predictor.adapter == "ft"
    row = annotation_store.list_generations(limit=1)[0]
    assert (row["adapter"], row["extra"].get("adapter_version")) == ("ft", "in-memory")
    assert record["model"]["adapter"] == "ft"


def test_an_image_encoded_while_another_visitor_compares_adapters_gets_the_active_adapters_features():
    """An adapter with LoRA layers in the image encoder: the features cached under the base model's key are the
    base model's, and a visitor's set_image during a comparison's base-model block returns the features of the
    adapter that will serve its request (it waits for the block to end)."""
    predictor = _with_adapter("enc", extra_targets=(r"image_encoder\..*\.attn\.qkv",))
    assert predictor._encoder_adapter() == "enc"
    cached_first, encoded_first = random_image(1), random_image(2)
    reference = {}
    for name, image in (("cached", cached_first), ("encoded", encoded_first)):
        reference[name, "enc"] = predictor.set_image(image).features.fused.clone()
        with predictor.using_adapter(None):
            reference[name, "base"] = predictor.set_image(image).features.fused.clone()
        assert not torch.equal(reference[name, "enc"], reference[name, "base"])
    predictor._cache.clear()

    got = {}
    for name, image in (("cached", cached_first), ("encoded", encoded_first)):
        got[name] = _set_image_during_a_comparison(predictor, image, cache_it=name == "cached")
        assert predictor.adapter == "enc"
        assert torch.equal(got[name], reference[name, "enc"]), name
        with predictor.using_adapter(None):  # and the cache holds the base features under the base key
            assert torch.equal(predictor.set_image(image).features.fused, reference[name, "base"]), name
        assert torch.equal(predictor.set_image(image).features.fused, reference[name, "enc"]), name


def _set_image_during_a_comparison(predictor: PixelLLMPredictor, image: np.ndarray, *, cache_it: bool) -> torch.Tensor:
    """A visitor's set_image(image) called while another visitor's comparison holds the base model (having cached
    the image's base features first if `cache_it`); the features the visitor got."""
    inside, calling, got = threading.Event(), threading.Event(), {}

    def compare() -> None:
        with predictor.using_adapter(None):
            if cache_it:
                predictor.set_image(image)
            inside.set()
            calling.wait(30)
            threading.Event().wait(0.3)  # the visitor's set_image is underway

    def visit() -> None:
        inside.wait(30)
        calling.set()
        got["features"] = predictor.set_image(image).features.fused.clone()

    threads = [threading.Thread(target=compare), threading.Thread(target=visit)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return got["features"]


def test_a_state_encoded_under_another_image_encoder_adapter_is_refused():
    predictor = _with_adapter("enc", extra_targets=(r"image_encoder\..*\.attn\.qkv",))
    image = random_image(3)
    with predictor.using_adapter(None):
        base_state = predictor.set_image(image)
    with pytest.raises(ValueError, match="another model version, dtype or device"):
        predictor.caption(base_state, max_new_tokens=2)
    with pytest.raises(ValueError, match="another model version, dtype or device"):
        predictor.refer(base_state, ["a circle"])
    assert np.isfinite(predictor.refer(predictor.set_image(image), ["a circle"])[0].score)

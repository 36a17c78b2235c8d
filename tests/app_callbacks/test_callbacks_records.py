"""What the studio's outputs leave behind (pixelllm/ui/records.py, api.py) on a real predictor (a small random
checkpoint): downloads carry pixel coordinates of the image as sent, one folder per request; every output shown is
logged to the annotation store with the model and adapter that made it; a failing store warns and the user keeps
the result; the API's outputs are plain JSON.

The rest of tests/app_callbacks/: prompts and Inspect words: test_callbacks_prompts.py; captions, decoding options
and Trace: test_callbacks_caption.py; opening and replacing images: test_callbacks_images.py; Refer and Dense:
test_callbacks_refer_dense.py; app.py and the Model panel: test_callbacks_app.py. Fixtures: conftest.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pixelllm.store import StoreError
from pixelllm.ui import api, records
from pixelllm.ui import callbacks as cb
from pixelllm.ui import workspace as ws
from tests.app_callbacks.conftest import VISITOR, _loaded, _run

# ------------------------------------------------------------------------------------------ downloads

def _png(path: Path, width: int, height: int, seed: int = 0) -> Path:
    arr = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path)
    return path


def test_json_download_has_pixel_boxes_inside_the_image(studio, example_images):
    session = _loaded(studio, example_images[2])
    session, _ = ws.click(session, "Positive point", {"x": 30, "y": 200})
    _, view, caption, files, session = _run(studio, session, max_words=8)
    json_path, png_path = (Path(f) for f in files)
    assert json_path.name == "caption.json" and png_path.name == "caption_overlay.png"
    record = json.loads(json_path.read_text())
    width, height = Image.open(example_images[2]).size
    assert record["image"] == {"width": width, "height": height}
    assert record["text"] == caption and len(record["words"]) == len(view["words"]) == 8
    for word, shown in zip(record["words"], view["words"]):
        x0, y0, x1, y1 = word["box"]
        assert 0 <= x0 <= x1 <= width and 0 <= y0 <= y1 <= height
        assert word["box"] == shown["box"]  # no downscale: the viewer frame is the image's own
    assert record["prompts"]["points"] == [[30.0, 200.0]] and record["prompts"]["point_labels"] == [1]
    overlay = Image.open(png_path)
    assert overlay.size == (width, height)
    original = np.asarray(Image.open(example_images[2]).convert("RGB"))
    assert not np.array_equal(np.asarray(overlay.convert("RGB")), original)


def test_downscaled_uploads_map_coordinates_back_to_the_original(studio, tmp_path, prefix_calls):
    big = _png(tmp_path / "big.png", 4096, 1024)
    session = _loaded(studio, big)
    assert (session.image["width"], session.image["height"]) == (2048, 512)
    assert (session.image["orig_width"], session.image["orig_height"]) == (4096, 1024)
    session, _ = ws.drag_box(session, {"box": [100, 50, 600, 400]})
    _, view, _, files, _ = _run(studio, session, max_words=4)
    record = json.loads(Path(files[0]).read_text())
    assert record["image"] == {"width": 4096, "height": 1024}
    assert record["prompts"]["box"] == [200.0, 100.0, 1200.0, 800.0]
    for word, shown in zip(record["words"], view["words"]):
        assert word["box"] == pytest.approx([c * 2 for c in shown["box"]], abs=0.02)
        assert 0 <= word["box"][0] <= word["box"][2] <= 4096 and 0 <= word["box"][1] <= word["box"][3] <= 1024

    # the API takes prompts in the original pixels too
    result = api.caption(studio, str(big), json.dumps({"box": [200, 100, 1200, 800]}), "", 4, False, 1, 1, None)
    torch.testing.assert_close(prefix_calls[-1]["boxes"],
                               torch.tensor([[200 / 4096, 100 / 1024, 1200 / 4096, 800 / 1024]]), atol=1e-6, rtol=0)
    assert result["image"] == {"width": 4096, "height": 1024}
    assert [w["box"] for w in result["words"]] == [w["box"] for w in record["words"]]


def test_each_request_writes_its_own_download_folder(studio, example_images):
    session = _loaded(studio, example_images[0])
    *_, files_a, _ = _run(studio, session, max_words=3)
    *_, files_b, _ = _run(studio, session, max_words=3)
    assert Path(files_a[0]).parent != Path(files_b[0]).parent
    assert Path(files_a[0]).parent.parent == studio.download_root


def test_api_outputs_are_plain_json(studio, example_images):
    cap = api.caption(studio, str(example_images[0]), '{"points": [[50, 60]], "point_labels": [1]}',
                      "", 4, False, 1, 1, None)
    ref = api.refer(studio, str(example_images[0]), "the red circle\nthe blue triangle")
    dense = api.dense(studio, str(example_images[0]), 0.0, 2)
    for result in (cap, ref, dense):
        json.loads(json.dumps(result, allow_nan=False))
    assert len(cap["words"]) == 4 and cap["prompts"]["points"] == [[50.0, 60.0]]
    assert [r["expression"] for r in ref["results"]] == ["the red circle", "the blue triangle"]
    assert 1 <= len(dense["regions"]) <= 2 and all("words" in r for r in dense["regions"])


# ------------------------------------------------------------------------------------------ store

def test_every_output_shown_is_logged_with_the_adapter(studio, example_images):
    store = studio.store
    session = _loaded(studio, example_images[0])
    session, _ = ws.click(session, "Positive point", {"x": 100, "y": 100})
    _, view, *_ = _run(studio, session, max_words=4)
    session = _run(studio, session, max_words=4)[-1]
    session, ref_view, _ = cb.refer(studio, session, "the red circle")
    session, dense_view, _ = cb.dense(studio, session, 0.0, 2)
    list(cb.dense_select(studio, session, {"i": 0}, records.Visitor("s1")))
    api.caption(studio, str(example_images[0]), "", "", 3, False, 1, 1, None, records.Visitor("api-session", "ann"))
    rows = list(reversed(store.list_generations()))
    assert [r["task"] for r in rows] == ["caption", "caption", "refer", "dense", "caption", "caption"]
    first = rows[0]
    assert first["words"] == [w["text"] for w in view["words"]] and first["boxes"] == [w["box"] for w in view["words"]]
    assert first["prompts"]["points"] == [[100.0, 100.0]] and first["session"] == "test"
    assert all(r["model_id"] == "tests/small-checkpoint" and r["model_version"] == studio.model.version
               and r["adapter"] is None for r in rows)
    assert rows[2]["boxes"] == [ref_view["regions"][0]["box"]]
    assert len(rows[3]["words"]) == len(dense_view["regions"])
    assert (rows[-1]["session"], rows[-1]["user"]) == ("api-session", "ann")  # behind --auth: the login
    assert rows[0]["user"] is None
    assert len({r["image_sha"] for r in rows}) == 1  # one stored image, reused
    assert session.last["generation_id"] == rows[4]["id"]  # what an Annotate tab would correct


def test_an_adapter_is_logged_with_the_fingerprint_of_its_weights(tmp_path, annotation_store, example_images):
    """finetune names an adapter after its --out folder, so two runs' adapters can share a name: each output
    records which weights served it (the adapter file's fingerprint; "in-memory" for one never saved)."""
    from pixelllm import PixelLLM, PixelLLMPredictor
    from pixelllm.checkpoint import file_fingerprint
    from tests.helpers import small_model

    def served_by(model) -> dict:
        studio = ws.Studio(predictor=PixelLLMPredictor(model, device="cpu"), store=annotation_store,
                           min_word_interval=0.0)
        api.caption(studio, str(example_images[0]), "", "", 2, False, 1, 1, None, VISITOR)
        return annotation_store.list_generations(limit=1)[0]

    versions = []
    for seed in (1, 2):  # two finetunes, both called "ft1"
        model = small_model(seed=seed)
        model.add_adapter("ft1")
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.5)
        assert served_by(model)["extra"]["adapter_version"] == "in-memory"
        model.save_pretrained(tmp_path / f"run{seed}")
        row = served_by(PixelLLM.from_pretrained(tmp_path / f"run{seed}"))
        assert row["adapter"] == "ft1"
        assert row["extra"]["adapter_version"] == file_fingerprint(
            tmp_path / f"run{seed}" / "adapters" / "ft1" / "adapter_model.safetensors")
        versions.append(row["extra"]["adapter_version"])
    assert versions[0] != versions[1]
    assert "adapter_version" not in served_by(small_model(seed=1))["extra"]  # the base model: no adapter


def test_a_failing_store_warns_but_the_user_keeps_the_result(studio, example_images):
    class BrokenStore:
        def add_image(self, *args, **kwargs):
            raise StoreError("database is locked")

    studio.store = BrokenStore()
    session = _loaded(studio, example_images[0])
    with pytest.warns(UserWarning, match="could not be saved"):
        _, view, caption, files, _ = _run(studio, session, max_words=3)
    assert len(view["words"]) == 3 and caption and len(files) == 2
    assert json.loads(Path(files[0]).read_text())["generation_id"] is None

"""The Refer and Dense tabs' callbacks (pixelllm/ui/callbacks.py) driving a real predictor on a small random
checkpoint: a box, mask and score per expression, the low-score mark read from the checkpoint's evaluation; dense
regions, tracing one region (by index, click or dragged box) and the max-regions field.

The rest of tests/app_callbacks/: prompts and Inspect words: test_callbacks_prompts.py; captions, decoding options
and Trace: test_callbacks_caption.py; opening and replacing images: test_callbacks_images.py; downloads and the
store: test_callbacks_records.py; app.py and the Model panel: test_callbacks_app.py. Fixtures: conftest.py."""

from __future__ import annotations

import json
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
import torch
from PIL import Image

from pixelllm.ui import callbacks as cb
from pixelllm.ui import workspace as ws
from tests.app_callbacks.conftest import VISITOR, _loaded

# ------------------------------------------------------------------------------------------ referring

def test_refer_gives_box_mask_and_score_per_expression(studio, example_images):
    session = _loaded(studio, example_images[0])
    session, view, files = cb.refer(studio, session, "the large blue triangle\n\n  the purple   triangle ")
    regions = view["regions"]
    assert [r["label"] for r in regions] == ["the large blue triangle", "the purple triangle"]
    assert regions[0]["color"] != regions[1]["color"]
    assert all(r["mask"].startswith("data:image/png;base64,") for r in regions)
    names = [Path(f).name for f in files]
    assert names == ["refer.json", "mask_1_the-large-blue-triangle.png", "mask_2_the-purple-triangle.png",
                     "refer_overlay.png"]
    record = json.loads(Path(files[0]).read_text())
    width, height = Image.open(example_images[0]).size
    for i, result in enumerate(record["results"]):
        mask = np.asarray(Image.open(files[1 + i]))
        assert mask.shape == (height, width) and set(np.unique(mask)) <= {0, 255}
        assert result["mask_area"] == int((mask > 0).sum())
        counts = result["mask"]["counts"]
        assert sum(counts) == width * height and sum(counts[1::2]) == result["mask_area"]
        assert 0 <= result["box"][0] <= result["box"][2] <= width and 0 <= result["score"] <= 1


def test_a_referral_under_the_evaluations_absent_median_is_marked_low(small_predictor, example_images, tmp_path):
    """The mark follows metrics.json's `refer_score_quantiles.absent.p50`; without an evaluation there is none."""
    def studio() -> ws.Studio:  # a new studio each time: it reads metrics.json once
        return ws.Studio(predictor=small_predictor, checkpoint=str(tmp_path), min_word_interval=0.0,
                         download_root=tmp_path / "downloads")

    def details(studio: ws.Studio) -> list[str]:
        _, view, _ = cb.refer(studio, _loaded(studio, example_images[0]), "the red circle\nthe blue triangle")
        for region in view["regions"]:  # the viewer draws a low one dashed
            assert region["low"] == ("low score" in region["detail"])
        return [region["detail"] for region in view["regions"]]

    plain = studio()
    assert plain.low_refer_score() is None and not any("low score" in d for d in details(plain))
    for median, marked in ((0.999999, True), (1e-9, False)):  # the small model's scores lie between the two
        (tmp_path / "metrics.json").write_text(json.dumps({"metrics": {}, "refer_score_quantiles": {
            "present": {"p50": 0.5}, "absent": {"p50": median}}}))
        evaluated = studio()
        assert evaluated.low_refer_score() == median
        assert all(("· low score: may not be in the image" in d) == marked for d in details(evaluated))


# ------------------------------------------------------------------------------------------ dense

def test_dense_regions_and_tracing_one_region(studio, example_images, prefix_calls):
    session = _loaded(studio, example_images[0])
    session, view, files = cb.dense(studio, session, 0.0, 3)
    assert 1 <= len(view["regions"]) <= 3
    assert all(r["label"] and r["color"] for r in view["regions"])
    record = json.loads(Path(files[0]).read_text())
    assert [r["caption"] for r in record["regions"]] == [r["label"] for r in view["regions"]]

    outputs = list(cb.dense_select(studio, session, {"i": 0}, VISITOR))
    session, final, text = outputs[-1]
    assert final["selected"] == 0 and final["words"] and text == " ".join(w["text"] for w in final["words"])
    assert len(outputs) >= 3  # streamed
    box = session.dense[0]["box"]
    w, h = session.image["width"], session.image["height"]
    torch.testing.assert_close(prefix_calls[-1]["boxes"],
                               torch.tensor([[box[0] / w, box[1] / h, box[2] / w, box[3] / h]]),
                               atol=1e-5, rtol=0)
    x, y = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    clicked = list(cb.dense_select(studio, session, {"x": x, "y": y}, VISITOR))[-1][1]
    assert clicked["selected"] == cb.region_at(session.dense, x, y)
    with pytest.raises(gr.Error, match="region"):
        list(cb.dense_select(studio, session, {"i": 99}, VISITOR))
    # a dragged box is listed as the user's, with no detection score (it showed a made-up 1.00)
    dragged = list(cb.dense_select(studio, session, {"box": [10, 10, 60, 50]}, VISITOR))[-1][1]
    mine = dragged["regions"][dragged["selected"]]
    assert mine["label"] == "your box" and mine["detail"] == "drawn, not detected" and mine["score"] is None
    assert len(dragged["regions"]) == len(session.dense) + 1


@pytest.mark.parametrize("max_regions", [5.9, True, float("inf"), "abc", None])
def test_dense_max_regions_is_read_as_a_whole_number(max_regions):
    """Max regions went through int(): 5.9 became 5, True 1 region, and infinity an OverflowError (a server error,
    not a message)."""
    with pytest.raises(ValueError, match="^max regions must be a whole number"):
        cb.dense_options(0.3, max_regions)
    assert cb.dense_options("0.3", "7") == (0.3, 7) and cb.dense_options(0.3, 7.0) == (0.3, 7)

"""Training data: word-level targets become token-level targets; LN-only folders load; every task collates."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from pixelllm.tokenizer import encode_text
from tests.helpers import small_tokenizer
from training.data.datasets import TASKS, Collator, MultiTaskSampler, ShapesData
from training.data.shapes import generate_split


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    generate_split(root, "train", 6, seed=11)
    return root


def test_tokens_inherit_their_words_boxes(shapes_dir):
    tok = small_tokenizer()
    data = ShapesData(shapes_dir, "train", 64)
    batch = Collator(data, tok, 64, max_tokens=200)("narrative", [0, 1], np.random.default_rng(0))
    for row, index in enumerate([0, 1]):
        rec = data.records[data.narratives[index]]
        labels = batch["labels"][row]
        n = int((labels != -100).sum()) - 1  # without EOS
        # word-by-word tokenisation equals tokenising the whole caption (Metaspace splits at word starts)
        assert labels[:n].tolist() == encode_text(tok, " ".join(rec.words), eos=False)
        assert labels[n] == tok.eos_token_id
        start = 0
        for word, box in zip(rec.words, rec.word_boxes):
            count = len(encode_text(tok, word, eos=False))
            np.testing.assert_allclose(batch["token_boxes"][row, start:start + count].numpy(),
                                       np.repeat(box[None], count, 0), atol=1e-6)
            start += count
        assert bool(batch["token_box_mask"][row, :n].all()) and not bool(batch["token_box_mask"][row, n:].any())


def test_every_task_collates_with_consistent_shapes(shapes_dir):
    tok = small_tokenizer()
    data = ShapesData(shapes_dir, "train", 64)
    collate = Collator(data, tok, 64)
    sampler = MultiTaskSampler(data, {t: 1.0 for t in TASKS}, batch_size=3, seed=0)
    seen = set()
    for step in range(80):
        task, indices, rng = sampler.draw(step)
        batch = collate(task, indices, rng)
        seen.add(task)
        assert batch["images"].shape == (3, 3, 64, 64)
        assert batch["labels"].shape == batch["token_box_mask"].shape
        if task == "refer":
            # the box read at EOS is the object's box; the mask is that object's pixels
            assert batch["masks"].shape == (3, 64, 64) and bool((batch["masks"].sum((1, 2)) > 0).all())
            assert not bool(batch["token_box_mask"].any())
        if task == "region_points":
            assert bool(((batch["prompt_points"] >= 0) & (batch["prompt_points"] <= 1)).all())
    assert seen == set(TASKS)


def test_plain_localized_narratives_folder_loads(tmp_path):
    """An LN COCO-style folder (LN JSONL + images/<image_id>.jpg, no Shapes extras) gives the caption tasks."""
    (tmp_path / "images").mkdir()
    Image.new("RGB", (40, 30), (200, 10, 10)).save(tmp_path / "images" / "coco_1.jpg")
    record = {"dataset_id": "mscoco_val2017", "image_id": "coco_1", "annotator_id": 7,
              "caption": "A red wall.", "voice_recording": "coco_val/coco_1.ogg",
              "timed_caption": [{"utterance": "A", "start_time": 0.0, "end_time": 0.5},
                                {"utterance": "red wall.", "start_time": 0.5, "end_time": 1.5}],
              "traces": [[{"x": 0.1, "y": 0.2, "t": 0.0}, {"x": 0.5, "y": 0.6, "t": 1.0}],
                         [{"x": 0.9, "y": 0.9, "t": 1.5}]]}
    (tmp_path / "val.ln.jsonl").write_text(json.dumps(record) + "\n")
    data = ShapesData(tmp_path, "val", 32)
    assert data.size("narrative") == 1 and data.size("refer") == 0 and data.size("region_box") == 0
    rec = data.records[0]
    assert rec.words == ["A", "red", "wall."] and (rec.width, rec.height) == (40, 30)
    np.testing.assert_allclose(rec.word_boxes[1], rec.word_boxes[2])  # one utterance, two words
    batch = Collator(data, small_tokenizer(), 32)("narrative", [0], np.random.default_rng(0))
    assert batch["gt_valid"].sum() == 0


def test_lazy_loading_gives_the_same_batches(shapes_dir):
    tok = small_tokenizer()
    eager = Collator(ShapesData(shapes_dir, "train", 64), tok, 64)
    lazy = Collator(ShapesData(shapes_dir, "train", 64, lazy=True), tok, 64)
    assert lazy.data.records[0].pixels is None
    for task in ("refer", "region_points"):
        a = eager(task, [0, 2], np.random.default_rng(1))
        b = lazy(task, [0, 2], np.random.default_rng(1))
        assert a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a)

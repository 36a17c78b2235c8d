"""Training data: word-level targets become token-level targets; LN-only folders load; every task collates."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from pixelllm.tokenizer import encode_text
from tests.helpers import small_tokenizer
from training.data.datasets import TASKS, Collator, ShapesData
from training.data.sampling import MultiTaskSampler
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
        _, narrative = data.narratives[index]
        labels = batch["labels"][row]
        n = int((labels != -100).sum()) - 1  # without EOS
        # word-by-word tokenisation equals tokenising the whole caption (Metaspace splits at word starts)
        assert labels[:n].tolist() == encode_text(tok, " ".join(narrative.words), eos=False)
        assert labels[n] == tok.eos_token_id
        start = 0
        for word, box in zip(narrative.words, narrative.word_boxes):
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
        if task in ("refer", "refer_image"):
            # the box read at EOS is the object's box; the mask is that object's pixels
            rows = batch["labels"].shape[0]
            assert batch["masks"].shape == (rows, 64, 64) and bool((batch["masks"].sum((1, 2)) > 0).all())
            assert not bool(batch["token_box_mask"].any())
            assert rows == 3 if task == "refer" else rows >= 3
        if task == "region_image":
            rows = batch["labels"].shape[0]
            assert rows >= 3 and batch["prompt_boxes"].shape == (rows, 4) and batch["image_index"].shape == (rows,)
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
    [narrative] = rec.narratives
    assert narrative.words == ["A", "red", "wall."] and (rec.width, rec.height) == (40, 30)
    np.testing.assert_allclose(narrative.word_boxes[1], narrative.word_boxes[2])  # one utterance, two words
    batch = Collator(data, small_tokenizer(), 32)("narrative", [0], np.random.default_rng(0))
    assert batch["gt_valid"].sum() == 0


def test_lazy_loading_gives_the_same_batches(shapes_dir):
    tok = small_tokenizer()
    eager = Collator(ShapesData(shapes_dir, "train", 64), tok, 64)
    lazy = Collator(ShapesData(shapes_dir, "train", 64, lazy=True), tok, 64)
    assert lazy.data.records[0].pixels is None
    for task in ("refer", "refer_image", "region_points", "region_image"):
        a = eager(task, [0, 2], np.random.default_rng(1))
        b = lazy(task, [0, 2], np.random.default_rng(1))
        assert a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a)


def test_refer_image_items_bring_their_images_expressions(shapes_dir):
    """A `refer_image` item is an image with up to `refer_per_image` of its expressions; each row is the same
    (labels, box, mask) as that expression collated on its own by the `refer` task, and `image_index` names its
    image in the batch."""
    tok = small_tokenizer()
    data = ShapesData(shapes_dir, "train", 64)
    assert data.size("refer_image") == len({r["image_id"] for r in data.refer})
    cap = 3
    assert any(len(own) > cap for own in data.refer_by_image.values())  # the cap is exercised
    grouped = Collator(data, tok, 64, refer_per_image=cap)
    flat = Collator(data, tok, 64)
    items = list(range(data.size("refer_image")))
    batch = grouped("refer_image", items, np.random.default_rng(0))
    assert batch["images"].shape[0] == len(items)
    counts = [min(len(data.refer_by_image[data.refer_images[i]]), cap) for i in items]
    assert batch["image_index"].tolist() == [b for b, n in enumerate(counts) for _ in range(n)]
    seen = set()
    for row, b in enumerate(batch["image_index"].tolist()):
        rec = data.records[data.refer_images[b]]
        assert torch.equal(batch["images"][b], rec.pixels.float())
        labels = batch["labels"][row]
        text = tok.decode(labels[labels >= 0].tolist(), skip_special_tokens=True)
        [k] = [k for k in data.refer_by_image[data.refer_images[b]] if data.refer[k]["expression"] == text]
        assert k not in seen
        seen.add(k)
        ref = data.refer[k]
        assert ref["image_id"] == rec.image_id
        expected_box = np.array(ref["box"], np.float32) / np.array([rec.width, rec.height] * 2, np.float32)
        np.testing.assert_allclose(batch["refer_boxes"][row].numpy(), expected_box, atol=1e-6)
        alone = flat("refer", [k], np.random.default_rng(0))
        width = int((alone["labels"][0] >= 0).sum())
        assert torch.equal(labels[:width], alone["labels"][0, :width]) and bool((labels[width:] == -100).all())
        assert torch.equal(batch["masks"][row], alone["masks"][0]) and bool(batch["mask_valid"][row])


def test_region_image_items_bring_their_images_objects(shapes_dir):
    """A `region_image` item is an image with up to `region_per_image` of its objects, each object once; each row's
    target is that object's caption with every token at its box, its prompt is the object's box moved by at most a
    few jitter sigmas, and `image_index` names its image in the batch."""
    tok = small_tokenizer()
    data = ShapesData(shapes_dir, "train", 64)
    assert data.size("region_image") == sum(1 for rec in data.records if rec.objects)
    cap = 2
    assert any(len(own) > cap for own in data.regions_by_image.values())  # the cap is exercised
    collate = Collator(data, tok, 64, region_per_image=cap, box_jitter=0.05)
    items = list(range(data.size("region_image")))
    batch = collate("region_image", items, np.random.default_rng(0))
    counts = [min(len(data.regions_by_image[data.region_images[i]]), cap) for i in items]
    assert batch["image_index"].tolist() == [b for b, n in enumerate(counts) for _ in range(n)]
    seen = set()
    for row, b in enumerate(batch["image_index"].tolist()):
        rec = data.records[data.region_images[b]]
        assert torch.equal(batch["images"][b], rec.pixels.float())
        labels = batch["labels"][row]
        text = tok.decode(labels[labels >= 0].tolist(), skip_special_tokens=True)
        scale = np.array([rec.width, rec.height] * 2, np.float32)
        traced = batch["token_boxes"][row, 0].numpy()
        [obj] = [o for o in rec.objects if np.allclose(np.array(o["box"], np.float32) / scale, traced, atol=1e-6)]
        assert text == f"{obj['size']} {obj['color']} {obj['shape']}" and (rec.image_id, obj["object_id"]) not in seen
        seen.add((rec.image_id, obj["object_id"]))
        box = np.array(obj["box"], np.float32) / scale
        n = int((labels >= 0).sum()) - 1  # the EOS has no trace box
        np.testing.assert_allclose(batch["token_boxes"][row, :n].numpy(), np.repeat(box[None], n, 0), atol=1e-6)
        size = np.array([box[2] - box[0], box[3] - box[1]] * 2)
        assert np.all(np.abs(batch["prompt_boxes"][row].numpy() - box) <= 5 * 0.05 * size + 1e-3)
    assert len(seen) == sum(counts)


def test_per_task_batch_sizes(shapes_dir):
    data = ShapesData(shapes_dir, "train", 64)
    sampler = MultiTaskSampler(data, {"narrative": 1, "refer_image": 1}, batch_size=4, seed=0,
                               batch_sizes={"refer_image": 2})
    sizes = {}
    for step in range(20):
        task, indices, _ = sampler.draw(step)
        sizes.setdefault(task, set()).add(len(indices))
    assert sizes == {"narrative": {4}, "refer_image": {2}}


def _ln_record(image_id: str, annotator: int, words: list[str]) -> dict:
    """An LN record with one utterance per word and a trace that moves right and down over time."""
    return {"dataset_id": "mscoco_train2017", "image_id": image_id, "annotator_id": annotator,
            "caption": " ".join(words), "voice_recording": "",
            "timed_caption": [{"utterance": w, "start_time": 0.5 * i, "end_time": 0.5 * i + 0.4}
                              for i, w in enumerate(words)],
            "traces": [[{"x": 0.05 * k, "y": 0.04 * k, "t": 0.3 * k} for k in range(2 * len(words) + 2)]]}


def _write_jsonl(path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def _decode(tok, labels: torch.Tensor) -> str:
    return tok.decode(labels[labels >= 0].tolist(), skip_special_tokens=True).strip()


def test_every_narrative_of_an_image_trains(tmp_path):
    """LN COCO has several narratives for many images (Scenic keeps them all): each kept record is a
    `narrative` / `prefix` item of its image, each of its sentences a `sentence` item."""
    (tmp_path / "images").mkdir()
    Image.new("RGB", (48, 32), (200, 200, 200)).save(tmp_path / "images" / "391895.jpg")
    first = "A man rides a bike.".split()
    second = "There is a person on a bicycle. The road is grey.".split()
    _write_jsonl(tmp_path / "train.ln.jsonl", [_ln_record("391895", 1, first), _ln_record("391895", 2, second)])
    data = ShapesData(tmp_path, "train", 32)
    assert len(data.records) == 1 and data.ln_stats.kept == 2
    assert (data.size("narrative"), data.size("prefix"), data.size("sentence")) == (2, 2, 3)
    tok = small_tokenizer()
    collate = Collator(data, tok, 32, max_tokens=200)
    narratives = collate("narrative", [0, 1], np.random.default_rng(0))
    assert [_decode(tok, row) for row in narratives["labels"]] == [" ".join(first), " ".join(second)]
    assert torch.equal(narratives["images"][0], narratives["images"][1])  # both on the one image
    sentences = collate("sentence", [0, 1, 2], np.random.default_rng(0))
    assert [_decode(tok, row) for row in sentences["labels"]] == [
        "A man rides a bike.", "There is a person on a bicycle.", "The road is grey."]


def test_ln_records_of_two_collections_with_one_bare_id_are_two_images(tmp_path):
    """LN COCO and LN Flickr30k number their images apart: Flickr30k's 36979 is not COCO's. A Flickr30k record is
    the image `flickr:36979` (as `training.convert` names Flickr30k images), found as images/36979.jpg; COCO's
    is images/000000036979.jpg. One bare id merged their narratives onto one picture."""
    (tmp_path / "images").mkdir()
    Image.new("RGB", (64, 48), (200, 0, 0)).save(tmp_path / "images" / "000000036979.jpg")
    Image.new("RGB", (30, 50), (0, 0, 200)).save(tmp_path / "images" / "36979.jpg")
    coco, flickr = "A red square.".split(), "A blue street.".split()
    _write_jsonl(tmp_path / "train.ln.jsonl", [_ln_record("36979", 1, coco),
                                               {**_ln_record("36979", 2, flickr), "dataset_id": "flickr30k_train"}])
    data = ShapesData(tmp_path, "train", 32)
    assert sorted((r.image_id, r.file_name, r.width, [n.words for n in r.narratives]) for r in data.records) == [
        ("36979", "images/000000036979.jpg", 64, [coco]), ("flickr:36979", "images/36979.jpg", 30, [flickr])]
    # an id of another dataset that holds a colon is still its own file name
    Image.new("RGB", (20, 20)).save(tmp_path / "images" / "site:0001.jpg")
    _write_jsonl(tmp_path / "train.ln.jsonl", [{**_ln_record("site:0001", 3, coco), "dataset_id": "my_photos"}])
    assert [r.file_name for r in ShapesData(tmp_path, "train", 32).records] == ["images/site:0001.jpg"]


def test_dense_regions_become_the_objects_of_an_ln_image(tmp_path):
    """Dense regions of any image without Shapes ground truth are its objects, also when the image has an LN
    record (LN is read first)."""
    (tmp_path / "images").mkdir()
    Image.new("RGB", (40, 30), (10, 10, 200)).save(tmp_path / "images" / "5.jpg")
    _write_jsonl(tmp_path / "train.ln.jsonl", [_ln_record("5", 1, "A blue wall.".split())])
    _write_jsonl(tmp_path / "train.dense.jsonl", [
        {"image_id": "5", "file_name": "images/5.jpg", "width": 40, "height": 30,
         "regions": [{"box": [0, 0, 20, 15], "caption": "a wall"}, {"box": [20, 15, 40, 30], "caption": "a corner"}]},
        {"image_id": "5", "file_name": "images/5.jpg", "regions": [{"box": [4, 4, 8, 8], "caption": "a spot"}]}])
    data = ShapesData(tmp_path, "train", 32)
    [rec] = data.records
    assert [(o["object_id"], o["caption"]) for o in rec.objects] == [(1, "a wall"), (2, "a corner"), (3, "a spot")]
    assert (data.size("narrative"), data.size("region_box"), data.size("region_image")) == (1, 3, 1)
    batch = Collator(data, small_tokenizer(), 32)("narrative", [0], np.random.default_rng(0))
    np.testing.assert_allclose(batch["gt_boxes"][0, :2].numpy(), [[0, 0, 0.5, 0.5], [0.5, 0.5, 1, 1]], atol=1e-6)


def test_an_image_id_naming_two_different_images_is_an_error(tmp_path):
    """A referring expression on COCO image 42 and dense regions of VG image 42 under one bare id: the files
    give two image sizes, so the expression would train on the other picture. That is an error, not a merge."""
    (tmp_path / "images").mkdir()
    Image.new("RGB", (64, 48)).save(tmp_path / "images" / "COCO_train2014_000000000042.jpg")
    Image.new("RGB", (50, 33)).save(tmp_path / "images" / "42.jpg")
    _write_jsonl(tmp_path / "train.dense.jsonl", [{"image_id": "42", "file_name": "images/42.jpg", "width": 50,
                                                   "height": 33, "regions": [{"box": [5, 5, 10, 10], "caption": "a"}]}])
    refer = {"image_id": "42", "file_name": "images/COCO_train2014_000000000042.jpg", "ref_id": "r", "width": 64,
             "height": 48, "expression": "man on the left", "box": [1.0, 2.0, 30.0, 40.0]}
    _write_jsonl(tmp_path / "train.refer.jsonl", [refer])
    with pytest.raises(ValueError, match="'42' names two different images"):
        ShapesData(tmp_path, "train", 32)
    # without sizes in the lines, the files' own sizes tell the two images apart
    unsized = {k: v for k, v in refer.items() if k not in ("width", "height")}
    _write_jsonl(tmp_path / "train.refer.jsonl", [unsized])
    with pytest.raises(ValueError, match="'42' names two different images"):
        ShapesData(tmp_path, "train", 32)
    # nothing to compare (no size, no file): taken as the image, but counted and warned about, not silent
    _write_jsonl(tmp_path / "train.refer.jsonl", [{**unsized, "file_name": "images/missing.jpg"}])
    with pytest.warns(UserWarning, match="1 lines name a known image_id"):
        data = ShapesData(tmp_path, "train", 32)
    assert data.image_stats["unchecked"] == 1 and data.size("refer") == 1


def test_a_cut_caption_does_not_end_with_eos(tmp_path):
    """A target longer than `max_tokens` is cut; a cut caption must not teach the model to stop there: no EOS,
    its first `max_tokens` tokens keep their losses and boxes. Targets that fit still end with EOS; a cut
    referring expression keeps its EOS (its box is read there)."""
    (tmp_path / "images").mkdir()
    for name in ("1", "2"):
        Image.new("RGB", (40, 30)).save(tmp_path / "images" / f"{name}.jpg")
    long_words = "one two three four five six seven eight nine ten eleven twelve.".split()
    _write_jsonl(tmp_path / "train.ln.jsonl", [_ln_record("1", 1, long_words), _ln_record("2", 1, ["Red."])])
    _write_jsonl(tmp_path / "train.refer.jsonl", [
        {"image_id": "1", "file_name": "images/1.jpg", "ref_id": "r0", "expression": " ".join(long_words),
         "box": [0, 0, 20, 15]}])
    tok = small_tokenizer()
    data = ShapesData(tmp_path, "train", 32)
    max_tokens = 6
    whole = encode_text(tok, " ".join(long_words), eos=False)
    assert len(whole) > max_tokens
    collate = Collator(data, tok, 32, max_tokens=max_tokens)
    batch = collate("narrative", [0, 1], np.random.default_rng(0))
    labels = batch["labels"]
    assert labels.shape == (2, max_tokens)
    assert labels[0].tolist() == whole[:max_tokens] and tok.eos_token_id not in labels[0].tolist()
    assert bool(batch["token_box_mask"][0].all())
    short = encode_text(tok, "Red.", eos=False)
    assert labels[1, : len(short) + 1].tolist() == short + [tok.eos_token_id]
    sentence = collate("sentence", [0], np.random.default_rng(0))["labels"][0]
    assert sentence.tolist() == whole[:max_tokens]
    refer = collate("refer", [0], np.random.default_rng(0))["labels"][0]
    assert refer.tolist() == whole[: max_tokens - 1] + [tok.eos_token_id]


def _first_line(path, change) -> None:
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    change(lines[0])
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))


def _set(key, value):
    return lambda record: record.__setitem__(key, value)


def _set_region(key, value):
    return lambda record: record["regions"][0].__setitem__(key, value)


@pytest.mark.parametrize("kind, change, match", [
    # a NaN / infinite / null box reached the batch as a NaN target (the loss became NaN); others were tracebacks
    ("refer", _set("box", [float("nan"), 1, 20, 20]), "NaN or infinite"),
    ("refer", _set("box", [0, 1, float("inf"), 20]), "NaN or infinite"),
    ("refer", _set("box", [None, 1, 20, 20]), r"box must be \[x0, y0, x1, y1\]"),
    ("refer", _set("box", [10**400, 1, 20, 20]), "NaN or infinite"),
    ("refer", _set("box", [30, 30, 10, 10]), "x1 < x0"),
    ("refer", lambda record: record.pop("expression"), "expression must be a string"),
    ("refer", _set("expression", "the \ud800 star"), "valid Unicode"),
    ("objects", lambda record: record["objects"][0].__setitem__("box", [float("nan"), 1, 2, 3]),
     r"objects\[0\]: box has a NaN"),
], ids=["nan", "infinity", "null", "huge-int", "reversed", "no-expression", "surrogate", "objects-nan"])
def test_a_bad_record_is_refused_naming_its_file_and_line(shapes_dir, tmp_path, kind, change, match):
    root = tmp_path / "data"
    shutil.copytree(shapes_dir, root)
    _first_line(root / f"train.{kind}.jsonl", change)
    with pytest.raises(ValueError, match=rf"train\.{kind}\.jsonl, line 1: .*{match}"):
        ShapesData(root, "train", 64)


def _dense_folder(root, record) -> None:
    (root / "images").mkdir(parents=True)
    Image.new("RGB", (40, 30)).save(root / "images" / "1.jpg")
    line = {"image_id": "vg:1", "file_name": "images/1.jpg", "width": 40, "height": 30,
            "regions": [{"box": [1, 2, 20, 25], "caption": "a dog"}]}
    record(line)
    _write_jsonl(root / "train.dense.jsonl", [line, line])


@pytest.mark.parametrize("change, match", [
    (_set_region("box", [float("nan"), 2, 20, 25]), r"regions\[0\]: box has a NaN"),
    (_set_region("box", [20, 25, 1, 2]), "x1 < x0"),  # region_points: numpy's "high - low < 0" mid-training
    (_set_region("caption", None), r"regions\[0\]\.caption must be a string"),
    (_set("regions", {"box": [1, 2, 20, 25]}), "regions must be a list"),
    (_set("width", 0), "width must be a number of pixels >= 1"),  # boxes / 0 = inf targets
], ids=["nan", "reversed", "null-caption", "regions-object", "zero-width"])
def test_a_bad_dense_record_is_refused_naming_its_file_and_line(tmp_path, change, match):
    _dense_folder(tmp_path, change)
    with pytest.raises(ValueError, match=rf"train\.dense\.jsonl, line 1: .*{match}"):
        ShapesData(tmp_path, "train", 32)


def test_a_line_that_is_not_an_object_is_refused_naming_its_line(shapes_dir, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(shapes_dir, root)
    refer = root / "train.refer.jsonl"
    refer.write_text(refer.read_text() + "null\n")  # was TypeError: 'NoneType' object is not subscriptable
    count = len(refer.read_text().splitlines())
    with pytest.raises(ValueError, match=rf"train\.refer\.jsonl, line {count}: a record must be a JSON object"):
        ShapesData(root, "train", 64)


@pytest.mark.parametrize("lazy", [False, True])
@pytest.mark.parametrize("damage", ["missing", "not-an-image"])
def test_a_missing_or_unreadable_image_is_named_before_training(tmp_path, lazy, damage):
    """Was a FileNotFoundError / UnidentifiedImageError traceback; lazily (real datasets) the missing file was only
    found when a batch needed it, in the middle of training."""
    _dense_folder(tmp_path, lambda line: None)
    image = tmp_path / "images" / "1.jpg"
    if damage == "missing":
        image.unlink()
    else:
        image.write_bytes(b"not an image")
    if damage == "not-an-image" and lazy:  # lazily only the header is read when the line gives no size
        _write_jsonl(tmp_path / "train.dense.jsonl", [{"image_id": "vg:1", "file_name": "images/1.jpg",
                                                       "regions": [{"box": [1, 2, 20, 25], "caption": "a"}]}])
    with pytest.raises(ValueError, match=r"image 'vg:1' \(images/1\.jpg\)"):
        ShapesData(tmp_path, "train", 32, lazy=lazy)


def test_files_with_a_byte_order_mark_and_crlf_lines_load_like_plain_ones(shapes_dir, tmp_path):
    """Files saved by a Windows editor (UTF-8 BOM, CRLF): the BOM was "line 1: not JSON" for the whole split."""
    root = tmp_path / "data"
    shutil.copytree(shapes_dir, root)
    for kind in ("ln", "refer", "dense", "objects"):
        path = root / f"train.{kind}.jsonl"
        path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes().replace(b"\n", b"\r\n"))
    plain, edited = ShapesData(shapes_dir, "train", 64), ShapesData(root, "train", 64)
    assert [r.image_id for r in edited.records] == [r.image_id for r in plain.records]
    assert edited.refer == plain.refer and edited.regions == plain.regions
    assert edited.ln_stats == plain.ln_stats and len(edited.narratives) == len(plain.narratives)

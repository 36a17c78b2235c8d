"""Public grounding datasets -> the data folder: MDETR-format RefCOCO/GoldG and Visual Genome regions convert,
and a folder mixing LN, referring and dense files trains every task they provide."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from tests.helpers import small_tokenizer
from training import convert
from training.data.datasets import Collator, ShapesData
from training.data.sampling import MultiTaskSampler

REFCOCO = {
    "images": [
        {"id": 0, "file_name": "COCO_train2014_000000000007.jpg", "width": 80, "height": 60, "original_id": 7,
         "caption": "the red car on the left", "dataset_name": "refcoco"},
        {"id": 1, "file_name": "COCO_train2014_000000000007.jpg", "width": 80, "height": 60, "original_id": 7,
         "caption": "blue bus", "dataset_name": "refcoco"},
        {"id": 2, "file_name": "COCO_train2014_000000000007.jpg", "width": 80, "height": 60, "original_id": 7,
         "caption": "a speck", "dataset_name": "refcoco"},
    ],
    "annotations": [
        {"id": 10, "image_id": 0, "bbox": [-5, 10, 30, 20], "tokens_positive": [[4, 11]]},  # partly outside
        {"id": 11, "image_id": 1, "bbox": [40, 5, 30, 50], "tokens_positive": [[0, 8]]},
        {"id": 12, "image_id": 2, "bbox": [3, 3, 0.5, 4], "tokens_positive": [[2, 7]]},  # under a pixel wide
    ],
}

GOLDG = {
    "images": [{"id": 5, "file_name": "1000.jpg", "width": 100, "height": 100, "original_id": 1000,
                "caption": "A man throws a frisbee to two dogs", "dataset_name": "flickr"}],
    "annotations": [
        {"id": 1, "image_id": 5, "bbox": [10, 10, 20, 40], "tokens_positive": [[0, 5]]},
        {"id": 2, "image_id": 5, "bbox": [50, 50, 10, 10], "tokens_positive": [[13, 22]]},
        {"id": 3, "image_id": 5, "bbox": [70, 70, 10, 10], "tokens_positive": [[26, 34]]},
        {"id": 4, "image_id": 5, "bbox": [85, 70, 10, 10], "tokens_positive": [[26, 34]]},
    ],
}

VG_REGIONS = [
    {"id": 42, "regions": [
        {"region_id": 1, "image_id": 42, "phrase": "a  green  tree ", "x": 5, "y": 6, "width": 20, "height": 30},
        {"region_id": 2, "image_id": 42, "phrase": "A green tree", "x": 5, "y": 6, "width": 20, "height": 30},
        {"region_id": 3, "image_id": 42, "phrase": "", "x": 1, "y": 1, "width": 5, "height": 5},
        {"region_id": 4, "image_id": 42, "phrase": "sky", "x": 0, "y": 0, "width": 64, "height": 10},
    ]},
    {"id": 43, "regions": [{"region_id": 5, "image_id": 43, "phrase": "x", "x": 0, "y": 0, "width": 0, "height": 9}]},
]


def test_mdetr_refcoco_and_goldg_become_referring_records():
    refs, counts = convert.convert_mdetr(REFCOCO, "refcoco")
    assert [r["expression"] for r in refs] == ["the red car on the left", "blue bus"]  # whole caption
    assert refs[0]["box"] == [0.0, 10.0, 25.0, 30.0]  # xywh -> xyxy, clipped to the image
    assert refs[1]["box"] == [40.0, 5.0, 70.0, 55.0]
    assert {r["image_id"] for r in refs} == {"7"} and refs[0]["file_name"] == "images/COCO_train2014_000000000007.jpg"
    assert counts["skipped_degenerate_box"] == 1 and counts["expressions"] == 2

    refs, counts = convert.convert_mdetr(GOLDG, "goldg")
    # phrases with one box each; "two dogs" grounds two boxes and has no single referring target
    assert {r["expression"]: r["box"] for r in refs} == {"A man": [10.0, 10.0, 30.0, 50.0],
                                                          "a frisbee": [50.0, 50.0, 60.0, 60.0]}
    assert counts["skipped_not_one_box"] == 1


def test_visual_genome_regions_become_dense_records():
    sizes = {"42": (64, 48)}
    records, counts = convert.convert_vg(VG_REGIONS, sizes, max_regions=50)
    assert len(records) == 1 and records[0]["image_id"] == "vg:42" and records[0]["file_name"] == "images/42.jpg"
    assert (records[0]["width"], records[0]["height"]) == (64, 48)
    assert records[0]["regions"] == [{"box": [5.0, 6.0, 25.0, 36.0], "caption": "a green tree"},
                                     {"box": [0.0, 0.0, 64.0, 10.0], "caption": "sky"}]
    assert counts["skipped_duplicate"] == 1 and counts["skipped_empty_text"] == 1
    assert counts["skipped_images_without_regions"] == 1
    capped, counts = convert.convert_vg(VG_REGIONS, sizes, max_regions=1)
    assert len(capped[0]["regions"]) == 1 and counts["skipped_over_max_regions"] == 1


@pytest.fixture
def mixed_folder(tmp_path):
    """LN COCO (zero-padded COCO 2017 name) + RefCOCO on the same image + VG regions on another, one split."""
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (80, 60), (10, 200, 10)).save(images / "000000000007.jpg")
    Image.new("RGB", (80, 60), (10, 200, 10)).save(images / "COCO_train2014_000000000007.jpg")
    Image.new("RGB", (64, 48), (200, 10, 10)).save(images / "42.jpg")
    ln = {"dataset_id": "mscoco_train2017", "image_id": "7", "annotator_id": 1, "caption": "A car.",
          "voice_recording": "x.ogg", "timed_caption": [{"utterance": "A car.", "start_time": 0.0, "end_time": 1.0}],
          "traces": [[{"x": 0.1, "y": 0.2, "t": 0.0}, {"x": 0.3, "y": 0.4, "t": 1.0}]]}
    (tmp_path / "train.ln.jsonl").write_text(json.dumps(ln) + "\n")
    (tmp_path / "refcoco.json").write_text(json.dumps(REFCOCO))
    (tmp_path / "regions.json").write_text(json.dumps(VG_REGIONS))
    (tmp_path / "image_data.json").write_text(json.dumps([{"image_id": 42, "width": 64, "height": 48}]))
    assert convert.main(["mdetr", "--ann", str(tmp_path / "refcoco.json"), "--out", str(tmp_path)]) == 0
    assert convert.main(["vg", "--regions", str(tmp_path / "regions.json"), "--image-data",
                         str(tmp_path / "image_data.json"), "--out", str(tmp_path)]) == 0
    return tmp_path


def test_a_mixed_folder_trains_every_task_it_provides(mixed_folder):
    data = ShapesData(mixed_folder, "train", 32)
    assert [r.image_id for r in data.records] == ["7", "vg:42"]  # the RefCOCO image is the LN image, once
    assert data.records[0].file_name == "images/000000000007.jpg"
    assert dict(data.image_stats) == {"merged": 2}  # both RefCOCO lines, checked against the LN file's size
    assert (data.size("narrative"), data.size("refer"), data.size("region_box")) == (1, 2, 2)
    collate = Collator(data, small_tokenizer(), 32)
    refer = collate("refer", [0, 1], np.random.default_rng(0))
    np.testing.assert_allclose(refer["refer_boxes"][1].numpy(), [40 / 80, 5 / 60, 70 / 80, 55 / 60], atol=1e-6)
    assert not bool(refer["mask_valid"].any())  # no masks converted: the mask loss is off for these
    region = collate("region_box", [0, 1], np.random.default_rng(0))
    tok = small_tokenizer()
    first = region["labels"][0][region["labels"][0] >= 0].tolist()
    assert tok.decode(first, skip_special_tokens=True).strip() == "a green tree"  # the region's own caption
    np.testing.assert_allclose(region["token_boxes"][1, 0].numpy(), [0, 0, 1, 10 / 48], atol=1e-6)
    points = collate("region_points", [0, 1], np.random.default_rng(3))["prompt_points"].numpy()
    # no masks: the points fall inside each region's box
    assert (points[0, :, 0] >= 5 / 64).all() and (points[0, :, 0] <= 25 / 64).all()
    assert (points[0, :, 1] >= 6 / 48).all() and (points[0, :, 1] <= 36 / 48).all()
    assert (points[1, :, 1] <= 10 / 48).all()
    sampler = MultiTaskSampler(data, {"narrative": 1, "refer": 1, "region_box": 1}, batch_size=2, seed=0)
    for step in range(6):
        task, indices, rng = sampler.draw(step)
        assert collate(task, indices, rng)["images"].shape == (min(2, data.size(task)), 3, 32, 32)


def test_converter_reports_a_missing_or_broken_file(tmp_path):
    with pytest.raises(SystemExit, match="no such file"):
        convert.main(["vg", "--regions", str(tmp_path / "nope.json"), "--out", str(tmp_path)])
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(SystemExit, match="is not JSON"):
        convert.main(["mdetr", "--ann", str(tmp_path / "bad.json"), "--out", str(tmp_path)])
    assert not (tmp_path / "train.refer.jsonl").exists()


@pytest.mark.parametrize("flag", ["--ann", "--regions", "--image-data"])
def test_a_folder_given_for_an_input_file_is_one_line(tmp_path, flag):
    """The download's folder given for one of its files (`--ann mdetr_annotations`) was an IsADirectoryError
    traceback (only a missing file was one line)."""
    folder = tmp_path / "mdetr_annotations"
    folder.mkdir()
    (tmp_path / "regions.json").write_text("[]")
    kind = ["mdetr"] if flag == "--ann" else ["vg", "--regions", str(tmp_path / "regions.json")]
    with pytest.raises(SystemExit, match=f"^cannot read {folder}: Is a directory$"):
        convert.main([*kind, flag, str(folder), "--out", str(tmp_path)])
    assert not (tmp_path / "train.refer.jsonl").exists() and not (tmp_path / "train.dense.jsonl").exists()


def test_ids_of_different_image_collections_never_collide(tmp_path):
    """RefCOCO numbers images by COCO id, GoldG's GQA pairs and Visual Genome by VG id: COCO image 9 and VG image 9
    are two pictures. The converter keeps COCO ids bare (LN COCO's ids) and prefixes the others, so each
    expression trains on its own image, with its box normalised by that image's size, and a GQA pair and the VG
    regions of one VG image share it."""
    refcoco = {"images": [{"id": 0, "file_name": "COCO_train2014_000000000009.jpg", "original_id": 9,
                           "dataset_name": "refcoco", "caption": "man on the left", "width": 64, "height": 48}],
               "annotations": [{"image_id": 0, "bbox": [4, 8, 28, 32], "tokens_positive": [[0, 3]]}]}
    goldg = {"images": [{"id": 0, "file_name": "9.jpg", "dataset_name": "gqa", "caption": "a red bus near a tree",
                         "width": 50, "height": 40}],
             "annotations": [{"image_id": 0, "bbox": [5, 5, 20, 10], "tokens_positive": [[0, 9]]}]}
    refs = convert.convert_mdetr(refcoco, "final_refcoco_train")[0] + \
        convert.convert_mdetr(goldg, "final_mixed_train_no_coco")[0]
    assert [r["image_id"] for r in refs] == ["9", "vg:9"]
    assert [r["image_id"] for r in convert.convert_mdetr(GOLDG, "goldg")[0]] == ["flickr:1000"] * 2
    regions = convert.convert_vg([{"id": 9, "regions": [{"phrase": "a bus", "x": 5, "y": 5, "width": 20,
                                                          "height": 10}]}], {"9": (50, 40)}, 50)[0]
    assert regions[0]["image_id"] == "vg:9" and regions[0]["file_name"] == "images/9.jpg"

    (tmp_path / "images").mkdir()
    Image.new("RGB", (64, 48), (0, 0, 0)).save(tmp_path / "images" / "COCO_train2014_000000000009.jpg")
    Image.new("RGB", (50, 40), (255, 255, 255)).save(tmp_path / "images" / "9.jpg")
    (tmp_path / "train.refer.jsonl").write_text("".join(json.dumps(r) + "\n" for r in refs))
    (tmp_path / "train.dense.jsonl").write_text(json.dumps(regions[0]) + "\n")
    data = ShapesData(tmp_path, "train", 32)
    assert sorted((r.image_id, r.file_name, r.width, r.height) for r in data.records) == [
        ("9", "images/COCO_train2014_000000000009.jpg", 64, 48), ("vg:9", "images/9.jpg", 50, 40)]
    batch = Collator(data, small_tokenizer(), 32)("refer", [0, 1], np.random.default_rng(0))
    np.testing.assert_allclose(batch["refer_boxes"].numpy(), [[4 / 64, 8 / 48, 32 / 64, 40 / 48],
                                                             [5 / 50, 5 / 40, 25 / 50, 15 / 40]], atol=1e-6)
    assert batch["images"][0].mean() < 10 and batch["images"][1].mean() > 245  # each on its own picture
    vg = data.records[data.index["vg:9"]]
    assert [o["caption"] for o in vg.objects] == ["a bus"] and data.size("refer_image") == 2


@pytest.mark.parametrize("kind, content, match", [
    ("mdetr", VG_REGIONS, r"is not an MDETR annotation file"),  # the VG file given to mdetr
    ("mdetr", {"images": [{"id": 0, "caption": "a dog"}], "annotations": [{"image_id": 0}]},
     r"is not in the expected format \(KeyError"),
    ("mdetr", {"images": [], "annotations": []}, r"no expressions converted .* left as it was"),
    ("vg", REFCOCO, r"is not Visual Genome's region_descriptions.json"),
    ("vg", [{"id": 1, "regions": [{"phrase": "a tree"}]}], r"is not in the expected format \(KeyError"),
    ("vg", [{"id": 1, "regions": []}], r"no regions converted .* left as it was"),
])
def test_an_input_of_another_shape_is_named_and_leaves_the_data_folder_alone(tmp_path, kind, content, match):
    """An input of another shape used to convert to nothing and replace the folder's good file with an empty one
    (exit 0), or end in a traceback."""
    source = tmp_path / "input.json"
    source.write_text(json.dumps(content))
    good = tmp_path / ("train.refer.jsonl" if kind == "mdetr" else "train.dense.jsonl")
    good.write_text('{"a good": "file"}\n')
    flag = "--ann" if kind == "mdetr" else "--regions"
    with pytest.raises(SystemExit, match=match):
        convert.main([kind, flag, str(source), "--out", str(tmp_path)])
    assert good.read_text() == '{"a good": "file"}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["input.json", good.name])  # no temporary file left


def test_max_regions_below_one_is_refused(tmp_path, capsys):
    (tmp_path / "regions.json").write_text(json.dumps(VG_REGIONS))
    with pytest.raises(SystemExit) as exit_info:
        convert.main(["vg", "--regions", str(tmp_path / "regions.json"), "--out", str(tmp_path), "--max-regions", "-1"])
    assert exit_info.value.code == 2 and "--max-regions must be at least 1" in capsys.readouterr().err
    assert not (tmp_path / "train.dense.jsonl").exists()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 10**400], ids=["nan", "infinity", "huge-int"])
def test_a_nan_infinite_or_huge_box_value_is_skipped_and_counted(bad):
    """json reads NaN, Infinity and integers of any size. A NaN box passed every comparison and was written out as
    `NaN` (a NaN training target); an infinite width was clipped into a whole-image box; a huge integer was an
    OverflowError traceback."""
    pair = {"id": 0, "file_name": "COCO_train2014_000000000007.jpg", "original_id": 7, "caption": "the red car",
            "dataset_name": "refcoco"}
    mdetr = {"images": [{**pair, "width": 80, "height": 60}, {**pair, "id": 1}, {**pair, "id": 2, "caption": "a dog"}],
             "annotations": [{"id": 10, "image_id": 0, "bbox": [1, 1, bad, 20]},  # clipped to the image's size
                             {"id": 11, "image_id": 1, "bbox": [bad, 1, 10, 20]},  # no size: not clipped
                             {"id": 12, "image_id": 2, "bbox": [1, 1, 10, 20]}]}
    refs, counts = convert.convert_mdetr(mdetr, "refcoco")
    assert [(r["expression"], r["box"]) for r in refs] == [("a dog", [1.0, 1.0, 11.0, 21.0])]
    assert counts["skipped_degenerate_box"] == 2
    regions = [{"id": 42, "regions": [{"phrase": "sky", "x": 0, "y": 0, "width": bad, "height": 10},
                                      {"phrase": "tree", "x": bad, "y": 0, "width": 5, "height": 10},
                                      {"phrase": "grass", "x": 0, "y": 30, "width": 64, "height": 10}]}]
    for sizes in ({}, {"42": (64, 48)}):
        records, counts = convert.convert_vg(regions, sizes, max_regions=50)
        assert records[0]["regions"] == [{"box": [0.0, 30.0, 64.0, 40.0], "caption": "grass"}]
        assert counts["skipped_degenerate_box"] == 2

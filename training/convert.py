"""Convert public grounding datasets into the training data folder's files (docs/data_formats.md).

    python -m training.convert mdetr --ann final_refcoco_train.json --out data/ln_coco --split train
    python -m training.convert vg --regions region_descriptions.json [--image-data image_data.json] \
        --out data/ln_coco --split train [--max-regions 50]

`mdetr` reads MDETR's COCO-style annotation files, the usual public form of RefCOCO/RefCOCO+/RefCOCOg
(`final_refcoco_*.json`, ...) and of GoldG (`final_mixed_train_no_coco.json`, `final_flickr_separateGT_*.json`):
`images[]` are (image, text) pairs with `file_name`, `width`, `height`, `caption` and optionally `original_id` and
`dataset_name`; `annotations[]` carry `image_id` (the pair's id), `bbox` [x, y, w, h] and `tokens_positive`
(character spans of the caption). It writes one line per referring expression to `<split>.refer.jsonl`:
- RefCOCO-style pairs (`dataset_name` starting with "refcoco", or pairs without a `dataset_name` that have
  exactly one box): the whole caption is the expression and its box the target;
- GoldG-style pairs: every phrase (the caption text under an annotation's `tokens_positive`) that grounds
  exactly one box is an expression for that box. A phrase grounding several boxes ("two dogs") has no single
  box for the referring head and is skipped, and counted.

`vg` reads Visual Genome's `region_descriptions.json` and writes one line per image to `<split>.dense.jsonl`
(region captions + boxes); `image_data.json` supplies the image sizes (without it they are read from the files).

Image ids: a COCO image keeps its bare COCO id (LN COCO's `image_id`, so RefCOCO expressions and LN narratives of
one image share it); every other image is `<collection>:<id>` (`vg:<VG id>` for Visual Genome and GQA,
`flickr:<id>` for Flickr30k), because the collections number their images independently.

Images are not copied: `file_name` is `images/<name>` under `--out`, so link the image folders there (COCO
train2014 for RefCOCO, Flickr30k / VG for GoldG, VG for the regions). Boxes are clipped to the image when its
size is known; boxes under one pixel wide or high or with a NaN / infinite value, empty phrases and duplicates are
skipped and counted. Masks are not converted (RefCOCO's polygons live in the COCO instances file): referring
trains the box, and the mask loss only where a `mask_file` is given. The converter prints what it wrote and
skipped; it never downloads anything.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pixelllm.files import write_atomically
from training.data.localized_narratives import float_or_inf


def xywh_to_box(bbox: list[float], width: float | None, height: float | None) -> list[float] | None:
    """[x, y, w, h] -> [x0, y0, x1, y1], clipped to the image if its size is given; None when under one pixel
    wide or high, or when a value is NaN or infinite (json reads `NaN`, `Infinity` and integers of any size; a NaN
    box passed every comparison and was written out)."""
    x, y, w, h = (float_or_inf(v) for v in bbox)
    if not all(math.isfinite(v) for v in (x, y, w, h)):
        return None
    x0, y0, x1, y1 = x, y, x + w, y + h
    if width is not None and height is not None:
        x0, x1 = min(max(x0, 0.0), width), min(max(x1, 0.0), width)
        y0, y1 = min(max(y0, 0.0), height), min(max(y1, 0.0), height)
    if x1 - x0 < 1.0 or y1 - y0 < 1.0:
        return None
    return [round(v, 2) for v in (x0, y0, x1, y1)]


def _phrase(caption: str, spans: list[list[int]]) -> str:
    return " ".join(caption[int(a):int(b)].strip() for a, b in sorted(spans)).strip()


def _collection(pair: dict[str, Any], source: str) -> str:
    """The image collection of an MDETR pair: "coco" (RefCOCO(+/g), MDETR's `data_source` "coco"), "vg" (GQA and
    Visual Genome pairs, `data_source` "vg"), "flickr" (Flickr30k Entities), else its `dataset_name` or, without
    one, the annotation file's name."""
    dataset = str(pair.get("dataset_name", "")).lower()
    data_source = str(pair.get("data_source", "")).lower()
    if data_source == "coco" or dataset.startswith("refcoco") or str(pair["file_name"]).startswith("COCO_"):
        return "coco"
    if data_source == "vg" or dataset in ("gqa", "vg"):
        return "vg"
    if dataset.startswith("flickr") or "original_img_id" in pair:
        return "flickr"
    return dataset or source


def _image_id(pair: dict[str, Any], source: str) -> str:
    """A COCO image keeps its bare COCO id, which is LN COCO's image_id, so its expressions join its narratives;
    an image of another collection is `<collection>:<id>` (`vg:2354786`, `flickr:1000`): collections number their
    images independently, and a bare VG id names some other COCO image."""
    stem = Path(str(pair["file_name"])).stem
    collection = _collection(pair, source)
    original = pair.get("original_id", pair.get("original_img_id"))  # MDETR's Flickr files: original_img_id
    if original is not None:
        number = str(original)
    elif collection == "coco" and stem.startswith("COCO_"):
        number = str(int(stem.rsplit("_", 1)[-1]))  # COCO_train2014_000000000009 -> 9
    else:
        number = stem
    return number if collection == "coco" else f"{collection}:{number}"


def convert_mdetr(annotations: dict[str, Any], source: str) -> tuple[list[dict[str, Any]], Counter]:
    """MDETR-style annotation dict -> referring records (see the module docstring) and skip counts."""
    counts: Counter = Counter()
    by_pair: dict[Any, list[dict]] = defaultdict(list)
    for ann in annotations.get("annotations", []):
        by_pair[ann["image_id"]].append(ann)
    records: list[dict[str, Any]] = []
    seen: set[tuple] = set()
    for pair in annotations.get("images", []):
        counts["pairs"] += 1
        caption = str(pair.get("caption", "")).strip()
        width, height = pair.get("width"), pair.get("height")
        anns = by_pair.get(pair["id"], [])
        dataset = str(pair.get("dataset_name", ""))
        whole = dataset.lower().startswith("refcoco") or (not dataset and len(anns) == 1)
        if whole:
            items = [(caption, [a["bbox"] for a in anns])]
        else:
            phrases: dict[str, list] = defaultdict(list)
            for a in anns:
                phrases[_phrase(caption, a.get("tokens_positive") or [])].append(a["bbox"])
            items = list(phrases.items())
        for k, (text, bboxes) in enumerate(items):
            if not text:
                counts["skipped_empty_text"] += 1
                continue
            if len(bboxes) != 1:
                counts["skipped_not_one_box"] += 1
                continue
            box = xywh_to_box(bboxes[0], width, height)
            if box is None:
                counts["skipped_degenerate_box"] += 1
                continue
            image_id = _image_id(pair, source)
            key = (image_id, text, tuple(box))
            if key in seen:
                counts["skipped_duplicate"] += 1
                continue
            seen.add(key)
            record = {"image_id": image_id, "file_name": f"images/{pair['file_name']}",
                      "ref_id": f"{source}_{pair['id']}_{k}", "expression": text, "box": box}
            if width is not None and height is not None:
                record.update(width=int(width), height=int(height))
            records.append(record)
    counts["expressions"] = len(records)
    return records, counts


def convert_vg(regions: list[dict[str, Any]], sizes: dict[str, tuple[int, int]], max_regions: int
               ) -> tuple[list[dict[str, Any]], Counter]:
    """Visual Genome region descriptions -> dense records (one per image) and skip counts."""
    counts: Counter = Counter()
    records = []
    for image in regions:
        vg_id = str(image.get("id", image.get("image_id")))
        image_id = f"vg:{vg_id}"  # VG numbers its images apart from COCO: a bare id would name a COCO image
        width, height = sizes.get(vg_id, (None, None))
        kept, seen = [], set()
        for r in image.get("regions", []):
            phrase = " ".join(str(r.get("phrase", "")).split())
            box = xywh_to_box([r["x"], r["y"], r["width"], r["height"]], width, height)
            if not phrase:
                counts["skipped_empty_text"] += 1
            elif box is None:
                counts["skipped_degenerate_box"] += 1
            elif (phrase.lower(), tuple(box)) in seen:
                counts["skipped_duplicate"] += 1
            elif len(kept) >= max_regions:
                counts["skipped_over_max_regions"] += 1
            else:
                seen.add((phrase.lower(), tuple(box)))
                kept.append({"box": box, "caption": phrase})
        if not kept:
            counts["skipped_images_without_regions"] += 1
            continue
        record = {"image_id": image_id, "file_name": f"images/{vg_id}.jpg", "regions": kept}
        if width is not None:
            record.update(width=int(width), height=int(height))
        records.append(record)
        counts["regions"] += len(kept)
    counts["images"] = len(records)
    return records, counts


def _write_jsonl(path: Path, records: list[dict[str, Any]], what: str) -> None:
    """Replace `path` with the records, whole or not at all; none converted writes nothing (an input of another
    shape converted to nothing, and the data folder's good file was replaced by an empty one)."""
    if not records:
        raise SystemExit(f"no {what} converted (see the counts above); {path} is left as it was")
    try:
        write_atomically(path, "".join(json.dumps(record) + "\n" for record in records))
    except OSError as err:
        raise SystemExit(f"cannot write {path}: {err.strerror or err}") from None


@contextlib.contextmanager
def _read_as_expected(path: str) -> Iterator[None]:
    """Reading a file's JSON in the block: a file of another shape is one line naming it, not a traceback."""
    try:
        yield
    except (KeyError, TypeError, AttributeError, ValueError, OverflowError) as err:  # OverflowError: int(1e400)
        raise SystemExit(f"{path} is not in the expected format ({type(err).__name__}: {err}); "
                         "see `python -m training.convert --help` and docs/data_formats.md") from None


def _load_json(path: str) -> Any:
    try:
        with open(path) as handle:
            return json.load(handle)
    except FileNotFoundError:
        raise SystemExit(f"no such file: {path}") from None
    except OSError as err:  # a folder given for the file (the dataset's download folder), no permission
        raise SystemExit(f"cannot read {path}: {err.strerror or err}") from None
    except json.JSONDecodeError as err:
        raise SystemExit(f"{path} is not JSON ({err})") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.convert", description=__doc__.splitlines()[0],
                                     allow_abbrev=False)
    sub = parser.add_subparsers(dest="kind", required=True)
    m = sub.add_parser("mdetr", help="RefCOCO(+/g) / GoldG in MDETR's annotation format -> <split>.refer.jsonl",
                       allow_abbrev=False)
    m.add_argument("--ann", required=True, action="append", help="annotation JSON (repeat to merge several)")
    v = sub.add_parser("vg", help="Visual Genome region descriptions -> <split>.dense.jsonl", allow_abbrev=False)
    v.add_argument("--regions", required=True, help="region_descriptions.json")
    v.add_argument("--image-data", help="image_data.json (image sizes)")
    v.add_argument("--max-regions", type=int, default=50, help="regions kept per image")
    for p in (m, v):
        p.add_argument("--out", required=True, help="data folder (images/ is expected inside it)")
        p.add_argument("--split", default="train")
    args = parser.parse_args(argv)
    if args.kind == "vg" and args.max_regions < 1:
        parser.error(f"--max-regions must be at least 1, got {args.max_regions}")
    out = Path(args.out)
    if args.kind == "mdetr":
        path = out / f"{args.split}.refer.jsonl"
        everything = []
        for ann in args.ann:
            data = _load_json(ann)
            if not (isinstance(data, dict) and isinstance(data.get("images"), list)
                    and isinstance(data.get("annotations"), list)):
                raise SystemExit(f"{ann} is not an MDETR annotation file (a JSON object with `images` and "
                                 "`annotations` lists)")
            with _read_as_expected(ann):
                records, counts = convert_mdetr(data, Path(ann).stem)
            everything += records
            print(f"{ann}: " + ", ".join(f"{k}={v}" for k, v in sorted(counts.items())))
        _write_jsonl(path, everything, "expressions")
        print(f"wrote {len(everything)} expressions to {path}")
    else:
        sizes = {}
        if args.image_data:
            with _read_as_expected(args.image_data):
                for img in _load_json(args.image_data):
                    sizes[str(img.get("image_id", img.get("id")))] = (int(img["width"]), int(img["height"]))
        data = _load_json(args.regions)
        if not isinstance(data, list):
            raise SystemExit(f"{args.regions} is not Visual Genome's region_descriptions.json (a JSON list of images "
                             "with `regions`)")
        with _read_as_expected(args.regions):
            records, counts = convert_vg(data, sizes, args.max_regions)
        path = out / f"{args.split}.dense.jsonl"
        print(f"{args.regions}: " + ", ".join(f"{k}={v}" for k, v in sorted(counts.items())))
        _write_jsonl(path, records, "regions")
        print(f"wrote {len(records)} images ({counts['regions']} regions) to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

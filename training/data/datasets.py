"""Training datasets over a data folder (Shapes, LN, converted RefCOCO/GoldG/VG) and the collate functions (the
multi-task sampler is `training.data.sampling`).

Tasks (each batch holds one task; every batch also carries all object boxes for the proposal head):
- `narrative`      full-image narrative (all sentences) under the global box, per-token trace boxes from LN;
- `sentence`       one LN sentence as a separate target (Scenic's LN practice), global box;
- `prefix`         PrefixLM: a random prefix of the narrative as the text prompt, the rest as target;
- `region_box`     location-conditioned caption ("large red circle", or a dense region's own caption) prompted by
                   the object's (jittered) box;
- `region_points`  the same prompted by 1-3 positive points inside the object's mask (inside its box if none);
- `region_image`   `region_box` with an *image* as the item: (up to `region_per_image` of) its objects, each a row
                   with its own box prompt, share one encoding of the image (`image_index`); a row costs about
                   two thirds of a `region_box` row on the tiny preset (docs/referring.md §8);
- `refer`          referring expression -> box at EOS + SAM mask, global box prompt;
- `refer_image`    the same, but an item is an *image* with (up to `refer_per_image` of) its expressions: the
                   image and its prompt are encoded once for all of them (`image_index` in the batch), so a step
                   costs less per expression and every batch holds expressions that differ on one input — the box
                   has to come from the words, not from the image alone (docs/referring.md §7).
Captions are tokenised word by word (Metaspace tokenisers split at word starts, so this equals tokenising the
whole text) so that every token inherits its word's target, as DESIGN §1 requires. Every LN record trains: an image
with several narratives (LN COCO has up to five) gives one `narrative` / `prefix` item per narrative and one
`sentence` item per sentence of each.
"""

from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pixelllm.image import to_model_input
from pixelllm.tokenizer import encode_text
from training.data.localized_narratives import LNReadStats, LNSample, read_localized_narratives
from training.data.shapes import load_image, load_instance_map, unfinished_split
from training.data.shapes import load_jsonl as read_jsonl

TASKS = ("narrative", "sentence", "prefix", "region_box", "region_points", "region_image", "refer", "refer_image")


@dataclass
class Narrative:
    """One LN record of an image: its words, their targets and its sentences (`(start, end)` word spans)."""

    words: list[str]
    word_boxes: np.ndarray  # n x 4 normalised, clipped to [0, 1]
    sentences: list[tuple[int, int]]


@dataclass
class ImageRecord:
    image_id: str
    width: int
    height: int
    pixels: torch.Tensor | None  # 3xSxS uint8, model input size (None when the dataset loads lazily)
    instance_map: np.ndarray | None  # HxW uint8 at the original size, 0 = background, k = object id k
    objects: list[dict]
    file_name: str = ""
    mask_file: str | None = None
    narratives: list[Narrative] = field(default_factory=list)  # every LN record of the image, in file order


class ShapesData:
    """One split of a data folder, held in memory at model size.

    A Shapes folder (written by `python -m training.shapes`) has `<split>.objects.jsonl` with instance maps, so
    every task is available. A Localized Narratives folder (`<split>.ln.jsonl` + `images/`, e.g. LN COCO) gives
    the caption/trace tasks; `<split>.refer.jsonl` adds referring (masks when a `mask_file` instance map is
    given) and `<split>.dense.jsonl` region captions (`python -m training.convert` writes both from RefCOCO /
    GoldG / Visual Genome). Every image of the split is taken once: the files name an image by its `image_id`, so
    the same id in several files is one image (e.g. a COCO image in LN COCO and in RefCOCO), and an id whose files
    give two different image sizes is an error. See docs/data_formats.md.
    """

    def __init__(self, root: str | Path, split: str, image_size: int, limit: int | None = None,
                 lazy: bool = False) -> None:
        """lazy=False decodes every image once into memory at model size (Shapes scale); lazy=True reads image
        files when a batch needs them (real datasets at 1024 px do not fit in memory)."""
        self.root = Path(root)
        problem = unfinished_split(self.root, split)
        if problem:  # the narratives of an earlier run beside the new run's images were taken as a split
            raise ValueError(problem)
        self.split = split
        self.image_size = image_size
        self.lazy = lazy
        self._file_sizes: dict[str, tuple[int, int]] = {}
        # lines naming a known image_id under another file: `merged` (same size), `unchecked` (no size, no file)
        self.image_stats: Counter = Counter()
        ln_file = self.root / f"{split}.ln.jsonl"
        samples, self.ln_stats = read_localized_narratives(ln_file) if ln_file.is_file() \
            else ([], LNReadStats())
        ln_ids = [ln_image_id(s) for s in samples]
        refer_file = self.root / f"{split}.refer.jsonl"
        refer = read_jsonl(refer_file, "refer") if refer_file.is_file() else []
        self.records: list[ImageRecord] = []
        self.index: dict[str, int] = {}
        for entry in self._image_entries(split, ln_ids, refer)[:limit]:
            rec = ImageRecord(image_id=entry["image_id"], width=0, height=0, pixels=None, instance_map=None,
                              objects=entry.get("objects", []), file_name=entry["file_name"],
                              mask_file=entry.get("mask_file"))
            self._check_files(rec, entry)
            self.index[rec.image_id] = len(self.records)
            self.records.append(rec)
        if not self.records:
            raise FileNotFoundError(f"no {split}.objects/ln/dense/refer.jsonl with images under {self.root}")
        if self.image_stats["unchecked"]:
            warnings.warn(f"{split}: {self.image_stats['unchecked']} lines name a known image_id under a missing "
                          "file without width/height; they were taken as that image, unchecked", stacklevel=2)
        for image_id, sample in zip(ln_ids, samples):  # every narrative of an image trains (LN COCO: up to 5)
            if image_id in self.index:
                self.records[self.index[image_id]].narratives.append(Narrative(
                    sample.words, np.clip(sample.word_boxes, 0.0, 1.0).astype(np.float32), list(sample.sentences)))
        self.refer = [r for r in refer if r["image_id"] in self.index]
        self.refer_by_image: dict[int, list[int]] = {}
        for k, r in enumerate(self.refer):
            self.refer_by_image.setdefault(self.index[r["image_id"]], []).append(k)
        self.refer_images = sorted(self.refer_by_image)
        self.regions = [(i, obj) for i, rec in enumerate(self.records) for obj in rec.objects]
        self.regions_by_image: dict[int, list[int]] = {}
        for k, (i, _) in enumerate(self.regions):
            self.regions_by_image.setdefault(i, []).append(k)
        self.region_images = sorted(self.regions_by_image)
        # items: (image index, narrative) and (image index, narrative, (start, end) word span of a sentence)
        self.narratives = [(i, n) for i, rec in enumerate(self.records) for n in rec.narratives if n.words]
        self.sentence_items = [(i, n, span) for i, n in self.narratives for span in n.sentences]

    def _check_files(self, rec: ImageRecord, entry: dict) -> None:
        """Set the record's size and (unless lazy) load its image and instance map; a missing or unreadable file
        is a ValueError naming it (was a FileNotFoundError / PIL traceback; when lazy, in the middle of training)."""
        names = [rec.file_name] + ([rec.mask_file] if rec.mask_file else [])
        try:
            missing = next((name for name in names if not (self.root / name).is_file()), None)
            if missing:
                raise FileNotFoundError(f"no such file: {self.root / missing}")
            rec.width, rec.height = self._size(entry)
            if not self.lazy:
                rec.pixels = self.pixels(rec)
                rec.instance_map = self.instance_map(rec) if rec.mask_file else None
        except (OSError, Image.DecompressionBombError) as err:  # PIL's UnidentifiedImageError is an OSError
            raise ValueError(f"{self.split}: image {rec.image_id!r} ({rec.file_name}): {err}") from None

    def pixels(self, rec: ImageRecord) -> torch.Tensor:
        """3xSxS uint8 model input of a record (cached in memory unless lazy)."""
        if rec.pixels is not None:
            return rec.pixels
        img = load_image(self.root, rec.file_name)
        return to_model_input(img, self.image_size).round().to(torch.uint8)

    def instance_map(self, rec: ImageRecord) -> np.ndarray:
        """HxW object-id map of a record that has a `mask_file` (cached in memory unless lazy)."""
        return rec.instance_map if rec.instance_map is not None else load_instance_map(self.root, rec.mask_file)

    def _image_entries(self, split: str, ln_ids: list[str], refer: list[dict]) -> list[dict]:
        """Every image of the split, once: Shapes ground truth (`objects.jsonl`) first, then LN images, then
        images that only have dense regions (e.g. Visual Genome) or only referring expressions (e.g. RefCOCO).
        A later line naming a known image_id is the same image (`_same_image` checks it). Dense regions become the
        objects of every image without Shapes ground truth, LN images included."""
        entries: dict[str, dict] = {}
        objects_file = self.root / f"{split}.objects.jsonl"
        for entry in read_jsonl(objects_file, "objects") if objects_file.is_file() else []:
            self._claim(entries, entry, entry)
        ground_truth = set(entries)
        for image_id in ln_ids:
            if image_id not in entries:
                entries[image_id] = self._ln_entry(image_id)
        dense_file = self.root / f"{split}.dense.jsonl"
        for entry in read_jsonl(dense_file, "dense") if dense_file.is_file() else []:
            image = self._claim(entries, entry)
            if entry["image_id"] not in ground_truth:
                objects = image.setdefault("objects", [])
                objects += [{"object_id": len(objects) + k, "box": r["box"], "caption": r["caption"]}
                            for k, r in enumerate(entry.get("regions", []), start=1)]
        for r in refer:
            self._claim(entries, r)
        return list(entries.values())

    def _claim(self, entries: dict[str, dict], line: dict, new: dict | None = None) -> dict:
        """The image entry a file line names: a new entry (`new`, or the line's image keys) for a new image_id,
        else the known entry, after checking that the line describes the same image."""
        image_id = line["image_id"]
        if image_id in entries:
            self._same_image(entries[image_id], line)
        else:
            entries[image_id] = new if new is not None else \
                {k: line[k] for k in ("image_id", "file_name", "width", "height") if k in line}
        return entries[image_id]

    def _same_image(self, known: dict, line: dict) -> None:
        """Raise when a line names a known image_id but gives another image size (its own width/height, or its
        file's size when it names another file): two pictures under one id would train one's targets on the
        other. Same-sized files under one id cannot be told apart here and are taken as the same image."""
        other_file = line.get("file_name", known["file_name"]) != known["file_name"]
        if not other_file and not ("width" in line and "height" in line):
            return
        size = self._size(line, required=False) if other_file else self._size(line)
        if size is None:
            self.image_stats["unchecked"] += 1
        elif size != self._size(known):
            width, height = self._size(known)
            raise ValueError(
                f"{self.split}: image_id {line['image_id']!r} names two different images: {known['file_name']} "
                f"({width}x{height}) and {line.get('file_name', known['file_name'])} ({size[0]}x{size[1]}). Give "
                "each image its own id (`python -m training.convert` prefixes non-COCO ids, e.g. 'vg:9').")
        elif other_file:
            self.image_stats["merged"] += 1

    def _size(self, entry: dict, required: bool = True) -> tuple[int, int] | None:
        """(width, height) of an image entry or file line: its own fields, else its file's header (None when the
        file is missing and not `required`)."""
        if "width" in entry and "height" in entry:
            return int(entry["width"]), int(entry["height"])
        name = entry["file_name"]
        if name not in self._file_sizes:
            if not required and not (self.root / name).is_file():
                return None
            with Image.open(self.root / name) as probe:
                self._file_sizes[name] = probe.size
        return self._file_sizes[name]

    def _ln_entry(self, image_id: str) -> dict:
        # another collection's image (`flickr:36979`) is its bare id's file; LN COCO's ids are COCO ids without the
        # zero padding of COCO 2017's file names, tried first (a Flickr30k 36979.jpg may sit beside COCO's)
        collection, _, bare = image_id.partition(":")
        if bare and collection in {prefix for _, prefix in _LN_COLLECTIONS}:
            names = [bare]
        else:
            names = ([f"{int(image_id):012d}"] if image_id.isdigit() else []) + [image_id]
        for name in names:
            for ext in (".jpg", ".jpeg", ".png"):
                if (self.root / "images" / f"{name}{ext}").is_file():
                    return {"image_id": image_id, "file_name": f"images/{name}{ext}"}
        raise FileNotFoundError(f"no image for LN record {image_id!r} under {self.root / 'images'}")

    def size(self, task: str) -> int:
        return {"narrative": len(self.narratives), "prefix": len(self.narratives),
                "sentence": len(self.sentence_items), "region_box": len(self.regions),
                "region_points": len(self.regions), "region_image": len(self.region_images),
                "refer": len(self.refer),
                "refer_image": len(self.refer_images)}[task]


# LN numbers the images of each collection apart: a Flickr30k, ADE20k or Open Images record gets the prefix that
# `training.convert` gives every collection but COCO, whose bare ids LN COCO and RefCOCO share (`flickr:36979`)
_LN_COLLECTIONS = (("flickr", "flickr"), ("ade20k", "ade20k"), ("open_images", "openimages"),
                   ("openimages", "openimages"))


def ln_image_id(sample: LNSample) -> str:
    """The image id an LN record trains under: its `image_id`, prefixed by its collection unless COCO (or any
    dataset_id this repo writes, such as the Shapes world's and the corrections export's)."""
    name = sample.dataset_id.lower()
    prefix = next((prefix for key, prefix in _LN_COLLECTIONS if key in name), None)
    return f"{prefix}:{sample.image_id}" if prefix else sample.image_id


def _norm_box(box: list[float], rec: ImageRecord) -> np.ndarray:
    return np.array(box, dtype=np.float32) / np.array([rec.width, rec.height, rec.width, rec.height], np.float32)


def _rows_of_images(images: list[int], rows_by_image: dict[int, list[int]], cap: int, rng: np.random.Generator
                    ) -> tuple[list[int], list[int]]:
    """The rows of a grouped batch: for each image (its position b in the batch), its row items, `cap` of them
    drawn at random (kept in order) when it has more. Returns (row items, the batch position of each row)."""
    rows: list[int] = []
    rows_image: list[int] = []
    for b, image in enumerate(images):
        own = rows_by_image[image]
        if len(own) > cap:
            own = sorted(rng.choice(own, cap, replace=False).tolist())
        rows += own
        rows_image += [b] * len(own)
    return rows, rows_image


class Collator:
    """Builds model batches (see `PixelLLM.forward`) for one task from item indices."""

    def __init__(self, data: ShapesData, tokenizer, image_size: int, max_tokens: int = 96,
                 box_jitter: float = 0.05, refer_per_image: int = 8, region_per_image: int = 8) -> None:
        self.data = data
        self.refer_per_image = refer_per_image
        self.region_per_image = region_per_image
        self.tokenizer = tokenizer
        self.image_size = image_size
        self.max_tokens = max_tokens
        self.box_jitter = box_jitter

    def _word_tokens(self, words: list[str], boxes: np.ndarray | None) -> tuple[list[int], np.ndarray]:
        ids: list[int] = []
        tok_boxes: list[np.ndarray] = []
        for w, word in enumerate(words):
            pieces = encode_text(self.tokenizer, word, eos=False)
            ids += pieces
            box = boxes[w] if boxes is not None else np.zeros(4, np.float32)
            tok_boxes += [box] * len(pieces)
        return ids, np.array(tok_boxes, np.float32).reshape(-1, 4)

    def _common(self, recs: list[ImageRecord]) -> dict:
        max_obj = max(1, max(len(r.objects) for r in recs))
        gt = torch.zeros(len(recs), max_obj, 4)
        valid = torch.zeros(len(recs), max_obj, dtype=torch.bool)
        for i, rec in enumerate(recs):
            for j, obj in enumerate(rec.objects):
                gt[i, j] = torch.from_numpy(_norm_box(obj["box"], rec))
                valid[i, j] = True
        images = torch.stack([self.data.pixels(r) for r in recs]).float()
        return {"images": images, "gt_boxes": gt, "gt_valid": valid}

    def _pad_targets(self, seqs: list[tuple[list[int], np.ndarray, bool]]) -> dict:
        """seqs: (token ids without EOS, per-token boxes, boxes supervised?) -> labels/token_boxes/mask.

        A target fits when its tokens and EOS fit in `max_tokens`. A longer caption (boxes supervised) is cut to
        its first `max_tokens` tokens and gets no EOS: the text goes on, so the model must not learn to stop there;
        the kept tokens keep their losses. A longer referring expression (no token boxes) keeps `max_tokens - 1`
        tokens and its EOS, where the referring box is read."""
        eos = self.tokenizer.eos_token_id
        length = min(self.max_tokens, max(len(ids) for ids, _, _ in seqs) + 1)
        labels = torch.full((len(seqs), length), -100, dtype=torch.long)
        boxes = torch.zeros(len(seqs), length, 4)
        mask = torch.zeros(len(seqs), length, dtype=torch.bool)
        for i, (ids, tb, supervised) in enumerate(seqs):
            cut = len(ids) >= length and supervised
            ids = ids[:length] if cut else ids[: length - 1]
            n = len(ids)
            labels[i, :n] = torch.tensor(ids, dtype=torch.long)
            if not cut:
                labels[i, n] = eos
            if supervised and n:
                boxes[i, :n] = torch.from_numpy(tb[:n])
                mask[i, :n] = True
        return {"labels": labels, "token_boxes": boxes, "token_box_mask": mask}

    def _pad_prompts(self, prompts: list[list[int]]) -> dict:
        width = max(1, max(len(p) for p in prompts))
        ids = torch.zeros(len(prompts), width, dtype=torch.long)
        mask = torch.zeros(len(prompts), width, dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, : len(p)] = torch.tensor(p, dtype=torch.long)
            mask[i, : len(p)] = 1
        return {"prompt_ids": ids, "prompt_mask": mask}

    def __call__(self, task: str, indices: list[int], rng: np.random.Generator) -> dict:
        return getattr(self, f"_{task}")(indices, rng)

    def _narrative(self, indices, rng) -> dict:
        items = [self.data.narratives[i] for i in indices]
        batch = self._common([self.data.records[i] for i, _ in items])
        batch.update(self._pad_targets([(*self._word_tokens(n.words, n.word_boxes), True) for _, n in items]))
        return batch

    def _sentence(self, indices, rng) -> dict:
        items = [self.data.sentence_items[i] for i in indices]
        seqs = [(*self._word_tokens(n.words[start:end], n.word_boxes[start:end]), True)
                for _, n, (start, end) in items]
        batch = self._common([self.data.records[i] for i, _, _ in items])
        batch.update(self._pad_targets(seqs))
        return batch

    def _prefix(self, indices, rng) -> dict:
        items = [self.data.narratives[i] for i in indices]
        recs = [self.data.records[i] for i, _ in items]
        seqs, prompts = [], []
        for _, n in items:
            cut = int(rng.integers(1, max(2, len(n.words))))
            prompts.append(self._word_tokens(n.words[:cut], None)[0])
            seqs.append((*self._word_tokens(n.words[cut:], n.word_boxes[cut:]), True))
        batch = self._common(recs)
        batch.update(self._pad_targets(seqs))
        batch.update(self._pad_prompts(prompts))
        return batch

    def _region_items(self, indices):
        items = [self.data.regions[i] for i in indices]
        return [self.data.records[i] for i, _ in items], [obj for _, obj in items]

    def _region_targets(self, recs, objs) -> dict:
        seqs = []
        for rec, obj in zip(recs, objs):
            words = (obj["caption"] if "caption" in obj else f"{obj['size']} {obj['color']} {obj['shape']}").split()
            seqs.append((*self._word_tokens(words, np.repeat(_norm_box(obj["box"], rec)[None], len(words), 0)), True))
        return self._pad_targets(seqs)

    def _jittered_box(self, rec: ImageRecord, obj: dict, rng: np.random.Generator) -> list[float]:
        """The object's normalised box, each side moved by N(0, box_jitter) of the box's width/height."""
        box = _norm_box(obj["box"], rec)
        wh = np.array([box[2] - box[0], box[3] - box[1]] * 2, np.float32)
        box = box + rng.normal(0, self.box_jitter, 4).astype(np.float32) * wh
        x0, x1 = sorted(np.clip(box[[0, 2]], 0, 1))
        y0, y1 = sorted(np.clip(box[[1, 3]], 0, 1))
        return [x0, y0, max(x1, x0 + 1e-3), max(y1, y0 + 1e-3)]

    def _region_box(self, indices, rng) -> dict:
        recs, objs = self._region_items(indices)
        batch = self._common(recs)
        batch["prompt_boxes"] = torch.tensor([self._jittered_box(r, o, rng) for r, o in zip(recs, objs)],
                                             dtype=torch.float32)
        batch.update(self._region_targets(recs, objs))
        return batch

    def _region_image(self, indices, rng) -> dict:
        """Items are images (`data.region_images`); each brings up to `region_per_image` of its objects (drawn at
        random when it has more), a row each with its own jittered box prompt; `image_index` maps rows to images."""
        images = [self.data.region_images[i] for i in indices]
        rows, rows_image = _rows_of_images(images, self.data.regions_by_image, self.region_per_image, rng)
        objs = [self.data.regions[k][1] for k in rows]
        recs = [self.data.records[i] for i in images]
        row_recs = [recs[b] for b in rows_image]
        batch = self._common(recs)
        batch["prompt_boxes"] = torch.tensor([self._jittered_box(r, o, rng) for r, o in zip(row_recs, objs)],
                                             dtype=torch.float32)
        batch.update(self._region_targets(row_recs, objs))
        batch["image_index"] = torch.tensor(rows_image, dtype=torch.long)
        return batch

    def _region_points(self, indices, rng) -> dict:
        recs, objs = self._region_items(indices)
        count = int(rng.integers(1, 4))
        points = np.zeros((len(recs), count, 2), np.float32)
        for i, (rec, obj) in enumerate(zip(recs, objs)):
            ys, xs = np.nonzero(self.data.instance_map(rec) == obj["object_id"]) if rec.mask_file else ((), ())
            if len(xs):
                pick = rng.integers(0, len(xs), count)
                points[i, :, 0] = (xs[pick] + 0.5) / rec.width
                points[i, :, 1] = (ys[pick] + 0.5) / rec.height
            else:  # a region without a mask (Visual Genome): points inside its box
                x0, y0, x1, y1 = _norm_box(obj["box"], rec)
                points[i, :, 0] = rng.uniform(x0, x1, count)
                points[i, :, 1] = rng.uniform(y0, y1, count)
        batch = self._common(recs)
        batch["prompt_points"] = torch.from_numpy(points)
        batch["point_labels"] = torch.ones(len(recs), count, dtype=torch.long)
        batch.update(self._region_targets(recs, objs))
        return batch

    def _refer(self, indices, rng) -> dict:
        refs = [self.data.refer[i] for i in indices]
        recs = [self.data.records[self.data.index[r["image_id"]]] for r in refs]
        batch = self._common(recs)
        batch.update(self._refer_targets(refs, recs))
        return batch

    def _refer_image(self, indices, rng) -> dict:
        """Items are images (`data.refer_images`); each brings up to `refer_per_image` of its expressions, drawn
        at random when it has more. `image_index` maps each expression row to its image in `images`."""
        images = [self.data.refer_images[i] for i in indices]
        rows, rows_image = _rows_of_images(images, self.data.refer_by_image, self.refer_per_image, rng)
        refs = [self.data.refer[k] for k in rows]
        recs = [self.data.records[i] for i in images]
        batch = self._common(recs)
        batch.update(self._refer_targets(refs, [recs[b] for b in rows_image]))
        batch["image_index"] = torch.tensor(rows_image, dtype=torch.long)
        return batch

    def _refer_targets(self, refs: list[dict], recs: list[ImageRecord]) -> dict:
        """Labels, EOS boxes and masks of referring expressions (one row per expression; recs[i] its image)."""
        seqs = [(encode_text(self.tokenizer, r["expression"], eos=False), np.zeros((0, 4), np.float32), False)
                for r in refs]
        batch = self._pad_targets(seqs)
        batch["refer_boxes"] = torch.tensor(np.stack([_norm_box(r["box"], rec) for r, rec in zip(refs, recs)]))
        batch["refer_valid"] = torch.ones(len(refs), dtype=torch.bool)
        masks, valid = [], [bool(r.get("mask_file") and rec.mask_file) for r, rec in zip(refs, recs)]
        maps: dict[str, np.ndarray] = {}  # one read per image: `refer_image` rows share it (lazy data reads files)
        for r, rec, has_mask in zip(refs, recs, valid):
            if not has_mask:  # no mask (e.g. RefCOCO through MDETR's files): the mask loss skips this row
                masks.append(torch.zeros(self.image_size, self.image_size))
                continue
            if rec.image_id not in maps:
                maps[rec.image_id] = self.data.instance_map(rec)
            m = (maps[rec.image_id] == r.get("object_id", -1)).astype(np.uint8)
            m = Image.fromarray(m * 255).resize((self.image_size, self.image_size), Image.Resampling.BILINEAR)
            masks.append(torch.from_numpy((np.asarray(m) >= 128).astype(np.float32)))
        batch["masks"] = torch.stack(masks)
        batch["mask_valid"] = torch.tensor(valid)
        return batch

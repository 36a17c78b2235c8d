"""Writing and reading splits, and the command line (``python -m training.shapes``)."""

from __future__ import annotations

import argparse
import json
import math
import re
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from training.data.localized_narratives import float_or_inf, is_text
from pixelllm.files import exclusive_lock
from training.data.shapes.scenes import check_options, generate_scene
from training.data.shapes.world import _PNG_LEVEL, ALL_SHAPES, COLORS, SIZES, WORLDS

# --------------------------------------------------------------------------------------------------
# Writing and reading splits
# --------------------------------------------------------------------------------------------------


@dataclass
class SplitSummary:
    """What :func:`generate_split` wrote."""

    split: str
    images: int
    objects: int
    expressions: int
    seconds: float

    def line(self) -> str:
        """The one-line summary printed by the CLI."""
        return (f"shapes split={self.split}: {self.images} images, {self.objects} objects, "
                f"{self.expressions} referring expressions in {self.seconds:.1f} s")


def _jsonl_line(record: dict[str, Any]) -> str:
    """``record`` as one JSON line (key order preserved)."""
    return json.dumps(record, ensure_ascii=False) + "\n"


def generate_split(
    out_dir: str | Path, split: str, num: int, seed: int, *, size: int = 256, world: str = "standard",
    holdout_only: bool = False,
) -> SplitSummary:
    """Write images 0..num-1 of a split into ``out_dir`` (see ``docs/data_formats.md``).

    Creates ``images/``, ``masks/``, ``<split>.{ln,refer,dense,objects}.jsonl`` (overwriting them) and the empty
    lock file ``.<split>.lock`` (kept: see :func:`_only_writer`); several splits may share ``out_dir``. The
    split's JSONL files are removed first (its images are about to be overwritten: an earlier run's narratives
    would describe other pictures), written as ``*.partial`` and renamed at the end, ``objects`` last: a split
    whose ``objects`` file exists is complete (what `training.train` checks), and one with a ``.partial`` file
    was cut short (:func:`unfinished_split`, what the readers check).
    One generator of a split at a time: a second one, while the first runs, is refused.

    Raises:
        ValueError: on invalid options, or while another process writes the same split into ``out_dir``.
    """
    check_options(split, size, world)
    if num < 1 or seed < 0:
        raise ValueError(f"num must be >= 1 and seed >= 0, got num={num}, seed={seed}")
    began = time.perf_counter()
    root = Path(out_dir)
    for folder in ("images", "masks"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    objects = expressions = 0
    kinds = ("ln", "refer", "dense", "objects")  # objects last: its file marks a complete split
    final = {kind: root / f"{split}.{kind}.jsonl" for kind in kinds}
    partial = {kind: path.with_name(path.name + ".partial") for kind, path in final.items()}
    with ExitStack() as stack:
        stack.enter_context(_only_writer(root, split))
        for kind in ("objects", "ln", "refer", "dense"):  # objects first: a kill from here on leaves no split that
            final[kind].unlink(missing_ok=True)            # looks complete, nor an old one beside new images
        files = {kind: stack.enter_context(open(partial[kind], "w", encoding="utf-8")) for kind in kinds}
        for index in range(num):
            scene = generate_scene(seed, index, split=split, size=size, world=world, holdout_only=holdout_only)
            Image.fromarray(scene.image).save(root / scene.file_name, format="PNG", compress_level=_PNG_LEVEL)
            Image.fromarray(scene.instance_map).save(root / scene.mask_file, format="PNG", compress_level=_PNG_LEVEL)
            files["ln"].write(_jsonl_line(scene.ln))
            files["refer"].writelines(_jsonl_line(r) for r in scene.refer)
            files["dense"].write(_jsonl_line(scene.dense))
            files["objects"].write(_jsonl_line(scene.objects_record))
            objects += len(scene.objects)
            expressions += len(scene.refer)
        for handle in files.values():
            handle.close()
        for kind in kinds:
            partial[kind].replace(final[kind])
    return SplitSummary(split, num, objects, expressions, time.perf_counter() - began)


def _box_problem(box: Any) -> str | None:
    """Why ``box`` is not ``[x0, y0, x1, y1]`` of finite numbers with x0 <= x1 and y0 <= y1 (None: it is)."""
    if not isinstance(box, list) or len(box) != 4 \
            or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in box):
        return f"box must be [x0, y0, x1, y1] (4 numbers, pixels), got {box!r}"[:200]
    values = [float_or_inf(v) for v in box]
    if not all(math.isfinite(v) for v in values):
        return f"box has a NaN or infinite value: {box!r}"[:200]
    if values[2] < values[0] or values[3] < values[1]:
        return f"box {box!r} has x1 < x0 or y1 < y0 (boxes are [x0, y0, x1, y1], not [x, y, w, h])"
    return None


def record_problem(kind: str, record: Any) -> str | None:
    """Why a line of a ``<split>.<kind>.jsonl`` file cannot be used for training or evaluation (None: it can): not
    an object, a missing or mistyped field the readers use (`image_id`, `file_name`, positive `width`/`height`,
    `expression`, `caption`, `regions`, `objects`), or a box that is not 4 finite ordered numbers. A NaN box
    became a NaN training loss; a missing key or a null box a traceback in the middle of training."""
    if not isinstance(record, dict):
        return f"a record must be a JSON object, got {type(record).__name__}"
    if kind == "ln":
        return None  # the LN reader checks its own records (and skips and counts bad ones)
    if not isinstance(record.get("image_id"), (str, int)) or isinstance(record.get("image_id"), bool):
        return f"image_id must be a string or an integer, got {record.get('image_id')!r}"
    if not isinstance(record.get("file_name"), str):
        return f"file_name must be a string, got {record.get('file_name')!r}"
    for key in ("width", "height"):
        value = record.get(key, 1)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 1 <= value < math.inf:
            return f"{key} must be a number of pixels >= 1, got {value!r}"
    if kind == "refer":
        if not is_text(record.get("expression")):
            return f"expression must be a string of valid Unicode, got {record.get('expression')!r}"
        return _box_problem(record.get("box"))
    field = {"dense": "regions", "objects": "objects"}.get(kind)
    items = record.get(field, []) if field else []
    if not isinstance(items, list):
        return f"{field} must be a list, got {type(items).__name__}"
    for k, item in enumerate(items):
        where = f"{field}[{k}]"
        if not isinstance(item, dict):
            return f"{where} must be an object"
        if kind == "dense" and not is_text(item.get("caption")):
            return f"{where}.caption must be a string of valid Unicode, got {item.get('caption')!r}"
        problem = _box_problem(item.get("box"))
        if problem:
            return f"{where}: {problem}"
    return None


@contextmanager
def _only_writer(root: Path, split: str) -> Iterator[None]:
    """Hold ``root/.<split>.lock`` for the block: two generators of one split at once wrote into the same
    ``.partial`` files and images (the second truncating the first's), and the split renamed into place was a mix
    of both runs that looked complete.

    The empty lock file stays afterwards, on purpose: removing a flock'ed file is racy. A generator that opened it
    just before it was removed locks the removed file while a third one creates a new file and locks that, and both
    write the split at once (safe only if every generator, older versions included, checked after locking that the
    name still leads to the file it locked). Kept, it harms nothing: no reader lists the data folder (each opens a
    split's files by name), and the name is hidden and ends in ``.lock``, not ``.jsonl``."""
    try:
        with exclusive_lock(root / f".{split}.lock", wait=False):
            yield
    except BlockingIOError:
        raise ValueError(f"another process is writing split {split!r} in {root} right now (python -m "
                         "training.shapes, or a training.train run generating its data); let it finish, then run "
                         "the command again") from None


def unfinished_split(root: str | Path, split: str) -> str | None:
    """Why ``<split>`` in ``root`` must not be read, or None: a generator writing it is running or was killed
    part-way (its ``.partial`` files are there; the images may be half the new run's)."""
    left = [name for name in (f"{split}.{kind}.jsonl.partial" for kind in ("ln", "refer", "dense", "objects"))
            if (Path(root) / name).is_file()]
    if not left:
        return None
    return (f"split {split!r} in {root} was cut short while it was generated ({', '.join(left)} are left; the "
            "generator was killed, or is still running): run the same python -m training.shapes command again, "
            "or the training run whose data.generate lists it (it regenerates the split whole)")


def load_jsonl(path: str | Path, kind: str | None = None) -> list[dict[str, Any]]:
    """All records of a JSONL file (blank lines and a UTF-8 byte order mark ignored). A line that is not JSON is a
    ValueError naming the file and its line number (json's own message counts lines within the line: "line 1
    column 3"); with ``kind`` ("ln", "refer", "dense", "objects"), so is a record :func:`record_problem` refuses."""
    records = []
    with open(path, encoding="utf-8-sig") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}, line {number}: not JSON ({err.msg}, column {err.colno})") from None
            except RecursionError:
                raise ValueError(f"{path}, line {number}: not JSON (nested too deeply)") from None
            problem = record_problem(kind, record) if kind else None
            if problem:
                raise ValueError(f"{path}, line {number}: {problem}")
            records.append(record)
    return records


@dataclass
class ShapesSplit:
    """The parsed JSONL records of one split (plain dicts, formats in ``docs/data_formats.md``)."""

    root: Path
    split: str
    ln: list[dict[str, Any]]
    refer: list[dict[str, Any]]
    dense: list[dict[str, Any]]
    objects: list[dict[str, Any]]


def load_split(root: str | Path, split: str) -> ShapesSplit:
    """Read ``<split>.{ln,refer,dense,objects}.jsonl`` from ``root``.

    Raises:
        ValueError: if one of the files is missing, or the split was cut short while it was generated.
    """
    root = Path(root)
    problem = unfinished_split(root, split)
    if problem:
        raise ValueError(problem)
    records = {}
    for kind in ("ln", "refer", "dense", "objects"):
        path = root / f"{split}.{kind}.jsonl"
        if not path.is_file():
            raise ValueError(f"no Shapes split {split!r} in {root}: {path.name} is missing")
        records[kind] = load_jsonl(path, kind)
    return ShapesSplit(root=root, split=split, **records)


def load_instance_map(root: str | Path, mask_file: str) -> np.ndarray:
    """The (H, W) uint8 instance map ``root/mask_file``: 0 = background, k = object_id k.

    Raises:
        ValueError: if the file is not an 8-bit single-channel ('L') PNG.
    """
    with Image.open(Path(root) / mask_file) as mask:
        if mask.mode != "L":
            raise ValueError(f"{mask_file} is a {mask.mode!r} image, expected an 8-bit 'L' instance map")
        return np.asarray(mask, dtype=np.uint8).copy()


def load_image(root: str | Path, file_name: str) -> np.ndarray:
    """The (H, W, 3) uint8 RGB image ``root/file_name``."""
    with Image.open(Path(root) / file_name) as image:
        return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()


_MENTION_SIZES, _MENTION_COLORS, _MENTION_SHAPES = set(SIZES), set(COLORS), set(ALL_SHAPES)


def parse_mentions(text: str) -> list[tuple[str, str, str]]:
    """Every ``<size> <colour> <shape>`` mention in ``text`` in order, as ``(size, colour, shape)``.

    Case and punctuation are ignored ("Large, RED circle." matches); ``cross`` counts as a shape.
    """
    words = re.findall(r"[a-z]+", text.lower())
    mentions, i = [], 0
    while i + 2 < len(words):
        size, color, shape = words[i:i + 3]
        if size in _MENTION_SIZES and color in _MENTION_COLORS and shape in _MENTION_SHAPES:
            mentions.append((size, color, shape))
            i += 3
        else:
            i += 1
    return mentions


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m training.shapes`` argument parser."""
    parser = argparse.ArgumentParser(prog="python -m training.shapes", description=__doc__.split("\n\n")[0],
                                     allow_abbrev=False)
    parser.add_argument("--out", required=True, help="output directory (shared by several splits)")
    parser.add_argument("--split", required=True, help="split name, e.g. train / val / test")
    parser.add_argument("--num", type=int, required=True, help="number of images")
    parser.add_argument("--seed", type=int, required=True, help="split seed (use different seeds per split)")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels, 64 to 2048 (default 256)")
    parser.add_argument("--world", choices=WORLDS, default="standard",
                        help="'shift' adds the unseen shape 'cross' to every image")
    parser.add_argument("--holdout-only", action="store_true",
                        help="every image contains the held-out green triangle (generalisation split)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry: generate one split and print a one-line summary."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        summary = generate_split(args.out, args.split, args.num, args.seed, size=args.size, world=args.world,
                                 holdout_only=args.holdout_only)
    except ValueError as err:
        parser.error(str(err))
    except OSError as err:  # --out a file, or a folder it cannot write
        parser.error(f"--out {args.out}: cannot write the split there: {err.strerror or err} ({err.filename})")
    print(summary.line())
    return 0

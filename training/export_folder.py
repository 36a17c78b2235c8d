"""The folder `training.export` writes: its file names, paths that cannot leave it, and the images/ files an export
owns (its manifest, ``corrections.images.txt``).

An export folder may also be a training data folder with images of its own, so an export removes from images/ only
files an earlier export wrote and said so in the manifest. This module never imports torch.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path

from pixelllm.files import write_atomically

__all__ = [
    "COCO_FILE",
    "EXPORTED_IMAGE",
    "IMAGES_DIR",
    "IMAGE_MANIFEST",
    "LN_FILE",
    "copy_images",
    "earlier_export_images",
    "image_ext",
    "prune_images",
    "safe_id",
    "safe_join",
]

LN_FILE = "corrections.ln.jsonl"
COCO_FILE = "regions.coco.json"
IMAGES_DIR = "images"
IMAGE_MANIFEST = "corrections.images.txt"  # the images/ files this export wrote, one name a line
EXPORTED_IMAGE = re.compile(r"[0-9a-f]{64}\.[A-Za-z0-9]{1,8}")  # images/<sha256>.<ext>
_ID = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,127}$")
_EXT = re.compile(r"^[a-z0-9]{1,8}$")
_PIL_EXT = {"PNG": "png", "JPEG": "jpg", "GIF": "gif", "WEBP": "webp", "BMP": "bmp", "TIFF": "tiff"}


# --------------------------------------------------------------------------------------------------------
# Paths: nothing is ever written outside the export folder


def safe_id(text: str) -> str:
    """``text`` if it is usable as a file name stem: 1-128 of ``[A-Za-z0-9_.-]``, not starting with a dot (so
    never ``.``/``..``, never a path). ``ValueError`` otherwise — ids are refused, not silently rewritten, so two
    ids can never collide into one file."""
    if not isinstance(text, str) or not _ID.match(text):
        raise ValueError(f"{text!r} is not a safe id: use 1-128 letters, digits, '_', '-' or '.' "
                         "(not starting with '.'); no path separators")
    return text


def safe_join(root: str | os.PathLike, *parts: str) -> Path:
    """``root/part/...`` guaranteed to stay inside ``root``.

    Refuses (``ValueError``) absolute parts, ``..`` components, empty or NUL-containing names, and anything that
    resolves outside ``root`` once symbolic links are followed (a symlinked ``images/`` pointing elsewhere)."""
    base = Path(root).resolve()
    relative = Path()
    for part in parts:
        if not isinstance(part, str) or not part or "\x00" in part:
            raise ValueError(f"refusing export name {part!r}: empty or not a string")
        path = Path(part)
        if path.is_absolute() or part.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", part):
            raise ValueError(f"refusing absolute export name {part!r}")
        if any(p in ("..", "") for p in re.split(r"[\\/]", part)) or ".." in path.parts:
            raise ValueError(f"refusing export name {part!r}: '..' and empty path components are not allowed")
        relative = relative / path
    target = (base / relative).resolve()
    if target != base and base not in target.parents:
        raise ValueError(f"refusing to write {target}: it is outside the export folder {base}")
    return target


def image_ext(source: Path) -> str:
    """The stored file's extension if plain (png, jpg, ...), else the format PIL detects."""
    ext = source.suffix[1:].lower()
    if _EXT.match(ext):
        return ext
    from PIL import Image

    with Image.open(source) as img:
        return _PIL_EXT.get(img.format or "", "png")


# --------------------------------------------------------------------------------------------------------
# The images an export owns


def earlier_export_images(out: Path) -> set[str]:
    """The images/ files an earlier export into `out` wrote: its manifest, or for an export made before there was
    one, the images its LN file and COCO file name."""
    manifest = out / IMAGE_MANIFEST
    if manifest.is_file():
        return set(manifest.read_text().split())
    names: set[str] = set()
    ln_file, coco_file = out / LN_FILE, out / COCO_FILE
    try:
        if ln_file.is_file():
            ids = {json.loads(line).get("image_id") for line in ln_file.read_text().splitlines() if line.strip()}
            folder = out / IMAGES_DIR
            names |= {p.name for p in folder.iterdir() if p.stem in ids} if folder.is_dir() else set()
        if coco_file.is_file():
            names |= {Path(image["file_name"]).name for image in json.loads(coco_file.read_text())["images"]}
    except (ValueError, KeyError, TypeError, AttributeError):  # not files an export wrote: claim nothing
        return set()
    return {name for name in names if EXPORTED_IMAGE.fullmatch(name)}


def copy_images(out: Path, sources: Mapping[str, Path], before: set[str]) -> set[str]:
    """Copy each store file ``sources[name]`` to ``out/images/name`` unless a file of its size is already there.
    ``before`` (the images earlier exports claimed) gains the names about to be copied. Returns the names copied."""
    copies: list[tuple[Path, Path]] = []  # (store file, images/ file) to write
    for name, source in sources.items():
        target = safe_join(out, IMAGES_DIR, name)
        target.parent.mkdir(parents=True, exist_ok=True)
        target = safe_join(out, IMAGES_DIR, name)  # again, now that images/ exists (a symlink is caught here)
        if not (target.is_file() and target.stat().st_size == source.stat().st_size):
            copies.append((source, target))
    if copies:  # claimed before they are written: after a kill part-way through the copies, the rerun found them
        # already there and never claimed them, so no later export removed them when no correction needed them
        before |= {target.name for _, target in copies}
        write_atomically(out / IMAGE_MANIFEST, "".join(f"{name}\n" for name in sorted(before)))
    wrote: set[str] = set()
    for source, target in copies:
        shutil.copyfile(source, target)
        wrote.add(target.name)
    return wrote


def prune_images(out: Path, exported: set[str], before: set[str], wrote: set[str]) -> None:
    """Remove the images an earlier export into `out` wrote (``before``) that this export (``exported``) does not
    need, and write the manifest: the exported images an export wrote (``wrote`` now, or ``before``)."""
    # nothing else in images/ is touched (the folder may also be a training data folder with images of its own,
    # some of which an export found already there and did not write: those are not claimed in the manifest)
    for name in sorted(before - exported):
        stale = out / IMAGES_DIR / name
        if EXPORTED_IMAGE.fullmatch(name) and stale.is_file() and not stale.is_symlink():
            stale.unlink()
    write_atomically(out / IMAGE_MANIFEST, "".join(f"{name}\n" for name in sorted(exported & (wrote | before))))

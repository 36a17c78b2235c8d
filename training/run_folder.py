"""The run folder of `python -m training.train`: where a run may write, whether a folder holds this run (to resume)
or another, and saving into it so that a kill or a full disk never leaves a half-written checkpoint, `final/` or
export in place of a whole one."""

from __future__ import annotations

import io
import json
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from pixelllm.files import probe_writable
from pixelllm.modeling.pixel_llm import PixelLLM


def check_can_write(folder: Path, what: str) -> None:
    """Create `folder` and write a file there, before any work: a read-only folder, or a file in the way, would
    otherwise fail with a traceback at the tokenizer, the first checkpoint or, for the export, after the whole run."""
    try:
        probe_writable(folder)
    except OSError as err:
        raise SystemExit(f"{what} {folder}: cannot write there ({err.strerror or err})") from None


def replace_problem(folder: Path, keep: dict[str, Path]) -> str | None:
    """Why writing a checkpoint in place of `folder` would lose something, or None: it is or holds one of `keep`
    (what -> path: the run, the inputs), it is a file, or it holds files and is not a checkpoint (no config.json;
    `--out runs` would have taken every run)."""
    target = folder.resolve()
    for what, path in keep.items():
        if target == path.resolve() or target in path.resolve().parents:
            return f"it is {what} or holds it"
    if folder.exists() and not folder.is_dir():
        return "it is a file, not a checkpoint folder"
    if folder.is_dir() and any(folder.iterdir()) and not (folder / "config.json").is_file():
        return "it holds files and is not a checkpoint folder (no config.json)"
    return None


def export_folder(cfg: dict[str, Any], out: Path) -> Path | None:
    """Where the run's `export:` writes (`export.dir`, default `<train.out>/export`), or None without one. The
    folder is replaced at the end, so it must be new, empty or a checkpoint (it has config.json), and its parent
    (created here) writable."""
    export = cfg.get("export")
    if not export:
        return None
    folder = Path(export.get("dir") or out / "export")
    problem = replace_problem(folder, {"train.out": out})
    if problem:
        raise SystemExit(f"export.dir {folder}: {problem}, and the export replaces it; give a folder of its own, "
                         "e.g. <train.out>/export")
    check_can_write(folder.parent, f"export.dir {folder}: its folder")  # the export is written there and swapped in
    return folder


# model: settings that only change how a caption is decoded, not what is trained: a resumed run may change them
DECODING_ONLY = frozenset({"model.overrides.repetition_penalty", "model.overrides.max_new_tokens"})


def check_same_run(out: Path, cfg: dict[str, Any]) -> None:
    """A folder with a checkpoint is resumed; refuse when that run was of another model (its `model:` section
    differs), which would otherwise train on that run's weights under this config and replace its `final/`."""
    resolved = out / "config.resolved.json"
    try:
        previous = json.loads(resolved.read_text())
    except (OSError, ValueError):
        return  # no record of the run's config (or an unreadable one): nothing to compare
    if isinstance(previous, dict) and "model" in previous and previous["model"] != cfg["model"]:
        differences = _differences(previous["model"], cfg["model"], "model")
        if differences and all(key in DECODING_ONLY for key in differences):
            return  # the weights are the same model's; the new decoding default goes into final/ and the export
        changed = ", ".join(differences) or "model"
        raise SystemExit(f"train.out {out} holds another run (its {resolved.name} has a different model: section: "
                         f"{changed}), and resuming it would train that run's weights under this config; give a new "
                         "train.out, or the model: section that run was started with")


def _differences(before: Any, after: Any, prefix: str) -> list[str]:
    """The dotted keys under which two nested configs differ (a section one of them lacks counts as empty)."""
    if isinstance(before, dict) and after is None or before is None and isinstance(after, dict):
        before, after = before or {}, after or {}
    if isinstance(before, dict) and isinstance(after, dict):
        return [d for key in sorted(set(before) | set(after), key=str)
                for d in _differences(before.get(key), after.get(key), f"{prefix}.{key}")]
    return [] if before == after else [prefix]


def save_swapped(target: Path, write: Callable[[Path], None], *, private: bool = False,
                 again: str = "run the command again: it resumes from the last checkpoint") -> None:
    """Write a folder beside `target` (`<name>.tmp`, by `write`) and swap it in: a save that fails (a full disk)
    or is killed keeps the previous `target` whole (`<name>.old` between the two renames). private: hidden names of
    our own (`.<name>.swap-tmp` / `.swap-old`), for a folder outside the run's, whose `<name>.old` may be someone's.
    again: what the one-line error of a failed save tells the user to do after making room."""
    if private:
        tmp, old = (target.with_name(f".{target.name}.swap-{kind}") for kind in ("tmp", "old"))
    else:
        tmp, old = target.with_name(target.name + ".tmp"), target.with_name(target.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write(tmp)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, OSError):  # a full disk: one line, not a traceback
            raise SystemExit(f"cannot save {target}: {err}; {target.name} is kept as it was (make room and "
                             f"{again})") from None
        raise
    if target.exists():
        # a kill after the previous save's renames but before its rmtree leaves `old` behind; `target` is newer
        shutil.rmtree(old, ignore_errors=True)
        target.rename(old)
    tmp.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(out: Path, model: PixelLLM, state: dict) -> None:
    def write(folder: Path) -> None:
        model.save_pretrained(folder)
        buffer = io.BytesIO()  # torch.save to a file fails on a full disk as "unexpected pos …", not an OSError
        torch.save(state, buffer)
        (folder / "trainer_state.pt").write_bytes(buffer.getbuffer())

    save_swapped(out / "checkpoint", write)


def trained_steps(checkpoint: Path) -> int | None:
    """The step a checkpoint folder holds (its trainer state's), or None when that cannot be read (the run that
    resumes from it refuses it, naming it). Memory-mapped: the step is read, not the optimizer state."""
    try:
        return int(torch.load(checkpoint / "trainer_state.pt", map_location="cpu", weights_only=True,
                              mmap=True)["step"])
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError, KeyError, TypeError, ValueError):
        return None


def find_resume(out: Path) -> Path | None:
    for name in ("checkpoint", "checkpoint.old"):  # .old survives a kill between the two renames
        path = out / name
        if (path / "trainer_state.pt").is_file() and (path / "model.safetensors").is_file():
            return path
    return None

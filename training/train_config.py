"""The config of a training run (`python -m training.train`): `load_config` reads the YAML / JSON file and its
`--a.b.c=value` overrides, `check_config` checks every setting before any work (the known keys by section, the
numbers and their limits, the data.generate entries, the model, the stages). `training.train` (the run) imports
them from here and re-exports them.
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path
from typing import Any

import yaml

from pixelllm.arguments import as_whole_number
from pixelllm.checkpoint import check_source, check_source_offline
from pixelllm.config import PRESETS, get_config
from pixelllm.modeling.stages import STAGES
from training.data.datasets import TASKS
from training.data.shapes.scenes import check_options
from training.run_folder import find_resume


def load_config(path: str | Path, overrides: list[str]) -> dict[str, Any]:
    """YAML or JSON config plus `--a.b.c=value` overrides (values parsed as YAML: numbers, bools, lists)."""
    text = Path(path).read_text()
    is_json = str(path).endswith(".json")
    try:
        cfg = json.loads(text) if is_json else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        raise SystemExit(f"config {path} is not valid {'JSON' if is_json else 'YAML'}: {err}") from None
    if not isinstance(cfg, dict):
        raise SystemExit(f"config {path} must be a mapping (train:, model:, data:, ...), got {type(cfg).__name__}")
    for item in overrides:
        if not item.startswith("--") or "=" not in item:
            raise SystemExit(f"override {item!r} must look like --train.batch_size=8")
        key, value = item[2:].split("=", 1)
        node = cfg
        parts = key.split(".")
        try:  # a list index past its end (--stages.5.steps with two stages), or a key under a number
            for part in parts[:-1]:
                node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
            last = parts[-1]
            parsed = yaml.safe_load(value)
            if isinstance(node, list):
                node[int(last)] = parsed
            elif isinstance(node, dict):
                node[last] = parsed
            else:
                raise TypeError(f"{type(node).__name__} has no keys")
        except (IndexError, ValueError, TypeError, AttributeError) as err:
            raise SystemExit(f"override {item!r} names nothing in {path} ({type(err).__name__}: {err})") from None
    return cfg


# every train.* setting the trainer reads: a typo ("checkpoint_evry", "lr_scale") silently trained with the default
TRAIN_KEYS = ("autocast", "batch_size", "checkpoint_every", "grad_clip", "lm_lr_scale", "log_every", "lr",
              "max_tokens", "out", "refer_per_image", "region_per_image", "seed", "task_batch_size", "threads",
              "warmup", "weight_decay")
# every other setting the trainer reads, by section: a typo'd one (`--trian.lr=1`, `data.limt`, a stage's `lrr`) was
# ignored and the run trained without it
SECTION_KEYS = {"": ("model", "data", "train", "stages", "export"),
                "model": ("preset", "init", "overrides", "components"),
                "data": ("root", "train_split", "generate", "limit", "lazy"), "export": ("dir", "dtype"),
                "stage": ("name", "stage", "steps", "tasks", "config", "lr", "lm_lr_scale", "warmup", "adapter")}
# the numbers among the settings: (least value, whole number); "abc" or 0 was a traceback once the data and the model
# were made (`log_every: 0` a ZeroDivisionError at the first step)
NUMBERS = {"batch_size": (1, True), "checkpoint_every": (1, True), "log_every": (1, True), "max_tokens": (1, True),
           "refer_per_image": (1, True), "region_per_image": (1, True), "threads": (1, True), "warmup": (0, True),
           "seed": (0, True), "lr": (0, False), "lm_lr_scale": (0, False), "weight_decay": (0, False),
           "grad_clip": (0, False)}
EXPORT_DTYPES = ("float32", "float16", "bfloat16")


# a data.generate entry: `<split>: {num:, seed:, options: {...}}`, the options being generate_split's keywords; a
# missing `seed:` was a KeyError traceback and a typo'd option a TypeError, once the earlier splits were generated
GENERATE_KEYS = ("num", "seed", "options")
GENERATE_OPTIONS = ("size", "world", "holdout_only")


def read_number(value: Any, low: float, whole: bool) -> int | float:
    """`value` as the number the trainer uses, at least `low`, or ValueError saying what it must be. A whole
    number is read by the library's rule (`pixelllm.arguments.as_whole_number`: 32, 32.0 and "32" are 32; 2.5,
    True, "abc", NaN and infinity are none); any other number by float(), text included (YAML reads
    `--train.lr=1e-4` as the string "1e-4"). The caller writes the result back into the config, so the trainer
    reads an int or a float, never 32.0 as a batch size or "1e-4" as a learning rate."""
    number: int | float | None = None
    if whole:
        number = as_whole_number(value)
    elif isinstance(value, (int, float, str)) and not isinstance(value, bool):
        with contextlib.suppress(ValueError):
            number = float(value)
    if number is None or not low <= number < math.inf:
        raise ValueError(f"must be {'a whole number' if whole else 'a number'} >= {low:g}, got {value!r}")
    return number


def check_number(settings: dict[str, Any], key: str, where: str) -> None:
    """`settings[key]` (when set) read by `read_number` with the limits in NUMBERS and written back, or one line
    naming `where` and the key."""
    if key in settings:
        try:
            settings[key] = read_number(settings[key], *NUMBERS[key])
        except ValueError as err:
            raise SystemExit(f"{where}{key} {err}") from None


def check_generate(generate: Any, path: str | Path) -> None:
    """The `data.generate` entries, each `<split>: {num: N, seed: S, options: {size:, world:, holdout_only:}}`
    (`generate_split`'s arguments), checked and their numbers written back as ints: a malformed entry was a
    KeyError / TypeError traceback (a `--size` beyond the generator's bound a MemoryError) once the splits before
    it were generated."""
    if generate is None:
        return
    example = "e.g. {train: {num: 6000, seed: 1}}"
    if not isinstance(generate, dict):
        raise SystemExit(f"config {path}: data.generate must map split names to {{num:, seed:}}, {example}; got "
                         f"{type(generate).__name__}")
    for split, spec in generate.items():
        where = f"config {path}: data.generate {split!r}"
        if not isinstance(split, str):  # YAML reads `2024:` as a number, which the generator cannot name files by
            raise SystemExit(f"{where}: a split name must be text; quote it ('{split}')")
        if not isinstance(spec, dict):
            raise SystemExit(f"{where} must be a mapping with num: and seed:, {example}; got {spec!r}")
        unknown = sorted(set(spec) - set(GENERATE_KEYS), key=str)
        if unknown:
            raise SystemExit(f"{where}: unknown settings {unknown}; known: {', '.join(GENERATE_KEYS)}")
        for key, low in (("num", 1), ("seed", 0)):
            if key not in spec:
                raise SystemExit(f"{where}: {key} is missing ({example})")
            try:
                spec[key] = read_number(spec[key], low, whole=True)
            except ValueError as err:
                raise SystemExit(f"{where}: {key} {err}") from None
        options = spec.setdefault("options", {})
        if options is None:
            options = spec["options"] = {}
        if not isinstance(options, dict):
            raise SystemExit(f"{where}: options must be a mapping ({', '.join(GENERATE_OPTIONS)}), got {options!r}")
        unknown = sorted(set(options) - set(GENERATE_OPTIONS), key=str)
        if unknown:
            raise SystemExit(f"{where}: unknown options {unknown}; known: {', '.join(GENERATE_OPTIONS)}")
        if not isinstance(options.get("holdout_only", False), bool):
            raise SystemExit(f"{where}: options.holdout_only must be true or false, got {options['holdout_only']!r}")
        if "size" in options:
            try:
                options["size"] = read_number(options["size"], 64, whole=True)
            except ValueError as err:
                raise SystemExit(f"{where}: options.size {err}") from None
        try:  # the generator's own limits: the split name, the size's bound, the world
            check_options(str(split), options.get("size", 256), options.get("world", "standard"))
        except ValueError as err:
            raise SystemExit(f"{where}: {err}") from None


def check_config(cfg: dict[str, Any], path: str | Path) -> None:
    """What the run needs, checked before any work: a missing, unknown or unusable setting (a typo'd name, a value
    of the wrong kind, an unknown preset, stage or export dtype), or a stage that cannot train (0 or negative steps,
    no or unknown tasks), is one line naming it, not a setting silently ignored, an untrained `final/` with exit 0
    or a traceback after the data was generated or the stages before it have trained."""
    for section in ("model", "data", "train", "stages"):
        if section not in cfg:
            raise SystemExit(f"config {path}: no `{section}:` section")
    for section in ("model", "data", "train"):
        if not isinstance(cfg[section], dict):
            raise SystemExit(f"config {path}: `{section}:` must be a mapping, got {type(cfg[section]).__name__}")
    if cfg.get("export") is not None and not isinstance(cfg["export"], dict):
        raise SystemExit(f"config {path}: `export:` must be a mapping (dir:, dtype:), got "
                         f"{type(cfg['export']).__name__}")
    for what, settings, known in (("sections", cfg, SECTION_KEYS[""]), ("train settings", cfg["train"], TRAIN_KEYS),
                                  ("model settings", cfg["model"], SECTION_KEYS["model"]),
                                  ("data settings", cfg["data"], SECTION_KEYS["data"]),
                                  ("export settings", cfg.get("export") or {}, SECTION_KEYS["export"])):
        unknown = sorted(set(settings) - set(known), key=str)
        if unknown:
            raise SystemExit(f"config {path}: unknown {what} {unknown}; known: {', '.join(known)}")
    for key in NUMBERS:
        check_number(cfg["train"], key, f"config {path}: train.")
    if cfg["data"].get("limit") is not None:  # a slice bound: "abc" or 2.0 was a TypeError once the data was made
        try:
            cfg["data"]["limit"] = read_number(cfg["data"]["limit"], 1, whole=True)
        except ValueError as err:
            raise SystemExit(f"config {path}: data.limit {err} (or null for every image)") from None
    check_generate(cfg["data"].get("generate"), path)
    if (cfg.get("export") or {}).get("dtype", "float32") not in EXPORT_DTYPES:  # was an error after the whole run
        raise SystemExit(f"config {path}: export.dtype must be one of {', '.join(EXPORT_DTYPES)}, got "
                         f"{cfg['export']['dtype']!r}")
    model = cfg["model"]
    try:  # a typo'd preset or override was a traceback once the data was generated
        recipe = get_config(model.get("preset", "tiny"), **(model.get("overrides") or {}))
        init = model.get("init", "scratch")
        if init != "scratch" and init not in PRESETS:  # a checkpoint folder or hub id (offline: a cached one)
            out = cfg["train"].get("out")
            if out and find_resume(Path(out)) is not None:  # a resumed run loads its checkpoint, not init
                check_source(init)
            else:
                check_source_offline(init)
            if model.get("overrides"):  # were ignored: the checkpoint brings its own config
                raise ValueError(f"overrides apply to init: scratch or a preset, not to the checkpoint {init} (it "
                                 "brings its own config; a stage's `config:` sets its scalar fields)")
    except (ValueError, TypeError, OSError) as err:
        raise SystemExit(f"config {path}: model: {err}") from None
    for section, keys in (("data", ("root", "train_split")), ("train", ("out", "batch_size", "lr"))):
        for key in keys:
            if cfg[section].get(key) in (None, ""):
                raise SystemExit(f"config {path}: {section}.{key} is missing")
    stages = cfg["stages"]
    if not isinstance(stages, list) or not stages:
        raise SystemExit(f"config {path}: stages must be a non-empty list of stages (name:, steps:, tasks:)")
    for number, stage in enumerate(stages, 1):
        if not isinstance(stage, dict) or not stage.get("name"):
            raise SystemExit(f"config {path}: stage {number} must be a mapping with a name:")
        where = f"config {path}: stage {number} ({stage['name']!r})"
        steps = stage.get("steps")
        try:  # the library's whole numbers, as every other count here (32.0 was refused here only)
            stage["steps"] = read_number(steps, 1, whole=True)
        except ValueError:
            raise SystemExit(f"{where}: steps must be a whole number of at least 1, got {steps!r}") from None
        tasks = stage.get("tasks")
        if not isinstance(tasks, dict) or not tasks:
            raise SystemExit(f"{where}: tasks must map task names to weights, e.g. {{narrative: 1}}; got {tasks!r}")
        unknown = sorted(set(tasks) - set(TASKS))
        if unknown:
            raise SystemExit(f"{where}: unknown tasks {unknown}; known: {', '.join(TASKS)}")
        if not all(isinstance(w, (int, float)) and not isinstance(w, bool) and w >= 0 for w in tasks.values()) \
                or not any(w > 0 for w in tasks.values()):
            raise SystemExit(f"{where}: task weights must be numbers >= 0, at least one positive; got {tasks}")
        unknown = sorted(set(stage) - set(SECTION_KEYS["stage"]), key=str)
        if unknown:
            raise SystemExit(f"{where}: unknown settings {unknown}; known: {', '.join(SECTION_KEYS['stage'])}")
        if stage.get("stage", "scratch") not in STAGES:  # a typo in a later stage failed once the earlier ones trained
            raise SystemExit(f"{where}: stage must be one of {', '.join(STAGES)}, got {stage['stage']!r}")
        for key in ("lr", "lm_lr_scale", "warmup"):
            check_number(stage, key, f"{where}: ")
        for key in stage.get("config") or {}:
            if not hasattr(recipe, key) or isinstance(getattr(recipe, key), (dict, list)):
                raise SystemExit(f"{where}: unknown or non-scalar config field {key!r}")

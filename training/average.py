"""Average the weights of checkpoints fine-tuned from one start (a "model soup").

```
python -m training.average --checkpoints runs/a/final runs/b/final [...] --out DIR [--dtype float16]
```

Averaging two runs of the embedded model's last stage from one start beat both runs on nearly every metric
(docs/referring.md §17). The mean is taken by ``torch.optim.swa_utils.AveragedModel`` over the parameters (in
float32 whatever the inputs' dtype); buffers are the first checkpoint's. Checkpoints with another config are
refused: a mean of weights of different models is meaningless; so are checkpoints with LoRA adapters, whose
adapters the mean would drop. Averaging the ends of consecutive stages of one run instead gained nothing (§18).
Pass the float32 ``final`` folders of the runs, not
their float16 exports.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch.optim.swa_utils import AveragedModel

from pixelllm.modeling.pixel_llm import PixelLLM
from training.run_folder import replace_problem, save_swapped


def average_checkpoints(folders: list[str | Path]) -> PixelLLM:
    """The parameter-wise mean of the checkpoints in `folders` (at least two, same config), in float32."""
    if len(folders) < 2:
        raise ValueError(f"averaging needs at least two checkpoints, got {len(folders)}")
    models = [PixelLLM.from_pretrained(str(folder)).float().eval() for folder in folders]
    with_adapters = [str(folder) for folder, model in zip(folders, models) if model.adapters]
    if with_adapters:
        raise ValueError(f"{with_adapters} carry LoRA adapters; only base weights are averaged (merge them first)")
    first = models[0]
    for folder, model in zip(folders[1:], models[1:]):
        if model.config.to_dict() != first.config.to_dict():
            raise ValueError(f"{folder} has another config than {folders[0]}: only runs of one model can be averaged")
    averaged = AveragedModel(first)
    for model in models:
        averaged.update_parameters(model)
    return averaged.module


def check_out(out: Path, checkpoints: list[str]) -> None:
    """Refuse an --out whose replacement would lose something (`run_folder.replace_problem`): one of the inputs, a
    folder holding one, a file, or a folder that is not a checkpoint (`--out runs` would have removed every run)."""
    problem = replace_problem(out, {f"the checkpoint {folder}": Path(folder) for folder in checkpoints})
    if problem:
        raise SystemExit(f"error: --out {out}: {problem}, and the average replaces it; give a new folder")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training.average", description=__doc__.split("\n\n")[0],
                                     allow_abbrev=False)
    parser.add_argument("--checkpoints", nargs="+", required=True, help="checkpoint folders (float32 `final` ones)")
    parser.add_argument("--out", required=True,
                        help="folder to write (a checkpoint folder already there is replaced; any other is refused)")
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"],
                        help="dtype of the written weights (the embedded checkpoint ships float16)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    check_out(out, args.checkpoints)
    try:
        model = average_checkpoints(args.checkpoints)
    except (ValueError, OSError) as error:
        raise SystemExit(f"error: {error}") from None
    card = {"training": "The parameter-wise mean (`python -m training.average`) of: "
                        + ", ".join(f"`{folder}`" for folder in args.checkpoints) + "."}
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise SystemExit(f"error: --out {out}: {error}") from None
    # written beside --out and swapped in: a failed save (a full disk) keeps the checkpoint that was there
    save_swapped(out, lambda folder: model.save_pretrained(folder, dtype=getattr(torch, args.dtype),
                                                           model_card_kwargs=card),
                 private=True, again="run the command again")
    print(f"averaged {len(args.checkpoints)} checkpoints -> {args.out} ({args.dtype})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

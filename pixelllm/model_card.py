"""The model card (`README.md`) written beside every saved checkpoint.

huggingface_hub's mixin renders `MODEL_CARD` with Jinja when `save_pretrained` writes a folder (it never
overwrites an existing README.md). `PixelLLM.generate_model_card` fills in what the model knows about itself;
`python -m training.train` adds how it was trained (`training_summary`). Evaluation numbers are not copied into
the card: `metrics.json` beside it is written later, by the evaluate command the card names.
"""

from __future__ import annotations

from typing import Any

PAPER_URL = "https://arxiv.org/abs/2312.09237"

MODEL_CARD = """
---
{{ card_data }}
---

# PixelLLM `{{ preset }}`

A Pixel-Aligned Language Model ([PixelLLM, CVPR 2024]({{ paper_url }})) in PyTorch, from PixelLLM Studio. It
captions an image and gives every generated word a location (a box per token, read by a location head from the
language model's hidden state); it takes a point, a box or text as the prompt; it localises a referring
expression (the box at the end-of-sentence token) and segments it with SAM's mask decoder; it proposes regions
and captions them (dense captioning).

- **Size**: {{ parameters }} parameters; {{ image_size }} px square input; {{ vocab_size }}-entry vocabulary.
- **Files**: `config.json` (every field needed to rebuild the network), `model.safetensors` (weights, {{ dtype }};
  the loader refuses pickle files), the tokenizer files{% if adapters %}, LoRA adapters under `adapters/`
  ({{ adapters }}){% endif %}.

## Use

```python
from pixelllm import PixelLLM, PixelLLMPredictor

predictor = PixelLLMPredictor(PixelLLM.from_pretrained("path/to/this/folder"))
state = predictor.set_image(image)  # HxWx3 uint8
for word in predictor.stream_caption(state):
    print(word.text, word.box)
```

or `python app.py --checkpoint path/to/this/folder` for the Gradio studio.

## Training

{{ training | default("Not recorded: this folder was not written by `python -m training.train`.", true) }}

## Evaluation

`metrics.json` beside this card, when present, was written by `python -m training.evaluate --checkpoint
<this folder> --data DIR --split test --json metrics.json` (referring P@0.5, mask IoU, referring score AUROC,
location-conditioned caption accuracy, dense-caption AP, trace point-in-object and LBM, caption recall and
hallucination, each beside trivial baselines; docs/metrics.md of the repository defines them).

## Limitations

A model trained from scratch knows only the world of its training data: the `tiny` checkpoints trained on the
procedural Shapes world describe coloured shapes on plain backgrounds and nothing else. Word boxes, referring
boxes and masks are predictions with the errors `metrics.json` measures; check them before relying on them.
"""


def training_summary(config_path: str, stages: list[dict[str, Any]], data_root: str, split: str, images: int,
                     peak_lr: float) -> str:
    """Markdown for the card's Training section, from a `training.train` config (`peak_lr`: the train section's,
    for stages without their own)."""
    steps = sum(int(stage["steps"]) for stage in stages)
    count = "1 stage" if len(stages) == 1 else f"{len(stages)} stages"
    lines = [f"`python -m training.train --config {config_path}`: {steps} steps on `{data_root}` split `{split}` "
             f"({images} images), {count}:", ""]
    for stage in stages:
        tasks = ", ".join(f"{name} {float(weight):g}" for name, weight in stage["tasks"].items())
        lines.append(f"- `{stage['name']}` ({stage.get('stage', 'scratch')}): {stage['steps']} steps, peak LR "
                     f"{float(stage.get('lr', peak_lr)):g}; task weights: {tasks}")
    return "\n".join(lines)

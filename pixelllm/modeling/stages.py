"""The training stages: which of PixelLLM's components each stage trains (paper §4.3 and DESIGN §1).

A component is a set of parameter-name prefixes; LoRA tensors form their own component wherever they sit.
``PixelLLM.parameter_groups`` and ``PixelLLM.set_stage`` are the model's entry points to these tables.
"""

from __future__ import annotations

from collections.abc import Iterable

#: Component -> the parameter-name prefixes that belong to it (every non-LoRA parameter matches exactly one).
COMPONENTS: dict[str, tuple[str, ...]] = {
    "sam_encoder": ("image_encoder.sam_encoder.",),
    "semantic_encoder": ("image_encoder.semantic_encoder.", "image_encoder.fuse."),
    "prompt_encoder": ("prompt_extractor.prompt_encoder.",),
    "extractor": ("prompt_extractor.transformer.", "prompt_extractor.queries", "prompt_extractor.proj.",
                  "prompt_extractor.roi_"),
    "language_model": ("language_model.",),
    "loc_head": ("loc_head.",),
    "mask_decoder": ("mask_head.mask_decoder.",),
    "mask_embedding": ("mask_head.mask_embedding",),
    "proposal_head": ("proposal_head.",),
}

#: Stage -> the components it trains.
#: scratch   — everything but LoRA (the tiny preset is trained from scratch);
#: caption   — paper stage 1: extractor, semantic encoder, LoRA;
#: ln        — paper stage 2: LoRA, extractor, location head, semantic encoder; SAM parts, T5 frozen;
#: multitask — stage 2 plus the proposal head and the mask decoder's learnable embedding;
#: finetune  — LoRA only (corrections finetuning).
STAGES: dict[str, tuple[str, ...]] = {
    "scratch": ("sam_encoder", "semantic_encoder", "prompt_encoder", "extractor", "language_model", "loc_head",
                "mask_decoder", "mask_embedding", "proposal_head"),
    "caption": ("semantic_encoder", "extractor", "lora"),
    "ln": ("lora", "extractor", "loc_head", "semantic_encoder"),
    "multitask": ("lora", "extractor", "loc_head", "semantic_encoder", "proposal_head", "mask_embedding"),
    "finetune": ("lora",),
}


def parameter_groups(names: Iterable[str]) -> dict[str, list[str]]:
    """Parameter names by component (``COMPONENTS`` plus ``"lora"``), in the order given."""
    groups: dict[str, list[str]] = {name: [] for name in [*COMPONENTS, "lora"]}
    for name in names:
        if "lora_" in name:
            groups["lora"].append(name)
            continue
        group = next(g for g, prefixes in COMPONENTS.items() if name.startswith(prefixes))
        groups[group].append(name)
    return groups


def stage_parameters(names: Iterable[str], stage: str) -> set[str]:
    """The parameter names a training stage trains; ValueError for an unknown stage."""
    if stage not in STAGES:
        raise ValueError(f"unknown training stage {stage!r}; choose one of {sorted(STAGES)}")
    groups = parameter_groups(names)
    return {name for component in STAGES[stage] for name in groups[component]}

"""Parallel scheduled sampling (`config.scheduled_sampling`): training on the model's own greedy words.

A training option that feeds the model's own predictions back as decoder inputs (docs/referring.md §13: tried
against the narrative misses, no gain, off by default). These tests pin what it feeds, where, and that inference
and referring are untouched."""

from __future__ import annotations

import torch

from pixelllm.modeling.language_model import mix_own_predictions
from pixelllm.modeling.pixel_llm import PixelLLM
from tests.helpers import make_prompt_sensitive, small_model

torch.set_num_threads(2)


def _labels(model: PixelLLM, lengths: list[int], seed: int = 0) -> torch.Tensor:
    """Random caption tokens, EOS at each row's end, -100 after it."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.full((len(lengths), max(lengths) + 3), -100)
    for row, n in enumerate(lengths):
        labels[row, :n] = torch.randint(5, 300, (n,), generator=gen)
        labels[row, n] = model.config.eos_token_id
    return labels


def _prefix(model: PixelLLM, rows: int, seed: int = 1):
    s = model.config.image_size
    images = torch.rand(rows, 3, s, s, generator=torch.Generator().manual_seed(seed)) * 255
    with torch.no_grad():
        return model.encode_prefix(model.encode_image(images), boxes=torch.tensor([[0.1, 0.2, 0.7, 0.9]] * rows))


def test_each_input_becomes_the_greedy_word_predicted_one_position_earlier():
    model = make_prompt_sensitive(small_model(seed=4))
    labels = _labels(model, [9, 5])
    prefix = _prefix(model, 2)
    with torch.no_grad():
        own = model.teacher_forced(prefix, labels)[0].argmax(-1)  # position i predicts labels[i]
        reference = model.language_model._shift_right(labels)
        mixed = mix_own_predictions(model.language_model, prefix, labels, reference, rate=1.0)
    pad = model.config.pad_token_id
    real = (labels != -100).sum(1).tolist()  # words + EOS
    assert real == [10, 6]
    assert bool((own[labels != -100] != labels[labels != -100]).any()), "the model must disagree with the labels"
    for row, n in enumerate(real):
        assert mixed[row, 0] == pad  # the decoder start is never replaced
        assert mixed[row, 1:n + 1].tolist() == own[row, :n].tolist()
        assert (mixed[row, n + 1:] == pad).all(), "inputs after the last real label stay padding"


def test_the_rate_is_the_share_of_inputs_replaced():
    model = make_prompt_sensitive(small_model(seed=4))
    labels = _labels(model, [30] * 24, seed=2)
    prefix = _prefix(model, 24)
    reference = model.language_model._shift_right(labels)
    with torch.no_grad():
        own = torch.zeros_like(reference)
        own[:, 1:] = model.teacher_forced(prefix, labels)[0][:, :-1].argmax(-1)
        torch.manual_seed(0)
        mixed = mix_own_predictions(model.language_model, prefix, labels, reference, rate=0.3)
    differs = (own != reference) & (labels != -100).roll(1, dims=1)
    differs[:, 0] = False
    assert int(differs.sum()) > 300
    share = float((mixed[differs] == own[differs]).float().mean())
    assert 0.22 < share < 0.38, share
    assert bool((mixed[~differs] == reference[~differs]).all())


def _losses(model: PixelLLM, batch: dict, rate: float) -> dict[str, float]:
    model.config.scheduled_sampling = rate
    torch.manual_seed(0)
    with torch.no_grad():
        return {k: float(v) for k, v in model(batch).items()}


def test_caption_batches_are_mixed_in_training_referring_and_inference_never():
    model = make_prompt_sensitive(small_model(seed=4))
    s = model.config.image_size
    gen = torch.Generator().manual_seed(5)
    labels = _labels(model, [12, 8])
    images = torch.rand(2, 3, s, s, generator=gen) * 255
    caption = {"images": images, "labels": labels, "prompt_boxes": torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 2),
               "token_boxes": torch.rand(2, labels.shape[1], 4, generator=gen).sort(-1).values,
               "token_box_mask": labels != -100}
    refer = {"images": images, "labels": labels, "refer_boxes": torch.tensor([[0.1, 0.1, 0.5, 0.6]] * 2),
             "refer_valid": torch.ones(2, dtype=torch.bool)}
    model.train()
    assert _losses(model, caption, 1.0)["caption"] != _losses(model, caption, 0.0)["caption"]
    assert _losses(model, refer, 1.0) == _losses(model, refer, 0.0)
    model.eval()
    assert _losses(model, caption, 1.0) == _losses(model, caption, 0.0)


def test_gradients_flow_through_the_mixed_pass_only():
    model = make_prompt_sensitive(small_model(seed=4)).train()
    model.config.scheduled_sampling = 0.5
    labels = _labels(model, [7, 11])
    s = model.config.image_size
    batch = {"images": torch.rand(2, 3, s, s) * 255, "labels": labels,
             "prompt_boxes": torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 2)}
    loss = model(batch)["loss"]
    loss.backward()
    grads = [p.grad for p in model.language_model.decoder.parameters() if p.requires_grad]
    assert any(g is not None and float(g.abs().sum()) > 0 for g in grads)
    # the extra pass is gradient-free: it leaves nothing on the autograd graph beyond the mixed pass
    prefix = _prefix(model, 2)
    reference = model.language_model._shift_right(labels)
    mixed = mix_own_predictions(model.language_model, prefix, labels, reference, rate=0.5)
    assert not mixed.requires_grad and mixed.dtype == torch.long

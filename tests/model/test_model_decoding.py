"""The model library's decoding (issue: PixelLLM model library): incremental decoding against teacher forcing, the
location head leaving tokens alone, sampling, the repetition penalty, batched box captions and rows leaving the
batch, and traces of a given caption.

The rest of tests/model/: training losses and gradients: test_model_training.py; saving and loading:
test_model_persistence.py; presets and component weights: test_model_build.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pixelllm.config import get_config
from pixelllm.modeling.heads import LocationHead
from pixelllm.modeling.language_model import Prefix
from pixelllm.tokenizer import encode_text
from tests.helpers import make_prompt_sensitive, small_model
from tests.model.conftest import _decode, _prefix


def test_incremental_decoding_matches_teacher_forcing():
    model = small_model(seed=1)
    prefix = _prefix(model, seed=3)
    tokens, boxes = _decode(model, prefix, n=24)
    assert len(tokens) >= 8, "random model ended too early for a meaningful cache test"
    labels = torch.tensor([tokens])
    with torch.no_grad():
        logits, points = model.teacher_forced(prefix, labels)
    assert logits[0].argmax(-1).tolist() == tokens
    torch.testing.assert_close(LocationHead.as_box(points[0]), boxes, atol=1e-5, rtol=0)


def test_location_head_does_not_change_tokens():
    model = small_model(seed=2)
    prefix = _prefix(model, seed=5, box=[0.1, 0.2, 0.6, 0.9])
    with_boxes, _ = _decode(model, prefix)
    without, none = _decode(model, prefix, with_boxes=False)
    assert none is None and with_boxes == without
    with torch.no_grad():  # scramble the head: tokens must not move
        for p in model.loc_head.parameters():
            p.normal_(0, 5.0)
    scrambled, boxes = _decode(model, prefix)
    assert scrambled == with_boxes and boxes is not None
    # and transformers' own greedy generate on the same prefix agrees
    from transformers.modeling_outputs import BaseModelOutput

    with torch.no_grad():
        ref = model.language_model.generate(encoder_outputs=BaseModelOutput(last_hidden_state=prefix.hidden),
                                            attention_mask=prefix.mask, max_new_tokens=24, do_sample=False)
    assert ref[0, 1:].tolist()[: len(with_boxes)] == with_boxes[: ref.shape[1] - 1]


def test_sampling_never_draws_byte_pieces_or_special_tokens():
    """Byte-fallback pieces alone decode to control characters or broken UTF-8: sampling an untrained random model
    (most of whose tiny vocabulary is the 256 byte pieces) drew them in nearly every caption."""
    from pixelllm.predictor import PixelLLMPredictor
    from pixelllm.tokenizer import BYTE_TOKENS, never_sampled
    from tests.helpers import random_image

    model = small_model(seed=3)
    tok = model.tokenizer
    blocked = set(never_sampled(tok, model.config.t5.vocab_size))
    assert set(tok.convert_tokens_to_ids(BYTE_TOKENS)) <= blocked
    assert {tok.pad_token_id, tok.unk_token_id} <= blocked and tok.eos_token_id not in blocked
    predictor = PixelLLMPredictor(model, device="cpu")
    state = predictor.set_image(random_image(1, 64, 64))
    drawn = [t for seed in range(4) for w in predictor.caption(state, do_sample=True, temperature=2.0, seed=seed,
                                                              max_new_tokens=24).words for t in w.token_ids]
    assert len(drawn) > 20 and not blocked & set(drawn)


def test_repetition_penalty_decodes_as_transformers_generate_alone_and_in_a_batch():
    """`repetition_penalty` (the embedded checkpoint's decoding default, docs/referring.md §18) picks the tokens
    transformers' generate() picks with the same penalty, also for a row of a batch whose other row ended early."""
    from transformers.modeling_outputs import BaseModelOutput

    model = small_model(seed=2)
    prefix = _prefix(model, seed=5, box=[0.1, 0.2, 0.6, 0.9])
    plain, _ = _decode(model, prefix, n=24)
    penalised, _ = _decode(model, prefix, n=24, repetition_penalty=1.5)
    assert len(set(plain)) < len(plain), "the random model repeats no token: nothing to penalise"
    assert penalised != plain
    with torch.no_grad():
        ref = model.language_model.generate(encoder_outputs=BaseModelOutput(last_hidden_state=prefix.hidden),
                                            attention_mask=prefix.mask, max_new_tokens=24, do_sample=False,
                                            repetition_penalty=1.5)
    assert ref[0, 1:].tolist()[: len(penalised)] == penalised[: ref.shape[1] - 1]

    other = _prefix(model, seed=9)
    batch = Prefix(torch.cat([other.hidden, prefix.hidden]), torch.cat([other.mask, prefix.mask]))
    eos, model.config.eos_token_id = model.config.eos_token_id, -1
    free = [_decode(model, p, n=24, repetition_penalty=1.5)[0] for p in (other, prefix)]
    # an EOS id the first row emits part-way and the second never: the first row leaves the batch early
    model.config.eos_token_id = next(t for t in free[0][2:] if t not in free[1])
    rows: list[list[int]] = [[], []]
    with torch.no_grad():
        for step, _ in model.stream(batch, max_new_tokens=24, repetition_penalty=1.5):
            for i in range(2):
                if not bool(step.finished[i]):
                    rows[i].append(int(step.tokens[i]))
    singles = [_decode(model, p, n=24, repetition_penalty=1.5)[0] for p in (other, prefix)]
    model.config.eos_token_id = eos
    assert len(rows[0]) < len(rows[1]) == 24
    assert rows == singles
    with pytest.raises(ValueError, match="between 1 and 2"):  # a checkpoint that would favour repeats is refused
        get_config("tiny", repetition_penalty=0.5)


def test_batched_box_captions_equal_single_calls():
    model = make_prompt_sensitive(small_model(seed=6))
    images = torch.rand(1, 3, model.config.image_size, model.config.image_size,
                        generator=torch.Generator().manual_seed(9)) * 255
    boxes = torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.4, 0.1, 0.9, 0.6], [0.1, 0.5, 0.7, 1.0], [0.2, 0.2, 0.3, 0.9]])
    with torch.no_grad():
        feats = model.encode_image(images)
        batched = model.encode_prefix(feats, boxes=boxes)
        rows = [[] for _ in boxes]
        for step, _ in model.stream(batched, max_new_tokens=16):
            for i, tok in enumerate(step.tokens.tolist()):
                if not step.finished[i]:
                    rows[i].append(tok)
        singles = [_decode(model, model.encode_prefix(feats, boxes=b[None]), n=16)[0] for b in boxes]
    assert rows == singles
    assert len({tuple(r) for r in rows}) > 1, "boxes should condition the caption"


def test_rows_that_end_leave_the_decoding_batch():
    """A row leaves the batch at its EOS (its KV cache and prefix dropped): the decoder runs on fewer rows from then
    on, and every row's tokens and boxes are still those of decoding it alone."""
    model = make_prompt_sensitive(small_model(seed=6))
    images = torch.rand(1, 3, model.config.image_size, model.config.image_size,
                        generator=torch.Generator().manual_seed(9)) * 255
    boxes = torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.4, 0.1, 0.9, 0.6], [0.1, 0.5, 0.7, 1.0], [0.2, 0.2, 0.3, 0.9]])
    n = 12
    with torch.no_grad():
        feats = model.encode_image(images)
        prefix = model.encode_prefix(feats, boxes=boxes)
        model.config.eos_token_id = -1  # no EOS: every row runs n steps
        free = [[int(t) for t in step.tokens] for step, _ in model.stream(prefix, max_new_tokens=n)]
        # an EOS id that some rows emit and others never do (this random model repeats one token per row)
        emitted = [set(row) for row in zip(*free)]
        model.config.eos_token_id = next(t for t in sorted(set().union(*emitted))
                                         if 0 < sum(t in e for e in emitted) < len(boxes))
        widths = []
        handle = model.language_model.decoder.register_forward_pre_hook(
            lambda _m, _a, kw: widths.append(kw["input_ids"].shape[0]), with_kwargs=True)
        rows, row_boxes = [[] for _ in boxes], [[] for _ in boxes]
        for step, box in model.stream(prefix, max_new_tokens=n):
            for i in range(len(boxes)):
                if not step.finished[i]:
                    rows[i].append(int(step.tokens[i]))
                    row_boxes[i].append(box[i])
        handle.remove()
        singles = [_decode(model, model.encode_prefix(feats, boxes=b[None]), n=n) for b in boxes]
    for i, (tokens, single_boxes) in enumerate(singles):
        assert rows[i] == tokens
        assert torch.allclose(torch.stack(row_boxes[i]), single_boxes, atol=1e-5)
    lengths = [len(r) for r in rows]
    assert widths == [sum(length > step for length in lengths) for step in range(max(lengths))]
    assert widths[-1] < len(boxes)


def test_tracing_a_caption_gives_the_boxes_it_was_generated_with():
    """Controlled trace generation: `PixelLLM.trace` of the model's own greedy tokens reads the boxes and
    log-probabilities that decoding them gave (teacher forcing = incremental decoding on the same tokens)."""
    model = small_model(seed=1)
    prefix = _prefix(model, seed=3, box=[0.1, 0.1, 0.7, 0.8])
    eos, model.config.eos_token_id = model.config.eos_token_id, -1  # decode a fixed length
    with torch.no_grad():
        steps = [(int(step.tokens[0]), box[0], float(step.logprob[0]))
                 for step, box in model.stream(prefix, max_new_tokens=10)]
        model.config.eos_token_id = eos
        boxes, logp = model.trace(prefix, torch.tensor([t for t, _, _ in steps]))
    assert boxes.shape == (10, 4) and logp.shape == (11,)  # the caption's tokens and EOS
    assert torch.allclose(boxes, torch.stack([b for _, b, _ in steps]), atol=1e-5)
    assert torch.allclose(logp[:10], torch.tensor([lp for _, _, lp in steps]), atol=1e-4)


def test_predictor_traces_every_word_of_a_given_caption():
    """`PixelLLMPredictor.trace`: one word per whitespace-separated piece of the caption, in pixels, each the mean
    of its tokens' boxes from `PixelLLM.trace`; a blank caption is refused with a clear message."""
    from pixelllm.predictor import PixelLLMPredictor
    from tests.helpers import random_image

    model = small_model(seed=1)
    predictor = PixelLLMPredictor(model)
    state = predictor.set_image(random_image(3, 48, 80))
    text = "a large red circle on the left. the background is mint"
    traced = predictor.trace(state, text, box=[5, 5, 60, 40])
    assert [w.text for w in traced.words] == text.split() and traced.text == text
    pieces = [encode_text(model.tokenizer, w, eos=False) for w in text.split()]
    assert [w.token_ids for w in traced.words] == pieces
    with torch.no_grad():
        prefix = model.encode_prefix(state.features, boxes=torch.tensor([[5 / 80, 5 / 48, 60 / 80, 40 / 48]]))
        boxes, logp = model.trace(prefix, torch.tensor([t for p in pieces for t in p]))
    px = boxes.numpy() * [80, 48, 80, 48]
    start = 0
    for word, piece in zip(traced.words, pieces):
        np.testing.assert_allclose(word.box, px[start:start + len(piece)].mean(0), atol=0.01)
        start += len(piece)
    assert traced.score == pytest.approx(float(logp.mean().exp()), rel=1e-4)
    with pytest.raises(ValueError, match="give the caption"):
        predictor.trace(state, "   ")

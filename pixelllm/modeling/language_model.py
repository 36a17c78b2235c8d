"""Language model L (DESIGN §1; Scenic's `t5_text_head.py`): T5 as a PrefixLM fed with `inputs_embeds`.

The encoder reads [visual prefix f_l ; text-prompt embeddings]; the decoder writes the caption. Decoding is our
own loop over the T5 decoder with its KV cache so that every step yields the token *and* the unscaled last
hidden state the location head reads (transformers' streamers only see token ids).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers import T5Config, T5ForConditionalGeneration
from transformers.cache_utils import DynamicCache, EncoderDecoderCache
from transformers.generation.logits_process import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    SuppressTokensLogitsProcessor,
    TemperatureLogitsWarper,
    TopPLogitsWarper,
)

from pixelllm.config import T5Settings


def build_t5(settings: T5Settings, *, pad_token_id: int, eos_token_id: int) -> T5ForConditionalGeneration:
    config = T5Config(
        vocab_size=settings.vocab_size,
        d_model=settings.d_model,
        d_kv=settings.d_kv,
        d_ff=settings.d_ff,
        num_layers=settings.num_layers,
        num_decoder_layers=settings.num_decoder_layers,
        num_heads=settings.num_heads,
        feed_forward_proj=settings.feed_forward_proj,
        dropout_rate=settings.dropout_rate,
        tie_word_embeddings=settings.tie_word_embeddings,
        relative_attention_num_buckets=settings.relative_attention_num_buckets,
        relative_attention_max_distance=settings.relative_attention_max_distance,
        pad_token_id=pad_token_id,
        eos_token_id=eos_token_id,
        decoder_start_token_id=pad_token_id,
        attn_implementation="sdpa",
    )
    if config.dense_act_fn == "gelu_new":
        # "gated-gelu" (T5 v1.1 / Flan-T5) computes the tanh GELU as seven element-wise ops in Python
        # (`NewGELUActivation`); `gelu_pytorch_tanh` is the same function in one fused kernel (equal up to
        # rounding; the weights and config.json don't change). Measured on the embedded model, 2-core CPU:
        # full-image captions 124 -> 143 words/s, same text (README, Benchmark).
        config.dense_act_fn = "gelu_pytorch_tanh"
    lm = T5ForConditionalGeneration(config)
    if not settings.tie_word_embeddings:
        untie_lm_head(lm)
    return lm


def untie_lm_head(lm: T5ForConditionalGeneration) -> None:
    """Give lm_head its own weight, as Flan-T5 has (the encoder and decoder embeddings stay `shared`).

    T5Config reads its tie_word_embeddings argument as "scale the decoder output by d_model**-0.5" and ties
    lm_head to `shared` regardless; transformers' from_pretrained unties it only on finding two different
    tensors in the file. Left tied, loading Flan-T5's weights wrote the head over the input embeddings.
    """
    lm._tied_weights_keys = {k: v for k, v in lm._tied_weights_keys.items() if k != "lm_head.weight"}
    lm.all_tied_weights_keys.pop("lm_head.weight", None)
    weight = torch.empty_like(lm.shared.weight)
    nn.init.normal_(weight, mean=0.0, std=lm.config.initializer_factor)  # T5's own init of an untied head
    lm.lm_head.weight = nn.Parameter(weight)


@dataclass
class Prefix:
    """The encoded PrefixLM input. hidden: BxLxD (T5 encoder output); mask: BxL (1 = attend)."""

    hidden: torch.Tensor
    mask: torch.Tensor

    def expand(self, n: int) -> Prefix:
        return Prefix(self.hidden.expand(n, -1, -1), self.mask.expand(n, -1))

    def select(self, rows: torch.Tensor) -> Prefix:
        """The prefixes of `rows` (a 1-D index, repeats allowed): one encoded prefix serving several targets."""
        return Prefix(self.hidden[rows], self.mask[rows])


def decoder_features(lm: T5ForConditionalGeneration, decoder_input_ids: torch.Tensor, prefix: Prefix,
                     cache: EncoderDecoderCache | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the T5 decoder. Returns (logits BxTxV, hidden BxTxD) where hidden is the last decoder hidden state
    after the final layer norm and *before* T5's d_model**-0.5 rescaling — what the location head reads."""
    out = lm.decoder(
        input_ids=decoder_input_ids,
        encoder_hidden_states=prefix.hidden,
        encoder_attention_mask=prefix.mask,
        past_key_values=cache,
        use_cache=cache is not None,
    )
    hidden = out.last_hidden_state
    scaled = hidden * (lm.model_dim**-0.5) if lm.config.scale_decoder_outputs else hidden
    return lm.lm_head(scaled), hidden


def mix_own_predictions(lm: T5ForConditionalGeneration, prefix: Prefix, labels: torch.Tensor,
                        reference_inputs: torch.Tensor, rate: float) -> torch.Tensor:
    """Parallel scheduled sampling (one gradient-free pass; `config.scheduled_sampling`): decoder input i + 1
    becomes the greedy prediction made at position i under the reference inputs, with probability `rate`, wherever
    labels[i] is a real token (not -100). The start token and padding stay."""
    with torch.no_grad():
        logits, _ = decoder_features(lm, reference_inputs, prefix)
    own = torch.zeros_like(reference_inputs)
    own[:, 1:] = logits[:, :-1].argmax(-1)
    mix = torch.zeros_like(reference_inputs, dtype=torch.bool)
    mix[:, 1:] = (labels[:, :-1] != -100) & (torch.rand(labels[:, :-1].shape, device=labels.device) < rate)
    return torch.where(mix, own, reference_inputs)


@dataclass
class DecodeStep:
    """One decoding step for a batch.

    tokens: B long, the token chosen at this step (pad for rows that had already finished).
    hidden: BxD, the decoder feature that produced it (the location head's input).
    logprob: B, log-probability of the chosen token under the (unwarped) model distribution.
    finished: B bool, rows whose sequence had ended before this step.
    """

    tokens: torch.Tensor
    hidden: torch.Tensor
    logprob: torch.Tensor
    finished: torch.Tensor


def decode(lm: T5ForConditionalGeneration, prefix: Prefix, *, max_new_tokens: int, eos_token_id: int,
           pad_token_id: int, do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
           repetition_penalty: float = 1.0, generator: torch.Generator | None = None,
           never_sample: Sequence[int] = ()) -> Iterator[DecodeStep]:
    """Incremental decoding with the KV cache, one step per yield; stops when every row emitted EOS or after
    `max_new_tokens`. Greedy by default; sampling uses transformers' temperature and top-p warpers, and
    `repetition_penalty` != 1 its RepetitionPenaltyLogitsProcessor (greedy or sampled), as `generate()` does.
    `never_sample`: token ids sampling may not draw (`SuppressTokensLogitsProcessor`; greedy decoding ignores it).

    A row that emits EOS leaves the batch: its KV cache and prefix rows are dropped (transformers'
    `batch_select_indices`), so a batch of captions of different lengths costs what its live rows cost, not
    16 rows until the longest ends. Steps still report the whole batch: finished rows get pad, zero hidden and
    zero log-probability, with `finished` set."""
    batch = prefix.hidden.shape[0]
    device = prefix.hidden.device
    cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
    warpers = LogitsProcessorList()
    if repetition_penalty != 1.0:  # CTRL's penalty on every token already generated, greedy or sampled
        warpers.append(RepetitionPenaltyLogitsProcessor(repetition_penalty))
    if do_sample:
        if never_sample:  # before temperature and top-p, so that top-p's nucleus is made of tokens it may draw
            warpers.append(SuppressTokensLogitsProcessor(list(never_sample), device=device))
        if temperature != 1.0:
            warpers.append(TemperatureLogitsWarper(temperature))
        if top_p < 1.0:
            warpers.append(TopPLogitsWarper(top_p))
    live = torch.arange(batch, device=device)  # the batch rows still decoding, in order
    last = torch.full((batch, 1), pad_token_id, dtype=torch.long, device=device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    history = last
    for _ in range(max_new_tokens):
        logits, hidden = decoder_features(lm, last, prefix, cache)
        logits, hidden = logits[:, -1].float(), hidden[:, -1]
        logprobs = torch.log_softmax(logits, dim=-1)
        scores = warpers(history, logits.clone()) if warpers else logits  # history: start token + tokens so far
        if do_sample:
            probs = torch.softmax(scores, dim=-1)
            if generator is not None and generator.device != probs.device:  # a seed's (CPU) generator: draw there
                # (multinomial refuses a generator of another device; a seed then gives one caption on any device)
                tokens = torch.multinomial(probs.to(generator.device), 1, generator=generator).squeeze(1).to(device)
            else:
                tokens = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        else:
            tokens = scores.argmax(dim=-1)
        logprob = logprobs.gather(1, tokens[:, None]).squeeze(1)
        if len(live) == batch:  # every row still decoding (always, for one caption): no scatter
            yield DecodeStep(tokens=tokens, hidden=hidden, logprob=logprob, finished=finished.clone())
        else:
            full_tokens = torch.full((batch,), pad_token_id, dtype=torch.long, device=device)
            full_tokens[live] = tokens
            full_hidden = hidden.new_zeros(batch, hidden.shape[-1])
            full_hidden[live] = hidden
            full_logprob = logprob.new_zeros(batch)
            full_logprob[live] = logprob
            yield DecodeStep(tokens=full_tokens, hidden=full_hidden, logprob=full_logprob,
                             finished=finished.clone())
        ended = tokens == eos_token_id
        finished[live[ended]] = True
        if bool(finished.all()):
            return
        if bool(ended.any()):
            keep = (~ended).nonzero().squeeze(1)
            cache.batch_select_indices(keep)
            prefix = prefix.select(keep)
            live, tokens, history = live[keep], tokens[keep], history[keep]
        last = tokens[:, None]
        history = torch.cat([history, last], dim=1)

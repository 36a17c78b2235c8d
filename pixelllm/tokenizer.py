"""Tokenizers. The `tiny` preset trains its own: BPE over Metaspace-split words with byte fallback (as
Llama/SentencePiece do), so any typed text — emoji, CJK, HTML — encodes and decodes losslessly; nothing is
`<unk>`. `base`/`paper` use the Flan-T5 SentencePiece tokenizer from the T5 directory.

Special ids follow T5: pad = decoder start = 0, eos = 1, unk = 2. Both tokenizers mark a word's first token
with the Metaspace prefix "▁", which is how decoding knows a token starts a new word.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import lru_cache

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

SPECIALS = ["<pad>", "</s>", "<unk>"]
BYTE_TOKENS = [f"<0x{b:02X}>" for b in range(256)]
WORD_PREFIX = "\u2581"


def train_tokenizer(texts: Iterable[str], vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """Train the tiny preset's tokenizer on a text corpus. The vocabulary always holds the 256 byte tokens."""
    bpe_size = vocab_size - len(SPECIALS) - len(BYTE_TOKENS)
    if bpe_size < 64:
        raise ValueError(f"vocab_size {vocab_size} too small: 3 specials + 256 byte tokens + at least 64 merges")
    trainer_tok = Tokenizer(models.BPE(unk_token=None))
    _set_normalization(trainer_tok)
    trainer = trainers.BpeTrainer(vocab_size=bpe_size, special_tokens=[], show_progress=False,
                                  initial_alphabet=[WORD_PREFIX])
    trainer_tok.train_from_iterator(texts, trainer=trainer)
    learned = trainer_tok.get_vocab()
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in _merges(trainer_tok)]
    # Re-number: specials, then bytes, then the learned pieces, keeping merge order valid.
    vocab = {tok: i for i, tok in enumerate(SPECIALS + BYTE_TOKENS)}
    for piece, _ in sorted(learned.items(), key=lambda kv: kv[1]):
        vocab.setdefault(piece, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    _set_normalization(tok)
    tok.decoder = decoders.Sequence([
        decoders.Replace(WORD_PREFIX, " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0),
    ])
    tok.add_special_tokens(SPECIALS)
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=512)


def _set_normalization(tok: Tokenizer) -> None:
    # Llama-style: prepend "▁" once and turn every space into "▁" (so runs of spaces survive), then split
    # before each "▁" so pieces never cross words.
    tok.normalizer = normalizers.Sequence([
        normalizers.NFC(), normalizers.Prepend(WORD_PREFIX), normalizers.Replace(" ", WORD_PREFIX),
    ])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=WORD_PREFIX, prepend_scheme="never", split=True)


def _merges(tok: Tokenizer) -> list:
    import json

    return json.loads(tok.to_str())["model"]["merges"]


def encode_text(tokenizer: PreTrainedTokenizerFast, text: str, *, eos: bool) -> list[int]:
    """Token ids for `text`, with or without the trailing EOS."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids + [tokenizer.eos_token_id] if eos else ids


@lru_cache(maxsize=8)
def _word_start_table(tokenizer: PreTrainedTokenizerFast) -> tuple[bool, ...]:
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    return tuple(bool(p) and p.startswith(WORD_PREFIX) for p in pieces)


def starts_word(tokenizer: PreTrainedTokenizerFast, token_id: int) -> bool:
    """True if the token begins a new word (carries the "▁" prefix)."""
    table = _word_start_table(tokenizer)
    return 0 <= token_id < len(table) and table[token_id]


@lru_cache(maxsize=8)
def never_sampled(tokenizer: PreTrainedTokenizerFast, vocab_size: int) -> tuple[int, ...]:
    """Token ids sampling must not draw (the model never learns to emit them; greedy decoding never picks them):
    byte-fallback pieces, which alone decode to control characters or to broken UTF-8 ("\ufffd"); special tokens
    other than EOS (pad, unk, T5's sentinels); ids of the model's vocabulary beyond the tokenizer's."""
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    special = set(tokenizer.all_special_ids) - {tokenizer.eos_token_id}
    byte_pieces = set(BYTE_TOKENS)
    blocked = [i for i, p in enumerate(pieces) if i in special or p in byte_pieces]
    return tuple(blocked + list(range(len(tokenizer), vocab_size)))


def group_words(tokenizer: PreTrainedTokenizerFast, token_ids: list[int]) -> list[list[int]]:
    """Split a decoded token sequence (specials already removed) into words: lists of token positions.
    A token without the word prefix continues the current word (sub-word pieces, punctuation, bytes)."""
    words: list[list[int]] = []
    for pos, tid in enumerate(token_ids):
        if not words or starts_word(tokenizer, tid):
            words.append([pos])
        else:
            words[-1].append(pos)
    return words

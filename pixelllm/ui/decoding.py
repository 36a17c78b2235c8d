"""Decoding for the studio's captions: the decoding controls checked (`decoding_options`) and the words of one
caption streamed from the predictor up to the max-words limit (`WordStream`, which also tells whether that limit
cut the caption)."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from contextlib import closing
from typing import Any

import numpy as np

from pixelllm.arguments import as_whole_number
from pixelllm.predictor import ServedBy
from pixelllm.ui.workspace import Studio


def form_whole_number(value: Any, message: str) -> int:
    """A form field's whole number read as the library reads one (`as_whole_number`: ints exactly, "3", 3.0; never
    3.5, True, NaN or "abc"), or ValueError(message); the caller checks the range with its own message."""
    number = as_whole_number(value)
    if number is None:
        raise ValueError(message)
    return number


def decoding_options(max_words: Any, sampling: Any, temperature: Any, top_p: Any, seed: Any, *,
                     default_words: int, limit: int = 128, repetition_penalty: Any = 1.0) -> dict:
    """Validate the decoding controls. Sampling without a seed (None, blank or -1) draws one and reports it, so
    every result is reproducible; the repetition penalty is reported too. max_words None: `default_words`
    (`Studio.default_max_words`)."""
    max_words = form_whole_number(max_words if max_words is not None else default_words,
                                  "max words must be a whole number")
    if not 1 <= max_words <= limit:
        raise ValueError(f"max words must be between 1 and {limit}")
    sampling = bool(sampling)
    if isinstance(seed, str) and not seed.strip():
        seed = None  # blank: drawn below, as for None (it was passed on, and the predictor refused '' as no number)
    if seed is not None:
        seed_message = "the seed must be a whole number between 0 and 2^63 (or -1 / blank for random)"
        seed = form_whole_number(seed, seed_message)
        if not -1 <= seed < 2**63:
            raise ValueError(seed_message)
        seed = None if seed == -1 else seed
    if seed is None and sampling:
        seed = secrets.randbelow(2**31)
    try:
        temperature, top_p = float(temperature if temperature is not None else 1.0), float(
            top_p if top_p is not None else 1.0)
    except (TypeError, ValueError) as err:
        raise ValueError("temperature and top-p must be numbers") from err
    try:
        repetition_penalty = float(repetition_penalty)
    except (TypeError, ValueError) as err:
        raise ValueError("the repetition penalty must be a number") from err
    if not 1.0 <= repetition_penalty <= 2.0:
        raise ValueError("the repetition penalty must be between 1 (none) and 2")
    return {"max_words": max_words, "do_sample": sampling, "temperature": temperature, "top_p": top_p,
            "seed": seed, "repetition_penalty": repetition_penalty}


def token_budget(max_words: int) -> int:
    """Tokens decoded for at most `max_words` words: four a word plus a few (a word is one token or more; garbled
    words from hot sampling can run longer, and then this budget, not the word count, ends the caption)."""
    return min(512, 4 * max_words + 8)


class WordStream:
    """Words as they are decoded ({index, text, box} model-frame pixels), at most options['max_words']. After the
    loop, `cut` tells whether a limit (max words, or the token budget behind it) stopped a caption the model had
    not ended: the final streamed word carries `eos` when the model's EOS ended it, so this costs no extra
    decoding. The predictor generator is closed explicitly so its model lock is released when we stop early.
    `served`: the weights that decoded the words (`predictor.reading()`), set once iteration starts; what the
    caller logs (the active adapter may have changed by the time it logs)."""

    def __init__(self, studio: Studio, array: np.ndarray, *, points=None, point_labels=None, box=None,
                 text: str | None = None, options: dict) -> None:
        self.studio, self.array, self.options = studio, array, options
        self.prompts = {"points": points, "point_labels": point_labels, "box": box, "text": text}
        self.cut = False
        self.served: ServedBy | None = None

    def __iter__(self) -> Iterator[dict]:
        predictor = self.studio.predictor
        max_words = self.options["max_words"]
        with predictor.reading() as self.served, closing(predictor.stream_caption(
                predictor.set_image(self.array),
                **self.prompts, max_new_tokens=token_budget(max_words),
                do_sample=self.options["do_sample"], temperature=self.options["temperature"],
                top_p=self.options["top_p"], seed=self.options["seed"],
                repetition_penalty=self.options["repetition_penalty"])) as words:
            for count, word in enumerate(words, start=1):
                yield word.to_dict()
                self.cut = not word.eos  # False only on a final word the model ended
                if count >= max_words:
                    break


def cut_note(stream: WordStream) -> str:
    """The status line's note when the max-words limit ended a caption early ('' otherwise)."""
    return " · stopped at the max-words limit (raise it under Decoding)" if stream.cut else ""

"""Checks of the predictor's numeric arguments: counts (`max_new_tokens`, `max_regions`, a seed) and the decoding
options of `PixelLLMPredictor.stream_caption`. Each refuses a bad value with a ValueError naming the argument."""

from __future__ import annotations

import operator

import numpy as np
import torch

MAX_TRACE_TOKENS = 512  # the longest caption `trace` reads (max_new_tokens' limit too)


def as_whole_number(value: object) -> int | None:
    """value as an int (ints and numpy integers exactly; 3.0, "3", a 0-d tensor), or None when it is no whole
    number (1.5, "abc", NaN, infinity, True)."""
    if isinstance(value, (bool, np.bool_)):
        return None
    try:
        return operator.index(value)
    except TypeError:
        if isinstance(value, str):
            try:  # exactly: float() rounds text past 2**53 ("12345678901234567891", a seed) to another number
                return int(value)
            except ValueError:
                pass
        try:
            as_float = float(value)
        except (TypeError, ValueError):
            return None
        return int(as_float) if as_float.is_integer() else None


def whole_number(value: object, what: str, low: int, high: int) -> int:
    """value as an int in [low, high], or ValueError naming the argument (1.5, "abc", NaN and True are no counts)."""
    number = as_whole_number(value)
    if number is None or not low <= number <= high:
        raise ValueError(f"{what} must be a whole number between {low} and {high}, got {value!r}")
    return number


def check_max_new_tokens(value: object) -> int | None:
    """None (the checkpoint's default) or 1..MAX_TRACE_TOKENS: 0 used to mean the default and a negative count
    an empty caption."""
    return None if value is None else whole_number(value, "max_new_tokens", 1, MAX_TRACE_TOKENS)


def decode_options(max_new_tokens: object, do_sample: object, temperature: float, top_p: float, seed: object,
                   repetition_penalty: float) -> dict:
    """The keyword arguments of `PixelLLM.stream` from a caller's decoding options, or ValueError naming the
    option out of range (sampling options are checked only when sampling)."""
    max_new_tokens = check_max_new_tokens(max_new_tokens)
    if do_sample and not (0.05 <= float(temperature) <= 5.0):
        raise ValueError("temperature must be between 0.05 and 5")
    if do_sample and not (0.0 < float(top_p) <= 1.0):
        raise ValueError("top_p must be in (0, 1]")
    generator = None
    if do_sample and seed is not None:
        generator = torch.Generator().manual_seed(whole_number(seed, "seed", -2**63, 2**64 - 1))
    if not 1.0 <= float(repetition_penalty) <= 2.0:
        raise ValueError("repetition_penalty must be between 1 and 2")
    return {"max_new_tokens": max_new_tokens, "do_sample": bool(do_sample), "temperature": float(temperature),
            "top_p": float(top_p), "repetition_penalty": float(repetition_penalty), "generator": generator}

"""What `PixelLLMPredictor` returns (`Word`, `Caption`, `Referral`, `Region`; boxes (x0, y0, x1, y1) in pixels of
the original image) and `WordAssembler`, which groups a decoded token stream into words.

A word may be several tokens; its box is the mean of its tokens' boxes (training gives every token of a word the
same target, so they agree up to noise).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from pixelllm.tokenizer import starts_word


@dataclass
class Word:
    """One generated word and where the model points for it: `box` is the mean of its tokens' boxes, `index` its
    position in the caption (0-based), `token_ids` / `token_boxes` (Tx4) the tokens it was decoded from."""

    text: str
    box: list[float]  # (x0, y0, x1, y1) pixels of the original image
    index: int
    token_ids: list[int]
    token_boxes: list[list[float]]  # per token, pixels
    eos: bool = False  # the caption's final word, and the model's EOS ended it (not the token limit)

    def to_dict(self) -> dict:
        return {"index": self.index, "text": self.text, "box": self.box}


@dataclass
class Caption:
    """A caption: `text` is its words joined by spaces, `words` in order. `score`: the geometric-mean probability
    of its tokens and EOS (`caption_boxes`, dense regions, `trace`); NaN from `caption`, which streams and keeps
    none."""

    text: str
    words: list[Word]
    score: float  # geometric-mean token probability

    def to_dict(self) -> dict:
        return {"text": self.text, "score": self.score, "words": [w.to_dict() for w in self.words]}


@dataclass
class Referral:
    """Where a referring expression is: `box` (x0, y0, x1, y1) pixels of the original image, the location head's
    output at EOS; `score` the geometric-mean probability of the expression's tokens and EOS under the refer
    prompt (how readily the model says it of this image)."""

    expression: str
    box: list[float]
    score: float
    mask: np.ndarray | None = field(repr=False)  # HxW bool, original image; None if not asked for
    mask_score: float | None = None  # SAM's predicted IoU of the mask; None without a mask

    def to_dict(self) -> dict:
        return {"expression": self.expression, "box": self.box, "score": self.score, "mask_score": self.mask_score,
                "mask_area": None if self.mask is None else int(self.mask.sum())}


@dataclass
class Region:
    """A dense-captioning region: `box` (x0, y0, x1, y1) pixels of the original image, `score` its proposal score
    in [0, 1] (after NMS), `caption` the caption generated for that box."""

    box: list[float]
    score: float
    caption: Caption

    def to_dict(self) -> dict:
        return {"box": self.box, "score": self.score, "caption": self.caption.text,
                "words": [w.to_dict() for w in self.caption.words]}


class WordAssembler:
    """Turns a stream of (token, box) into completed words."""

    def __init__(self, tokenizer, width: int, height: int) -> None:
        self.tokenizer = tokenizer
        self.scale = np.array([width, height, width, height], dtype=np.float64)
        self.tokens: list[int] = []
        self.boxes: list[np.ndarray] = []
        self.count = 0

    def push(self, token: int, box: np.ndarray) -> Word | None:
        done = self.flush() if self.tokens and starts_word(self.tokenizer, token) else None
        self.tokens.append(token)
        self.boxes.append(box)
        return done

    def flush(self) -> Word | None:
        if not self.tokens:
            return None
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True).strip()
        px = [(b * self.scale).round(2).tolist() for b in self.boxes]
        mean = (np.mean(self.boxes, axis=0) * self.scale).round(2).tolist()
        tokens, self.tokens, self.boxes = self.tokens, [], []
        if not text:
            return None
        word = Word(text=text, box=mean, index=self.count, token_ids=tokens, token_boxes=px)
        self.count += 1
        return word

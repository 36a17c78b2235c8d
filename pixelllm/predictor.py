"""`PixelLLMPredictor`: the stateful-looking, concurrency-safe inference API (SAM's predictor, SAM 2's lesson).

`state = predictor.set_image(image)` encodes an image once (bounded LRU cache keyed by image hash + model
version) and returns an immutable `ImageState`; every other call takes that state, so many users can share one
predictor. Inputs and outputs are pixels of the original image, boxes (x0, y0, x1, y1).

A word may be several tokens; its box is the mean of its tokens' boxes (training gives every token of a word the
same target, so they agree up to noise). The result types (`Word`, `Caption`, `Referral`, `Region`) live in
`pixelllm.results` and are importable from here too; argument checks in `pixelllm.arguments`.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from pixelllm import adapters
from pixelllm import image as imaging
from pixelllm.arguments import MAX_TRACE_TOKENS, check_max_new_tokens, decode_options, whole_number
from pixelllm.modeling.image_encoder import ImageFeatures
from pixelllm.modeling.pixel_llm import PixelLLM
from pixelllm.results import Caption, Referral, Region, Word, WordAssembler
from pixelllm.rwlock import ReadWriteLock
from pixelllm.tokenizer import encode_text

MAX_PROMPT_TOKENS = 64


@dataclass(frozen=True)
class ImageState:
    """An encoded image. width/height: original pixels; features live on the predictor's device. `encoded_by`:
    the weights' version, dtype and device that computed them (a model cast or moved since cannot read them)."""

    key: str
    width: int
    height: int
    features: ImageFeatures = field(repr=False)
    encoded_by: str


class ServedBy(NamedTuple):
    """The weights that served a block of requests (`PixelLLMPredictor.reading`): the active LoRA adapter (None:
    the base model) and the fingerprint of its weights file ("in-memory" for one never saved; None without one)."""

    adapter: str | None
    adapter_version: str | None


class PixelLLMPredictor:
    def __init__(self, model: PixelLLM, *, device: str | torch.device | None = None,
                 dtype: torch.dtype | None = None, cache_size: int = 16) -> None:
        if model.tokenizer is None:
            raise ValueError("the model has no tokenizer; load it with PixelLLM.from_pretrained or attach one")
        self.device = torch.device(device) if device is not None else model.device
        self.model = model.to(device=self.device, dtype=dtype).eval()  # one move: never a float32 copy on a GPU
        self.tokenizer = model.tokenizer
        self.cache_size = cache_size
        self._cache: OrderedDict[tuple[str, str | None, str], ImageFeatures] = OrderedDict()
        self._cache_lock = threading.Lock()
        self._model_lock = ReadWriteLock()
        self.cache_hits = 0
        self.cache_misses = 0

    # ------------------------------------------------------------------ images
    def set_image(self, image: np.ndarray | object) -> ImageState:
        """Encode an image (HxWx3 uint8 RGB array or PIL image), or fetch its embedding from the cache."""
        arr = imaging.as_rgb_array(image)
        key = imaging.image_key(arr)
        # The key (which encoder adapter is active) is read, and the image encoded, under one read lock: an adapter
        # switch in between stored one model's features under the other's key (and returned them to the caller)
        with self._model_lock.read():
            cache_key = (self._encoder(), self._encoder_adapter_id(), key)
            with self._cache_lock:
                features = self._cache.get(cache_key)
                if features is not None:
                    self._cache.move_to_end(cache_key)
                    self.cache_hits += 1
            if features is None:
                pixels = imaging.to_model_input(arr, self.model.config.image_size).unsqueeze(0).to(self.device)
                with torch.inference_mode():
                    features = self.model.encode_image(pixels)
                with self._cache_lock:
                    self.cache_misses += 1
                    self._cache[cache_key] = features
                    while len(self._cache) > self.cache_size:
                        self._cache.popitem(last=False)
        return ImageState(key=key, width=arr.shape[1], height=arr.shape[0], features=features,
                          encoded_by=self._encoded_by(cache_key[0], cache_key[1]))

    @staticmethod
    def _encoded_by(encoder: str, encoder_adapter: str | None) -> str:
        return encoder if encoder_adapter is None else f"{encoder}|adapter={encoder_adapter}"

    def _encoder(self) -> str:
        """The weights' version, dtype and device: image features of one are not valid for another (another
        predictor may cast or move a model it shares with this one)."""
        return f"{self.model.version}|{self.model.dtype}|{self.model.device}"

    # ------------------------------------------------------------------ prompts
    def _norm(self, state: ImageState) -> np.ndarray:
        return np.array([state.width, state.height, state.width, state.height], dtype=np.float64)

    def _prompt_ids(self, text: str, what: str) -> list[int]:
        """Token ids of a text prompt or referring expression; refused when longer than the model reads (the
        rest would be ignored while the whole text is echoed and logged)."""
        ids = encode_text(self.tokenizer, text, eos=False)
        if len(ids) > MAX_PROMPT_TOKENS:
            raise ValueError(f"{what} is {len(ids)} tokens long; the model reads at most {MAX_PROMPT_TOKENS} "
                             "(shorten it)")
        return ids

    def check_text_prompt(self, text: str | None) -> None:
        """ValueError for a text prompt a caption call would refuse (over the limits of `image.check_text`, or
        longer than the model reads), so that a caller can refuse it before it starts showing anything."""
        text = imaging.check_text(text)
        if text is not None:
            self._prompt_ids(text, "the text prompt")

    def _text_ids(self, text: str | None, batch: int) -> torch.Tensor | None:
        text = imaging.check_text(text)
        if text is None:
            return None
        ids = self._prompt_ids(text, "the text prompt")
        return torch.tensor([ids], device=self.device).expand(batch, -1)

    def _prefix(self, state: ImageState, *, points=None, point_labels=None, box=None, text=None):
        self._check_state(state)
        kwargs: dict = {}
        if box is not None:
            b = imaging.check_box(box, state.width, state.height) / self._norm(state)
            kwargs["boxes"] = torch.tensor(b[None], dtype=torch.float32, device=self.device)
        raw = None if points is None else imaging.numbers(points, "the point prompt", "a list of [x, y] pixel pairs")
        if raw is not None and raw.size:  # an empty list is no point prompt
            pts, lab = imaging.check_points(raw, point_labels, state.width, state.height)
            pts = pts / self._norm(state)[:2]
            kwargs["points"] = torch.tensor(pts[None], dtype=torch.float32, device=self.device)
            kwargs["point_labels"] = torch.tensor(lab[None], device=self.device)
        else:
            imaging.check_no_labels(point_labels)
        return self.model.encode_prefix(state.features, text_ids=self._text_ids(text, 1), **kwargs)

    def _check_state(self, state: ImageState) -> None:
        """Call it holding the model lock (an adapter switch may change which features are valid)."""
        if state.encoded_by != self._encoded_by(self._encoder(), self._encoder_adapter_id()):
            raise ValueError("this image was encoded by another model version, dtype or device (or image-encoder "
                             "adapter): call set_image again")

    # ------------------------------------------------------------------ captioning
    def stream_caption(self, state: ImageState, *, points=None, point_labels=None, box=None, text: str | None = None,
                       max_new_tokens: int | None = None, do_sample: bool = False, temperature: float = 1.0,
                       top_p: float = 1.0, seed: int | None = None, repetition_penalty: float | None = None
                       ) -> Iterator[Word]:
        """Yield words one by one as they are decoded, each with its box (pixels). Prompts: points (Nx2 pixels)
        with labels (1/0), or a box (x0, y0, x1, y1) pixels, or neither (global box); optional text prompt.
        repetition_penalty: None = the checkpoint's default (`config.repetition_penalty`).
        The stream holds the model's read lock until it ends: a stream left unfinished blocks `set_adapter` /
        `load_adapter` (in the same thread, for ever), so `close()` one you stop reading."""
        if repetition_penalty is None:
            repetition_penalty = self.model.config.repetition_penalty
        options = decode_options(max_new_tokens, do_sample, temperature, top_p, seed, repetition_penalty)
        with self._model_lock.read():
            with torch.inference_mode():
                prefix = self._prefix(state, points=points, point_labels=point_labels, box=box, text=text)
                steps = self.model.stream(prefix, **options)
            words = WordAssembler(self.tokenizer, state.width, state.height)
            saw_eos = False
            while True:
                with torch.inference_mode():  # per step: the generator may resume on another thread
                    item = next(steps, None)
                if item is None:
                    break
                step, boxes = item
                token = int(step.tokens[0])
                if token in (self.model.config.eos_token_id, self.model.config.pad_token_id):
                    saw_eos = saw_eos or token == self.model.config.eos_token_id
                    continue
                word = words.push(token, boxes[0].float().cpu().numpy())
                if word is not None:
                    yield word
            last = words.flush()
            if last is not None:
                last.eos = saw_eos
                yield last

    def caption(self, state: ImageState, **kwargs) -> Caption:
        words = list(self.stream_caption(state, **kwargs))
        return Caption(text=" ".join(w.text for w in words), words=words, score=float("nan"))

    def caption_boxes(self, state: ImageState, boxes, *, text: str | None = None, max_new_tokens: int | None = None,
                      ) -> list[Caption]:
        """Location-conditioned captions for K boxes (Kx4 pixels) in one batched decoding pass (greedy)."""
        max_new_tokens = check_max_new_tokens(max_new_tokens)
        arr = imaging.numbers(boxes, "boxes", "K boxes of 4 numbers (x0, y0, x1, y1)")
        if arr.size % 4:
            raise ValueError(f"boxes must be K boxes of 4 numbers (x0, y0, x1, y1), got {arr.size} numbers")
        arr = arr.reshape(-1, 4)
        if len(arr) == 0:
            return []
        norm = np.stack([imaging.check_box(b, state.width, state.height) for b in arr]) / self._norm(state)
        with self._model_lock.read(), torch.inference_mode():
            self._check_state(state)
            prefix = self.model.encode_prefix(
                state.features, boxes=torch.tensor(norm, dtype=torch.float32, device=self.device),
                text_ids=self._text_ids(text, len(norm)))
            return self._decode_batch(prefix, len(norm), state, max_new_tokens)

    def _decode_batch(self, prefix, k: int, state: ImageState, max_new_tokens: int | None) -> list[Caption]:
        assemblers = [WordAssembler(self.tokenizer, state.width, state.height) for _ in range(k)]
        words: list[list[Word]] = [[] for _ in range(k)]
        logp = np.zeros(k)
        count = np.zeros(k)
        special = (self.model.config.eos_token_id, self.model.config.pad_token_id)
        for step, boxes in self.model.stream(prefix, max_new_tokens=max_new_tokens,
                                             repetition_penalty=self.model.config.repetition_penalty):
            tokens = step.tokens.tolist()
            box_np = boxes.float().cpu().numpy()
            lp = step.logprob.float().cpu().numpy()
            for i, token in enumerate(tokens):
                if bool(step.finished[i]):
                    continue
                logp[i] += lp[i]
                count[i] += 1
                if token in special:
                    continue
                word = assemblers[i].push(token, box_np[i])
                if word is not None:
                    words[i].append(word)
        for i, asm in enumerate(assemblers):
            last = asm.flush()
            if last is not None:
                words[i].append(last)
        return [Caption(text=" ".join(w.text for w in ws), words=ws, score=float(np.exp(logp[i] / max(count[i], 1))))
                for i, ws in enumerate(words)]

    # ------------------------------------------------------------------ controlled trace generation
    def trace(self, state: ImageState, text: str, *, points=None, point_labels=None, box=None) -> Caption:
        """Where each word of a *given* caption points (MITR's controlled trace generation, the task LBM was
        defined for): the decoder is teacher-forced on the caption under the prompt (global box by default) and
        every token's box is read from the location head, as while captioning. The caption is tokenised word
        by word, as in training, so its words are exactly its whitespace-separated pieces, each boxed by the
        mean of its tokens; score = geometric-mean probability of the caption's tokens and EOS."""
        text = imaging.check_text(text)
        if text is None:
            raise ValueError("give the caption to trace")
        words_text = text.split()
        pieces = [encode_text(self.tokenizer, word, eos=False) for word in words_text]
        if not all(pieces):
            raise ValueError("a word of the caption has no tokens in this model's vocabulary")
        ids = [t for p in pieces for t in p]
        if len(ids) > MAX_TRACE_TOKENS:
            raise ValueError(f"the caption is {len(ids)} tokens long; the limit is {MAX_TRACE_TOKENS}")
        with self._model_lock.read(), torch.inference_mode():
            prefix = self._prefix(state, points=points, point_labels=point_labels, box=box)
            boxes, logp = self.model.trace(prefix, torch.tensor(ids, dtype=torch.long, device=self.device))
        px = boxes.float().cpu().numpy() * self._norm(state)
        words, start = [], 0
        for k, (word, piece) in enumerate(zip(words_text, pieces)):
            own = px[start:start + len(piece)]
            start += len(piece)
            words.append(Word(text=word, box=own.mean(axis=0).round(2).tolist(), index=k, token_ids=piece,
                              token_boxes=own.round(2).tolist()))
        return Caption(text=text, words=words, score=float(logp.mean().exp()))

    # ------------------------------------------------------------------ referring
    def refer(self, state: ImageState, expressions: list[str], *, masks: bool | Sequence[bool] = True
              ) -> list[Referral]:
        """Box, score and SAM mask (HxW bool, original image) for each referring expression.

        ``masks``: False, or one flag per expression, skips the mask of those expressions (their ``mask`` is None;
        box and score are the same as with it): an evaluation that only reads an expression's score saves SAM's
        decoder and the upsampling. Blank expressions are dropped, with their flags."""
        if isinstance(expressions, str) or not isinstance(expressions, Iterable):  # a str: one per character
            raise ValueError(f"expressions must be a list of strings, got {type(expressions).__name__} (for one "
                             "expression, pass [expression])")
        expressions = list(expressions)
        if isinstance(masks, (bool, np.bool_)):
            wanted = [bool(masks)] * len(expressions)
        elif isinstance(masks, Iterable) and not isinstance(masks, str):
            wanted = [bool(m) for m in masks]
        else:
            raise ValueError(f"masks must be True, False or one flag per expression, got {masks!r}")
        if len(wanted) != len(expressions):
            raise ValueError(f"masks: {len(wanted)} flags for {len(expressions)} expressions")
        kept = [(t, m) for t, m in zip((imaging.check_text(e) for e in expressions), wanted) if t]
        if not kept:
            raise ValueError("type at least one referring expression (one per line)")
        texts = [t for t, _ in kept]
        mask_rows = [i for i, (_, m) in enumerate(kept) if m]
        ids = [self._prompt_ids(t, f"referring expression {i + 1}" if len(texts) > 1 else "the referring expression")
               for i, t in enumerate(texts)]
        width = max(len(x) for x in ids)
        id_tensor = torch.tensor([x + [self.model.config.pad_token_id] * (width - len(x)) for x in ids],
                                 device=self.device)
        mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids], device=self.device)
        with self._model_lock.read(), torch.inference_mode():
            self._check_state(state)
            out = self.model.refer(state.features, id_tensor, mask,
                                   mask_rows=torch.tensor(mask_rows, dtype=torch.long, device=self.device))
            segmented = F.interpolate(out["mask_logits"][:, None].float(), size=(state.height, state.width),
                                      mode="bilinear", align_corners=False)[:, 0] > 0 if mask_rows else None
        boxes = (out["boxes"].float().cpu().numpy() * self._norm(state)).round(2)
        by_row = {row: j for j, row in enumerate(mask_rows)}
        return [Referral(expression=t, box=boxes[i].tolist(), score=float(out["score"][i]),
                         mask=segmented[by_row[i]].cpu().numpy() if i in by_row else None,
                         mask_score=float(out["mask_iou"][by_row[i]]) if i in by_row else None)
                for i, t in enumerate(texts)]

    # ------------------------------------------------------------------ dense captioning
    def dense_caption(self, state: ImageState, *, max_regions: int = 16, score_threshold: float = 0.3,
                      nms_iou: float = 0.5, max_new_tokens: int | None = 24) -> list[Region]:
        """Proposals -> NMS -> one batched location-conditioned captioning pass over all kept boxes."""
        max_regions = whole_number(max_regions, "max_regions", 1, 100)
        max_new_tokens = check_max_new_tokens(max_new_tokens)
        if not 0.0 <= float(score_threshold) <= 1.0:  # also refuses NaN, which would silently keep nothing
            raise ValueError("score_threshold must be between 0 and 1")
        if not 0.0 <= float(nms_iou) <= 1.0:  # NaN suppressed nothing, a negative value all but one box
            raise ValueError("nms_iou must be between 0 and 1")
        with self._model_lock.read(), torch.inference_mode():
            self._check_state(state)
            boxes, scores = self.model.propose(state.features, top_k=int(max_regions),
                                               score_threshold=float(score_threshold), nms_iou=float(nms_iou))[0]
            if len(boxes) == 0:
                return []
            prefix = self.model.encode_prefix(state.features, boxes=boxes)
            captions = self._decode_batch(prefix, len(boxes), state, max_new_tokens)
        px = (boxes.float().cpu().numpy() * self._norm(state)).round(2)
        return [Region(box=px[i].tolist(), score=float(scores[i]), caption=captions[i]) for i in range(len(px))]

    # ------------------------------------------------------------------ adapters
    def set_adapter(self, name: str | None) -> None:
        """Switch the LoRA adapter; waits for running requests and blocks new ones meanwhile."""
        with self._model_lock.write():
            self.model.set_adapter(name)

    def load_adapter(self, directory, name: str, *, activate: bool = True) -> None:
        with self._model_lock.write():
            self.model.load_adapter(directory, name, activate=activate)
            with self._cache_lock:  # a name loaded again may bring other weights: no features cached under it
                self._cache.clear()

    @contextmanager
    def using_adapter(self, name: str | None) -> Iterator[None]:
        """Run the block's requests (from this thread) with adapter ``name`` (None = the base model), then switch
        back. Other users' requests wait until the block ends instead of being served by the wrong model."""
        with self._model_lock.write():
            previous = self.model.active_adapter
            self.model.set_adapter(name)
            try:
                yield
            finally:
                self.model.set_adapter(previous)

    @contextmanager
    def reading(self) -> Iterator[ServedBy]:
        """Hold the model for a block of calls (no adapter switch until it ends) and say which weights serve them:
        what a caller logs as the output's adapter must be read here, not from `adapter` after the calls (another
        user's `using_adapter` block may have switched it by then)."""
        with self._model_lock.read():
            name = self.model.active_adapter
            yield ServedBy(name, self._adapter_version(name))

    def _encoder_adapter(self) -> str | None:
        """The active adapter if it has LoRA layers in the image encoder (its features differ from the base
        model's, so they are cached apart); None otherwise — the usual adapters (language model, location head)
        share the base model's image features."""
        name = self.model.active_adapter
        if name is None:
            return None
        touches = any(name in layer.lora_A for layer in adapters.tuner_layers(self.model.image_encoder))
        return name if touches else None

    def _encoder_adapter_id(self) -> str | None:
        """`_encoder_adapter` with the fingerprint of its weights: an adapter loaded again under the same name
        with other weights computes other features, so states encoded before are refused."""
        name = self._encoder_adapter()
        return None if name is None else f"{name}@{self._adapter_version(name)}"

    def _adapter_version(self, name: str | None) -> str | None:
        """The fingerprint of adapter `name`'s weights file ("in-memory" for one never saved; None without one)."""
        return None if name is None else getattr(self.model, "adapter_versions", {}).get(name, "in-memory")

    @property
    def adapter(self) -> str | None:
        return self.model.active_adapter

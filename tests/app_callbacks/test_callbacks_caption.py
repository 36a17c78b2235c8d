"""The Caption tab's callbacks (pixelllm/ui/callbacks.py, decoding.py) driving a real predictor on a small random
checkpoint (the embedded checkpoint for the default max words): words stream one per update; max words, the token
budget and the model's own end; sampling, seeds, temperature, top-p and the repetition penalty reach the decoder and
are recorded; the form's numbers are read as the library reads them; Trace a typed caption.

The rest of tests/app_callbacks/: prompts and Inspect words: test_callbacks_prompts.py; opening and replacing
images: test_callbacks_images.py; Refer and Dense: test_callbacks_refer_dense.py; downloads and the store:
test_callbacks_records.py; app.py and the Model panel: test_callbacks_app.py. Fixtures: conftest.py."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
import torch

from pixelllm.ui import api, render
from pixelllm.ui import callbacks as cb
from pixelllm.ui import workspace as ws
from pixelllm.ui.decoding import decoding_options
from tests.app_callbacks.conftest import VISITOR, _loaded, _run

# ------------------------------------------------------------------------------------------ streaming, max words

def test_words_stream_one_per_update_with_gradient_colours(studio, example_images):
    session = _loaded(studio, example_images[0])
    outputs, view, _, files, _ = _run(studio, session, max_words=6)
    counts = [len(o[0]["words"]) for o in outputs]
    assert counts == [0, 1, 2, 3, 4, 5, 6, 6]
    assert all(o[2] is not None and isinstance(o[2], type(gr.skip())) for o in outputs[:-1])
    colours = [x["color"] for x in view["words"]]
    assert colours[0] == render.GRADIENT_STOPS[0] and colours[-1] == render.GRADIENT_STOPS[-1]
    assert len(set(colours)) == 6
    assert view["status"] == "done" and outputs[1][0]["status"] == "streaming"


def test_max_words_caps_the_word_count(studio, example_images, monkeypatch):
    session = _loaded(studio, example_images[0])
    pulled = []
    stream_caption = studio.predictor.stream_caption

    def counting(*args, **kwargs):
        for word in stream_caption(*args, **kwargs):
            pulled.append(word.text)
            yield word

    monkeypatch.setattr(studio.predictor, "stream_caption", counting)
    outputs, view, caption, files, _ = _run(studio, session, max_words=3)
    assert len(pulled) == 3  # knowing the caption was cut decodes no word beyond the limit
    assert len(view["words"]) == 3 and len(caption.split()) == 3
    _, long_view, _, _, _ = _run(studio, session, max_words=9)
    assert len(long_view["words"]) == 9  # the cap, not the model, ended both captions
    # ... and the user is told so: status line, download and store
    assert "stopped at the max-words limit" in view["message"]
    assert json.loads(Path(files[0]).read_text())["cut"] is True
    assert studio.store.list_generations(task="caption", limit=1)[0]["extra"]["cut"] is True


@pytest.fixture(scope="module")
def embedded_studio():
    from pixelllm import PixelLLM, PixelLLMPredictor
    from tests.conftest import EMBEDDED_CHECKPOINT

    predictor = PixelLLMPredictor(PixelLLM.from_pretrained(EMBEDDED_CHECKPOINT), device="cpu")
    return ws.Studio(predictor=predictor, checkpoint=str(EMBEDDED_CHECKPOINT), min_word_interval=0.0)


def test_the_default_max_words_lets_the_model_end_its_narrative(embedded_studio, example_images):
    """The "Max words" default is the checkpoint's token limit, so a narrative ends with the model's own EOS:
    example 1 holds four objects, which the embedded model narrates in more than 40 words (the old fixed default
    of 40 cut it mid-sentence). One word fewer than the narrative is reported as cut; the whole one is not."""
    studio = embedded_studio
    assert studio.default_max_words == studio.model.config.max_new_tokens
    session = _loaded(studio, example_images[1])
    _, view, caption, files, _ = _run(studio, session, max_words=studio.default_max_words)
    words = caption.split()
    assert len(words) > 40 and caption.endswith("."), caption
    assert "stopped" not in view["message"] and json.loads(Path(files[0]).read_text())["cut"] is False
    streamed = studio.predictor.caption(studio.predictor.set_image(session.array)).words
    assert [w.text for w in streamed] == words
    assert [w.eos for w in streamed] == [False] * (len(words) - 1) + [True]  # the model ended it, after the last
    budget = studio.predictor.caption(studio.predictor.set_image(session.array), max_new_tokens=6).words
    assert len(budget) < len(words) and not any(w.eos for w in budget)  # the token limit ended it
    _, short_view, short, files, _ = _run(studio, session, max_words=len(words) - 1)
    assert short.split() == words[:-1]
    assert "stopped at the max-words limit" in short_view["message"]
    assert json.loads(Path(files[0]).read_text())["cut"] is True


def test_a_caption_the_token_budget_ends_is_reported_cut():
    """The stream's token budget (4 x max words + 8) can end a caption of long garbled words (sampling at a high
    temperature) before max words is reached: that is a cut too, not the model's end."""
    from pixelllm.predictor import Word
    from pixelllm.ui.decoding import WordStream

    class Budgeted:  # streams three words, then the token limit (no EOS)
        def set_image(self, array):
            return None

        @contextlib.contextmanager
        def reading(self):
            yield None

        def stream_caption(self, state, **kwargs):
            yield from (Word(text=t, box=[0, 0, 1, 1], index=i, token_ids=[i], token_boxes=[], eos=False)
                        for i, t in enumerate("abc"))

    options = {"max_words": 10, "do_sample": True, "temperature": 5.0, "top_p": 1.0, "seed": 1,
               "repetition_penalty": 1.0}
    stream = WordStream(ws.Studio(predictor=Budgeted()), np.zeros((4, 4, 3), np.uint8), options=options)
    assert [w["text"] for w in stream] == ["a", "b", "c"] and stream.cut  # was: not cut


def test_a_text_prompt_too_long_for_the_model_is_refused_before_anything_is_shown(studio, example_images):
    """The token check ran inside the stream, after the "Generating…" frame: the error toast came, but the viewer
    stayed on "Generating…" with the previous caption wiped."""
    session = _loaded(studio, example_images[0])
    updates = cb.generate(studio, session, "a " * 80, 12, False, 1.0, 1.0, None, VISITOR)
    with pytest.raises(gr.Error, match="the text prompt is 80 tokens long; the model reads at most 64"):
        next(updates)


# ------------------------------------------------------------------------------------------ decoding options

def test_sampling_with_a_seed_is_reproducible_and_differs_from_greedy(studio, example_images):
    session = _loaded(studio, example_images[0])
    _, greedy, *_ = _run(studio, session, max_words=8)
    _, a, *_ = _run(studio, session, max_words=8, sampling=True, seed=7)
    _, b, *_ = _run(studio, session, max_words=8, sampling=True, seed=7)
    _, c, *_ = _run(studio, session, max_words=8, sampling=True, seed=8)
    texts = [[x["text"] for x in v["words"]] for v in (greedy, a, b, c)]
    assert texts[1] == texts[2]
    assert texts[1] != texts[0]
    assert texts[1] != texts[3]


def test_sampling_without_seed_records_the_drawn_seed(studio, example_images):
    session = _loaded(studio, example_images[0])
    _, view, _, files, session = _run(studio, session, max_words=5, sampling=True, seed=None)
    record = json.loads(Path(files[0]).read_text())
    seed = record["decoding"]["seed"]
    assert isinstance(seed, int) and f"seed {seed}" in view["message"]
    _, again, *_ = _run(studio, session, max_words=5, sampling=True, seed=seed)
    assert [x["text"] for x in again["words"]] == [x["text"] for x in view["words"]]
    _, drawn, _, files, _ = _run(studio, session, max_words=5, sampling=True, seed=-1)  # the API's "random"
    assert json.loads(Path(files[0]).read_text())["decoding"]["seed"] >= 0


@pytest.mark.parametrize("max_words, seed", [
    (3.5, None), (True, None), (float("inf"), None), (float("nan"), None),  # 3.5 was 3, True 1, inf an OverflowError
    (5, 1.5), (5, True), (5, float("inf")), (5, "abc"), (5, -2), (5, 2**63),  # True was seed 1
], ids=["words-3.5", "words-true", "words-inf", "words-nan", "seed-1.5", "seed-true", "seed-inf", "seed-abc",
        "seed--2", "seed-2^63"])
def test_decoding_options_read_whole_numbers_as_the_library_does(max_words, seed):
    """The form's max words and seed are read by the library's `whole_number`: max words 3.5 was cut to 3, True
    taken as 1 word and infinity an OverflowError (a server error, not a message); seed True was 1."""
    what = "seed" if seed is not None else "max words"
    with pytest.raises(ValueError, match=f"^(the )?{what} must be"):
        decoding_options(max_words, True, 1.0, 1.0, seed, default_words=8)


def test_decoding_options_keep_big_seeds_exactly_and_draw_one_for_a_blank():
    """Seeds went through float: 2^53 + 1 became 2^53 and 2^63 - 1 (in range) was refused as 2^63; a blank seed
    ('' from an API caller) was passed on as '' and the predictor refused it instead of drawing one."""
    for seed, kept in ((2**53 + 1, 2**53 + 1), (2**63 - 1, 2**63 - 1), (7.0, 7), ("7", 7), (0, 0)):
        assert decoding_options(5, True, 1.0, 1.0, seed, default_words=8)["seed"] == kept, seed
    for blank in ("", "  ", None, -1, "-1"):
        drawn = decoding_options(5, True, 1.0, 1.0, blank, default_words=8)["seed"]
        assert isinstance(drawn, int) and drawn >= 0, blank
    assert decoding_options("3.0", False, 1.0, 1.0, None, default_words=8)["max_words"] == 3  # "3.0" was refused
    with pytest.raises(ValueError, match="max words must be between 1 and 128"):  # the UI's own messages stay
        decoding_options(0, False, 1.0, 1.0, None, default_words=8)


def test_the_checkpoints_repetition_penalty_reaches_the_decoder_and_is_recorded(studio, example_images, monkeypatch):
    """The app decodes with the checkpoint's default penalty (`config.repetition_penalty`; the embedded model ships
    1.1; its effect on tokens: tests/model/test_model_decoding.py) and records it beside the other decoding settings,
    in the download and in the store."""
    session = _loaded(studio, example_images[0])
    monkeypatch.setattr(studio.model.config, "repetition_penalty", 1.5)
    penalties: list[float] = []
    original = studio.model.stream

    def spy(prefix, **kwargs):
        penalties.append(kwargs.get("repetition_penalty"))
        return original(prefix, **kwargs)

    monkeypatch.setattr(studio.model, "stream", spy)
    _, view, _, files, session = _run(studio, session, max_words=12)
    assert penalties == [1.5]
    record = json.loads(Path(files[0]).read_text())
    assert record["decoding"]["repetition_penalty"] == 1.5
    assert studio.store.get_generation(record["generation_id"])["extra"]["decoding"]["repetition_penalty"] == 1.5

    # the Decoding slider and the API's repetition_penalty override it for one call; out of range is a user error
    *_, (_, _, files, _) = cb.generate(studio, session, None, 5, False, 1.0, 1.0, None, VISITOR, repetition_penalty=1.0)
    assert json.loads(Path(files[0]).read_text())["decoding"]["repetition_penalty"] == 1.0
    cap = api.caption(studio, str(example_images[0]), "", "", 5, False, 1, 1, None, repetition_penalty=1.25)
    assert cap["decoding"]["repetition_penalty"] == 1.25
    assert penalties == [1.5, 1.0, 1.25]
    for bad in (3, "much"):
        with pytest.raises(gr.Error, match="repetition penalty"):
            list(cb.generate(studio, session, None, 5, False, 1.0, 1.0, None, VISITOR, repetition_penalty=bad))
    assert len(penalties) == 3  # refused before decoding


def test_temperature_and_top_p_reach_the_sampler(studio, example_images):
    session = _loaded(studio, example_images[0])
    _, greedy, *_ = _run(studio, session, max_words=8)
    # top-p this small keeps only the most likely token: sampling then equals greedy decoding.
    _, nucleus, *_ = _run(studio, session, max_words=8, sampling=True, top_p=1e-6, seed=3, temperature=1.0)
    assert [x["text"] for x in nucleus["words"]] == [x["text"] for x in greedy["words"]]
    with pytest.raises(gr.Error, match="temperature"):
        _run(studio, session, sampling=True, temperature=9.0, seed=1)


# ------------------------------------------------------------------------------------------ trace a typed caption

def test_tracing_the_models_own_caption_gives_back_the_boxes_it_streamed(studio, example_images, prefix_calls):
    """Trace teacher-forces a typed caption through the decoder under the current prompt; typed back, the greedy
    caption must get the word boxes it was streamed with (same location head, same prompt, same tokens)."""
    session = _loaded(studio, example_images[0])
    session, _ = ws.drag_box(session, {"box": [20, 30, 150, 120]})
    _, gen_view, caption, _, session = _run(studio, session, max_words=8)
    view, text, files, session = cb.trace(studio, session, "  " + caption.replace(" ", "   ") + "\n", VISITOR)
    assert text == caption and [w["text"] for w in view["words"]] == caption.split()
    w, h = session.image["width"], session.image["height"]
    torch.testing.assert_close(prefix_calls[-1]["boxes"], torch.tensor([[20 / w, 30 / h, 150 / w, 120 / h]]),
                               atol=1e-6, rtol=0)
    np.testing.assert_allclose([x["box"] for x in view["words"]], [x["box"] for x in gen_view["words"]], atol=0.5)
    assert view["box"] == [20.0, 30.0, 150.0, 120.0] and view["status"] == "done"

    other, *_ = cb.trace(studio, session, "the small green star", VISITOR)  # another caption, other boxes
    assert [x["text"] for x in other["words"]] == ["the", "small", "green", "star"]
    assert [x["box"] for x in other["words"]] != [x["box"] for x in view["words"][:4]]


def test_a_traced_caption_is_logged_downloadable_and_correctable(studio, example_images):
    from pixelllm.ui import annotate as an

    session = _loaded(studio, example_images[2])
    session, _ = ws.click(session, "Positive point", {"x": 30, "y": 200})
    view, text, files, session = cb.trace(studio, session, "a large red circle", VISITOR)
    json_path, png_path = (Path(f) for f in files)
    assert json_path.name == "trace.json" and png_path.name == "trace_overlay.png"
    record = json.loads(json_path.read_text())
    assert record["task"] == "trace" and record["text"] == text == "a large red circle"
    assert [x["box"] for x in record["words"]] == [x["box"] for x in view["words"]]
    assert 0 < record["score"] <= 1 and record["prompts"]["points"] == [[30.0, 200.0]]
    row = studio.store.list_generations()[0]
    assert row["task"] == "caption" and row["extra"]["traced"] is True and row["extra"]["text"] == text
    assert row["words"] == text.split() and row["boxes"] == [x["box"] for x in view["words"]]
    assert row["prompts"]["points"] == [[30.0, 200.0]] and row["prompts"]["text"] is None
    assert session.last["generation_id"] == row["id"]
    _, doc_view = an.open_current(studio, session, None)  # the Annotate tab opens it for correction
    assert [x["text"] for x in doc_view["words"]] == text.split()

    with pytest.raises(gr.Error, match="caption to trace"):
        cb.trace(studio, session, "   ", VISITOR)
    with pytest.raises(gr.Error, match="image first"):
        cb.trace(studio, None, "a red circle", VISITOR)
    assert len(studio.store.list_generations()) == 1

    traced = api.trace(studio, str(example_images[2]), '{"box": [10, 20, 110, 90]}', "the blue square")
    json.loads(json.dumps(traced, allow_nan=False))
    assert traced["task"] == "trace" and [x["text"] for x in traced["words"]] == ["the", "blue", "square"]
    assert traced["prompts"]["box"] == [10.0, 20.0, 110.0, 90.0] and traced["generation_id"] is not None
    with pytest.raises(gr.Error, match="caption to trace"):
        api.trace(studio, str(example_images[2]), "", "")

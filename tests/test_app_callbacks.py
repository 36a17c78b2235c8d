"""The studio's callbacks (pixelllm/ui/workspace.py, pixelllm/ui/callbacks.py) driving a real predictor on a small
random checkpoint: prompts and decoding options reach the decoder, user mistakes become gr.Error, downloads carry pixel
coordinates of the image as sent, and every output shown is logged to the annotation store."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import warnings
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
import torch
from PIL import Image

from pixelllm.store import StoreError
from pixelllm.ui import api, records, render
from pixelllm.ui import callbacks as cb
from pixelllm.ui import workspace as ws
from pixelllm.ui.decoding import decoding_options

torch.set_num_threads(1)


@pytest.fixture
def studio(small_predictor, annotation_store, tmp_path):
    return ws.Studio(predictor=small_predictor, store=annotation_store, checkpoint="tests/small-checkpoint",
                     min_word_interval=0.0, download_root=tmp_path / "downloads")


@pytest.fixture
def prefix_calls(small_pixelllm, monkeypatch):
    """Record the keyword arguments of every PixelLLM.encode_prefix call (what reaches the language model)."""
    calls: list[dict] = []
    original = small_pixelllm.encode_prefix

    def spy(features, **kwargs):
        calls.append({k: (v.detach().clone() if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()})
        return original(features, **kwargs)

    monkeypatch.setattr(small_pixelllm, "encode_prefix", spy)
    return calls


def _loaded(studio, path):
    session, cap, ref, dense = ws.load_image(studio, str(path), None)
    return session


VISITOR = records.Visitor("test")  # the browser session the outputs are logged under


def _run(studio, session, *, text=None, max_words=12, sampling=False, temperature=1.0, top_p=1.0, seed=None):
    outputs = list(cb.generate(studio, session, text, max_words, sampling, temperature, top_p, seed, VISITOR))
    view, caption, files, session = outputs[-1]
    return outputs, view, caption, files, session


def _png(path: Path, width: int, height: int, seed: int = 0) -> Path:
    arr = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path)
    return path


# ------------------------------------------------------------------------------------------ prompts → decoder

def test_box_prompt_from_two_clicks_reaches_the_decoder(studio, example_images, prefix_calls):
    session = _loaded(studio, example_images[0])
    _, glob_view, _, _, session = _run(studio, session)
    assert prefix_calls[-1].get("boxes") is None and prefix_calls[-1].get("points") is None

    session, view = ws.click(session, "Box (2 clicks)", {"x": 200, "y": 60})
    assert view["pending"] == [200.0, 60.0] and view["box"] is None
    session, view = ws.click(session, "Box (2 clicks)", {"x": 90, "y": 150})  # corners in any order
    assert view["box"] == [90.0, 60.0, 200.0, 150.0] and view["pending"] is None
    _, box_view, _, _, session = _run(studio, session)

    w, h = session.image["width"], session.image["height"]
    sent = prefix_calls[-1]["boxes"]
    torch.testing.assert_close(sent, torch.tensor([[90 / w, 60 / h, 200 / w, 150 / h]]), atol=1e-6, rtol=0)
    assert [x["box"] for x in box_view["words"]] != [x["box"] for x in glob_view["words"]]
    assert box_view["box"] == [90.0, 60.0, 200.0, 150.0]  # the prompt stays drawn with the result


def test_points_with_labels_and_text_prompt_reach_the_decoder(studio, example_images, prefix_calls):
    session = _loaded(studio, example_images[1])
    session, _ = ws.click(session, "Positive point", {"x": 40, "y": 50})
    session, view = ws.click(session, "Negative point", {"x": 120.5, "y": 30})
    assert view["points"] == [[40.0, 50.0, 1], [120.5, 30.0, 0]]
    _run(studio, session, text="In this picture")
    call = prefix_calls[-1]
    w, h = session.image["width"], session.image["height"]
    torch.testing.assert_close(call["points"], torch.tensor([[[40 / w, 50 / h], [120.5 / w, 30 / h]]]).float())
    assert call["point_labels"].tolist() == [[1, 0]]
    ids = studio.predictor.tokenizer(" ".join("In this picture".split()), add_special_tokens=False)["input_ids"]
    assert call["text_ids"][0].tolist() == ids


def test_drag_undo_and_clear(studio, example_images):
    session = _loaded(studio, example_images[0])
    session, view = ws.drag_box(session, {"box": [10, 20, 110, 90]})
    assert view["box"] == [10.0, 20.0, 110.0, 90.0]
    session, view = ws.click(session, "Positive point", {"x": 5, "y": 5})
    session, view = ws.click(session, "Box (2 clicks)", {"x": 50, "y": 50})
    session, view = ws.undo_prompt(session)  # first undo drops the half-drawn box
    assert view["pending"] is None and len(view["points"]) == 1
    session, view = ws.undo_prompt(session)
    assert view["points"] == [] and view["box"] == [10.0, 20.0, 110.0, 90.0]
    session, view = ws.clear_prompts(session)
    assert view["points"] == [] and view["box"] is None
    assert view["image"]["src"] is None  # prompt edits never resend the picture


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


def _only_skips(updates) -> bool:
    rest = list(updates)
    return len(rest) == 1 and all(isinstance(x, type(gr.skip())) for x in rest[0])


def test_a_caption_abandoned_for_another_image_logs_the_words_shown(studio, example_images):
    """Picking another image while a caption streams stops the stream; the words the page had received were an
    output shown to the user, so they are logged, flagged abandoned and cut, under the image they describe."""
    session = _loaded(studio, example_images[0])
    updates = cb.generate(studio, session, None, 12, False, 1.0, 1.0, None, VISITOR)
    shown = [next(updates) for _ in range(4)][-1]  # "Generating…", then three words
    new_session = ws.load_image(studio, str(example_images[1]), session)[0]
    assert session.replaced and not new_session.replaced
    assert _only_skips(updates)  # nothing more reaches the page
    row = studio.store.list_generations(task="caption", limit=1)[0]
    assert row["words"] == shown[1].split() and len(row["words"]) == 3
    old_sha, new_sha = (hashlib.sha256(render.png_bytes(s.array)).hexdigest() for s in (session, new_session))
    assert row["image_sha"] == old_sha != new_sha
    assert row["extra"]["abandoned"] and row["extra"]["cut"] is True


def test_the_change_events_of_one_upload_keep_one_session(studio, example_images):
    """Gradio 6 fires the image's change two or three times for one upload over another image: two at once (both
    carrying the page's old session), one after the first answer (carrying the new one). They used to make a new
    Session each, so a point clicked as soon as the new image showed vanished again. The same file keeps the
    session it made; another file still replaces it."""
    from concurrent.futures import ThreadPoolExecutor

    old = _loaded(studio, example_images[0])
    upload = str(example_images[1])
    with ThreadPoolExecutor(2) as pool:  # the two events fired at once
        answers = list(pool.map(lambda _: ws.load_image(studio, upload, old), range(2)))
    first, second = answers[0][0], answers[1][0]
    assert first is second and old.replaced and not first.replaced
    assert sum(isinstance(a[1], dict) and "image" in a[1] for a in answers) == 1  # one set of views, one skipped
    session, view = ws.click(first, "positive", {"x": 40, "y": 50})  # the user's click on the new image
    again = ws.load_image(studio, upload, old)  # the late event, still with the old session ...
    late = ws.load_image(studio, upload, session)  # ... or with the new one
    assert again[0] is late[0] is session and late[1:] == (gr.skip(),) * 3
    assert session.prompts == [{"kind": "point", "xy": [40.0, 50.0], "label": 1}] and not session.replaced
    other = ws.load_image(studio, str(example_images[2]), session)[0]  # another image replaces it as before
    assert other is not session and session.replaced and other.prompts == []


def test_an_image_refused_leaves_the_page_working_on_its_image(studio, example_images, tmp_path):
    """A file refused (not an image, too large) marked the page's session replaced before decoding: the page kept
    it, so every click was dropped and Generate stuck at "Generating…"; picking the image shown again then kept
    that dead session (the same file keeps its session). A refused file leaves the session as it was."""
    shown = str(example_images[0])
    session = _loaded(studio, shown)
    bad = tmp_path / "not-an-image.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(gr.Error, match="not an image"):
        ws.load_image(studio, str(bad), session)
    assert not session.replaced
    again = ws.load_image(studio, shown, session)[0]  # the user picks the image shown again
    assert again is session and not again.replaced
    _, view = ws.for_the_shown_image(ws.click)(again, "Positive point", {"x": 40, "y": 50})
    assert view != gr.skip() and again.prompts == [{"kind": "point", "xy": [40.0, 50.0], "label": 1}]
    assert list(cb.generate(studio, again, None, 3, False, 1.0, 1.0, None, VISITOR))[-1][0]["status"] == "done"


def test_a_load_that_failed_midway_is_not_kept_for_the_same_file(studio, example_images, monkeypatch):
    """The encoder failing on another image (a server fault, after the old session was given up): picking the image
    shown again opens it afresh instead of keeping the given-up session (clicks dropped, Generate stuck)."""
    shown = str(example_images[0])
    session = _loaded(studio, shown)
    encode = studio.predictor.set_image
    monkeypatch.setattr(studio.predictor, "set_image", lambda image: (_ for _ in ()).throw(RuntimeError("OOM")))
    with pytest.raises(RuntimeError):
        ws.load_image(studio, str(example_images[1]), session)
    monkeypatch.setattr(studio.predictor, "set_image", encode)
    again, view, *_ = ws.load_image(studio, shown, session)
    assert not again.replaced and isinstance(view, dict) and view.get("image")


def test_a_caption_stream_closed_midway_logs_the_words_shown(studio, example_images):
    """The page went away mid-caption (gradio closes or drops the generator): the words shown are logged too."""
    session = _loaded(studio, example_images[0])
    updates = cb.generate(studio, session, None, 12, False, 1.0, 1.0, None, VISITOR)
    shown = [next(updates) for _ in range(3)][-1]  # "Generating…", then two words
    updates.close()
    row = studio.store.list_generations(task="caption", limit=1)[0]
    assert row["words"] == shown[1].split() and len(row["words"]) == 2
    assert row["extra"]["abandoned"] == "the stream was closed" and row["extra"]["cut"] is True


def test_a_handler_finishing_after_a_new_image_leaves_the_page_to_it(studio, example_images, monkeypatch):
    """Referring (Dense, Trace, a prompt click) still running when the user picks another image: its result wrote
    the previous image's session back into the page, and the next caption then streamed nothing (the session was
    marked replaced), stuck on "Generating…". Its updates are now dropped; the work is still logged."""
    session = _loaded(studio, example_images[0])
    refer = studio.predictor.refer

    def the_user_moves_on_meanwhile(*args, **kwargs):
        ws.load_image(studio, str(example_images[1]), session)
        return refer(*args, **kwargs)

    monkeypatch.setattr(studio.predictor, "refer", the_user_moves_on_meanwhile)
    on_refer = ws.for_the_shown_image(lambda state, text: cb.refer(studio, state, text))
    out = on_refer(session, "the red circle")
    assert session.replaced and len(out) == 3 and all(isinstance(x, type(gr.skip())) for x in out)
    assert len(studio.store.list_generations(task="refer")) == 1  # the request was served: still logged
    monkeypatch.undo()
    fresh = _loaded(studio, example_images[0])
    assert on_refer(fresh, "the red circle")[0] is fresh  # an image still shown gets its updates

    def streams(state):
        yield state, 1
        state.replaced = True
        yield state, 2

    assert list(ws.for_the_shown_image(streams)(fresh)) == [(fresh, 1), (gr.skip(), gr.skip())]


def test_a_text_prompt_too_long_for_the_model_is_refused_before_anything_is_shown(studio, example_images):
    """The token check ran inside the stream, after the "Generating…" frame: the error toast came, but the viewer
    stayed on "Generating…" with the previous caption wiped."""
    session = _loaded(studio, example_images[0])
    updates = cb.generate(studio, session, "a " * 80, 12, False, 1.0, 1.0, None, VISITOR)
    with pytest.raises(gr.Error, match="the text prompt is 80 tokens long; the model reads at most 64"):
        next(updates)


def test_a_region_caption_abandoned_for_another_image_logs_the_words_shown(studio, example_images):
    """As in the Caption tab: the Dense tab's region caption, stopped by a new image, logs what it had shown."""
    session = _loaded(studio, example_images[0])
    session, _, _ = cb.dense(studio, session, 0.0, 2)
    @ws.for_the_shown_image
    def on_select(state, data):  # as layout.py wires it
        yield from cb.dense_select(studio, state, data, VISITOR)

    updates = on_select(session, {"i": 0})
    shown = [next(updates) for _ in range(3)][-1]  # "Tracing…", then two words
    ws.load_image(studio, str(example_images[1]), session)
    assert _only_skips(updates)
    row = studio.store.list_generations(task="caption", limit=1)[0]
    assert row["words"] == shown[2].split() and len(row["words"]) == 2
    assert row["extra"]["abandoned"] == "another image was opened" and row["extra"]["region_box"]
    assert len(studio.store.list_generations(task="caption")) == 1  # logged once


def test_a_new_image_waits_for_the_caption_streaming_on_the_old_one_to_stop(studio, example_images):
    """The page's image change and a streaming caption are two events: a frame the caption sent just before the
    change could reach the page after the new image's views and put the old picture back. load_image now returns
    only once the old stream has ended (its last update a no-op)."""
    import threading

    studio.min_word_interval = 0.05
    session = _loaded(studio, example_images[0])
    seen: list = []
    two_words = threading.Event()

    def page():
        for update in cb.generate(studio, session, None, 40, False, 1.0, 1.0, None, VISITOR):
            seen.append(update)
            if len(seen) >= 3:
                two_words.set()

    reader = threading.Thread(target=page)
    reader.start()
    assert two_words.wait(60)
    ws.load_image(studio, str(example_images[1]), session)
    assert session.streams == 0 and all(isinstance(x, type(gr.skip())) for x in seen[-1])
    reader.join(10)
    assert studio.store.list_generations(task="caption", limit=1)[0]["extra"]["abandoned"]


def test_a_caption_abandoned_before_its_first_word_logs_nothing(studio, example_images):
    session = _loaded(studio, example_images[0])
    updates = cb.generate(studio, session, None, 12, False, 1.0, 1.0, None, VISITOR)
    next(updates)  # "Generating…"
    ws.load_image(studio, str(example_images[1]), session)
    assert _only_skips(updates)
    assert studio.store.list_generations() == []


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


@pytest.mark.parametrize("max_regions", [5.9, True, float("inf"), "abc", None])
def test_dense_max_regions_is_read_as_a_whole_number(max_regions):
    """Max regions went through int(): 5.9 became 5, True 1 region, and infinity an OverflowError (a server error,
    not a message)."""
    with pytest.raises(ValueError, match="^max regions must be a whole number"):
        cb.dense_options(0.3, max_regions)
    assert cb.dense_options("0.3", "7") == (0.3, 7) and cb.dense_options(0.3, 7.0) == (0.3, 7)


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
    1.1; its effect on tokens: tests/test_model.py) and records it beside the other decoding settings, in the
    download and in the store."""
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


def test_prompt_edits_wait_for_the_caption_streaming(studio, example_images):
    """A point clicked (or Undo, Clear, a box) while a caption streamed was drawn beside the finished caption, made
    without it (its download and store row had the true prompts). Prompt edits are refused with a message until the
    caption is kept, so the finished view shows the prompts it was made with; a stream that ends early frees them.
    Trace (the typed caption, same view) waits too."""
    session = _loaded(studio, example_images[0])
    session, _ = ws.click(session, "Positive point", {"x": 40, "y": 50})
    edits = [lambda: ws.click(session, "Positive point", {"x": 100, "y": 100}),
             lambda: ws.click(session, "Box (2 clicks)", {"x": 10, "y": 10}),
             lambda: ws.drag_box(session, {"box": [10, 20, 110, 90]}),
             lambda: ws.undo_prompt(session), lambda: ws.clear_prompts(session)]
    with contextlib.closing(cb.generate(studio, session, None, 6, False, 1.0, 1.0, None, VISITOR)) as updates:
        [next(updates) for _ in range(3)]  # "Generating…", then two words
        for edit in edits:
            with pytest.raises(gr.Error, match="A caption is streaming with the prompts shown: wait for it to finish"):
                edit()
        with pytest.raises(gr.Error, match="A caption is streaming: wait for it to finish, then trace"):
            cb.trace(studio, session, "a red circle", VISITOR)  # its frames would overwrite the trace
        view = list(updates)[-1][0]
    row = studio.store.list_generations(task="caption", limit=1)[0]
    assert view["status"] == "done" and view["points"] == [[40.0, 50.0, 1]]
    assert row["prompts"]["points"] == [[40.0, 50.0]] and view["box"] is None and view["pending"] is None
    session, view = ws.click(session, "Positive point", {"x": 100, "y": 100})  # the caption is kept: edits apply
    assert view["points"] == [[40.0, 50.0, 1], [100.0, 100.0, 1]]
    updates = cb.generate(studio, session, None, 6, False, 1.0, 1.0, None, VISITOR)
    [next(updates) for _ in range(2)]
    updates.close()  # the page went away mid-caption
    assert ws.undo_prompt(session)[1]["points"] == [[40.0, 50.0, 1]]


# ------------------------------------------------------------------------------------------ inspector

def test_inspect_lists_the_words_whose_boxes_cover_a_pixel(studio, example_images):
    session = _loaded(studio, example_images[0])
    _, view, _, _, session = _run(studio, session, max_words=6)
    box = view["words"][2]["box"]
    x, y = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    session, inspected = ws.click(session, "Inspect words", {"x": x, "y": y})
    expected = [i for i, w in enumerate(view["words"])
                if w["box"][0] <= x <= w["box"][2] and w["box"][1] <= y <= w["box"][3]]
    assert 2 in inspected["inspect"]["hits"] and inspected["inspect"]["hits"] == expected
    session, corner = ws.click(session, "Inspect words", {"x": 0, "y": 0})
    assert corner["inspect"]["hits"] == ws.words_at(view["words"], 0, 0)
    assert session.prompts == []  # inspecting does not add prompts


def test_a_pixel_inspected_while_a_caption_streams_reads_the_words_shown(studio, example_images):
    """Inspect words during a stream computed the hits from the previous caption (none before the first) and left
    them on the finished one ("No word box covers (x, y)" under boxes that covered it). The hits are now those of
    the words shown: the words streamed so far, then the finished caption's."""
    session = _loaded(studio, example_images[0])
    with contextlib.closing(cb.generate(studio, session, None, 6, False, 1.0, 1.0, None, VISITOR)) as updates:
        shown = [next(updates) for _ in range(3)][-1][0]  # "Generating…", then two words
        box = shown["words"][0]["box"]
        x, y = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
        session, inspected = ws.click(session, "Inspect words", {"x": x, "y": y})
        assert 0 in inspected["inspect"]["hits"] and inspected["inspect"]["hits"] == ws.words_at(shown["words"], x, y)
        assert inspected["status"] == "streaming" and len(inspected["words"]) == 2
        done = list(updates)[-1][0]
    assert done["status"] == "done" and len(done["words"]) > 2
    assert done["inspect"] == {"x": x, "y": y, "hits": ws.words_at(done["words"], x, y)}


# ------------------------------------------------------------------------------------------ errors

def test_user_mistakes_become_gr_errors(studio, example_images, tmp_path):
    with pytest.raises(gr.Error, match="image first"):
        _run(studio, None)
    with pytest.raises(gr.Error, match="image first"):
        ws.click(None, "Positive point", {"x": 1, "y": 1})
    session = _loaded(studio, example_images[0])
    with pytest.raises(gr.Error, match="no area"):
        ws.drag_box(session, {"box": [10, 10, 10.2, 80]})
    session, _ = ws.click(session, "Negative point", {"x": 10, "y": 10})
    with pytest.raises(gr.Error, match="positive point"):
        _run(studio, session)
    session, _ = ws.clear_prompts(session)
    with pytest.raises(gr.Error, match="max words"):
        _run(studio, session, max_words=0)
    with pytest.raises(gr.Error, match="seed"):
        _run(studio, session, sampling=True, seed=1.5)
    with pytest.raises(gr.Error, match="referring expression"):
        cb.refer(studio, session, " \n  \n")
    with pytest.raises(gr.Error, match="threshold"):
        cb.dense(studio, session, 1.5, 10)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(gr.Error, match="not an image|could not be decoded"):
        ws.load_image(studio, str(broken), None)
    with pytest.raises(gr.Error, match="JSON"):
        api.caption(studio, str(example_images[0]), "{points: oops", "", 5, False, 1, 1, None)
    with pytest.raises(gr.Error, match="box"):
        api.caption(studio, str(example_images[0]), '{"box": [1, 2, 3]}', "", 5, False, 1, 1, None)
    assert studio.store.list_generations() == []  # nothing was shown, nothing logged


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


# ------------------------------------------------------------------------------------------ downloads

def test_json_download_has_pixel_boxes_inside_the_image(studio, example_images):
    session = _loaded(studio, example_images[2])
    session, _ = ws.click(session, "Positive point", {"x": 30, "y": 200})
    _, view, caption, files, session = _run(studio, session, max_words=8)
    json_path, png_path = (Path(f) for f in files)
    assert json_path.name == "caption.json" and png_path.name == "caption_overlay.png"
    record = json.loads(json_path.read_text())
    width, height = Image.open(example_images[2]).size
    assert record["image"] == {"width": width, "height": height}
    assert record["text"] == caption and len(record["words"]) == len(view["words"]) == 8
    for word, shown in zip(record["words"], view["words"]):
        x0, y0, x1, y1 = word["box"]
        assert 0 <= x0 <= x1 <= width and 0 <= y0 <= y1 <= height
        assert word["box"] == shown["box"]  # no downscale: the viewer frame is the image's own
    assert record["prompts"]["points"] == [[30.0, 200.0]] and record["prompts"]["point_labels"] == [1]
    overlay = Image.open(png_path)
    assert overlay.size == (width, height)
    original = np.asarray(Image.open(example_images[2]).convert("RGB"))
    assert not np.array_equal(np.asarray(overlay.convert("RGB")), original)


def test_downscaled_uploads_map_coordinates_back_to_the_original(studio, tmp_path, prefix_calls):
    big = _png(tmp_path / "big.png", 4096, 1024)
    session = _loaded(studio, big)
    assert (session.image["width"], session.image["height"]) == (2048, 512)
    assert (session.image["orig_width"], session.image["orig_height"]) == (4096, 1024)
    session, _ = ws.drag_box(session, {"box": [100, 50, 600, 400]})
    _, view, _, files, _ = _run(studio, session, max_words=4)
    record = json.loads(Path(files[0]).read_text())
    assert record["image"] == {"width": 4096, "height": 1024}
    assert record["prompts"]["box"] == [200.0, 100.0, 1200.0, 800.0]
    for word, shown in zip(record["words"], view["words"]):
        assert word["box"] == pytest.approx([c * 2 for c in shown["box"]], abs=0.02)
        assert 0 <= word["box"][0] <= word["box"][2] <= 4096 and 0 <= word["box"][1] <= word["box"][3] <= 1024

    # the API takes prompts in the original pixels too
    result = api.caption(studio, str(big), json.dumps({"box": [200, 100, 1200, 800]}), "", 4, False, 1, 1, None)
    torch.testing.assert_close(prefix_calls[-1]["boxes"],
                               torch.tensor([[200 / 4096, 100 / 1024, 1200 / 4096, 800 / 1024]]), atol=1e-6, rtol=0)
    assert result["image"] == {"width": 4096, "height": 1024}
    assert [w["box"] for w in result["words"]] == [w["box"] for w in record["words"]]


def test_each_request_writes_its_own_download_folder(studio, example_images):
    session = _loaded(studio, example_images[0])
    *_, files_a, _ = _run(studio, session, max_words=3)
    *_, files_b, _ = _run(studio, session, max_words=3)
    assert Path(files_a[0]).parent != Path(files_b[0]).parent
    assert Path(files_a[0]).parent.parent == studio.download_root


# ------------------------------------------------------------------------------------------ referring, dense

def test_refer_gives_box_mask_and_score_per_expression(studio, example_images):
    session = _loaded(studio, example_images[0])
    session, view, files = cb.refer(studio, session, "the large blue triangle\n\n  the purple   triangle ")
    regions = view["regions"]
    assert [r["label"] for r in regions] == ["the large blue triangle", "the purple triangle"]
    assert regions[0]["color"] != regions[1]["color"]
    assert all(r["mask"].startswith("data:image/png;base64,") for r in regions)
    names = [Path(f).name for f in files]
    assert names == ["refer.json", "mask_1_the-large-blue-triangle.png", "mask_2_the-purple-triangle.png",
                     "refer_overlay.png"]
    record = json.loads(Path(files[0]).read_text())
    width, height = Image.open(example_images[0]).size
    for i, result in enumerate(record["results"]):
        mask = np.asarray(Image.open(files[1 + i]))
        assert mask.shape == (height, width) and set(np.unique(mask)) <= {0, 255}
        assert result["mask_area"] == int((mask > 0).sum())
        counts = result["mask"]["counts"]
        assert sum(counts) == width * height and sum(counts[1::2]) == result["mask_area"]
        assert 0 <= result["box"][0] <= result["box"][2] <= width and 0 <= result["score"] <= 1


def test_dense_regions_and_tracing_one_region(studio, example_images, prefix_calls):
    session = _loaded(studio, example_images[0])
    session, view, files = cb.dense(studio, session, 0.0, 3)
    assert 1 <= len(view["regions"]) <= 3
    assert all(r["label"] and r["color"] for r in view["regions"])
    record = json.loads(Path(files[0]).read_text())
    assert [r["caption"] for r in record["regions"]] == [r["label"] for r in view["regions"]]

    outputs = list(cb.dense_select(studio, session, {"i": 0}, VISITOR))
    session, final, text = outputs[-1]
    assert final["selected"] == 0 and final["words"] and text == " ".join(w["text"] for w in final["words"])
    assert len(outputs) >= 3  # streamed
    box = session.dense[0]["box"]
    w, h = session.image["width"], session.image["height"]
    torch.testing.assert_close(prefix_calls[-1]["boxes"],
                               torch.tensor([[box[0] / w, box[1] / h, box[2] / w, box[3] / h]]),
                               atol=1e-5, rtol=0)
    x, y = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    clicked = list(cb.dense_select(studio, session, {"x": x, "y": y}, VISITOR))[-1][1]
    assert clicked["selected"] == cb.region_at(session.dense, x, y)
    with pytest.raises(gr.Error, match="region"):
        list(cb.dense_select(studio, session, {"i": 99}, VISITOR))
    # a dragged box is listed as the user's, with no detection score (it showed a made-up 1.00)
    dragged = list(cb.dense_select(studio, session, {"box": [10, 10, 60, 50]}, VISITOR))[-1][1]
    mine = dragged["regions"][dragged["selected"]]
    assert mine["label"] == "your box" and mine["detail"] == "drawn, not detected" and mine["score"] is None
    assert len(dragged["regions"]) == len(session.dense) + 1


# ------------------------------------------------------------------------------------------ store

def test_every_output_shown_is_logged_with_the_adapter(studio, example_images):
    store = studio.store
    session = _loaded(studio, example_images[0])
    session, _ = ws.click(session, "Positive point", {"x": 100, "y": 100})
    _, view, *_ = _run(studio, session, max_words=4)
    session = _run(studio, session, max_words=4)[-1]
    session, ref_view, _ = cb.refer(studio, session, "the red circle")
    session, dense_view, _ = cb.dense(studio, session, 0.0, 2)
    list(cb.dense_select(studio, session, {"i": 0}, records.Visitor("s1")))
    api.caption(studio, str(example_images[0]), "", "", 3, False, 1, 1, None, records.Visitor("api-session", "ann"))
    rows = list(reversed(store.list_generations()))
    assert [r["task"] for r in rows] == ["caption", "caption", "refer", "dense", "caption", "caption"]
    first = rows[0]
    assert first["words"] == [w["text"] for w in view["words"]] and first["boxes"] == [w["box"] for w in view["words"]]
    assert first["prompts"]["points"] == [[100.0, 100.0]] and first["session"] == "test"
    assert all(r["model_id"] == "tests/small-checkpoint" and r["model_version"] == studio.model.version
               and r["adapter"] is None for r in rows)
    assert rows[2]["boxes"] == [ref_view["regions"][0]["box"]]
    assert len(rows[3]["words"]) == len(dense_view["regions"])
    assert (rows[-1]["session"], rows[-1]["user"]) == ("api-session", "ann")  # behind --auth: the login
    assert rows[0]["user"] is None
    assert len({r["image_sha"] for r in rows}) == 1  # one stored image, reused
    assert session.last["generation_id"] == rows[4]["id"]  # what an Annotate tab would correct


def test_an_adapter_is_logged_with_the_fingerprint_of_its_weights(tmp_path, annotation_store, example_images):
    """finetune names an adapter after its --out folder, so two runs' adapters can share a name: each output
    records which weights served it (the adapter file's fingerprint; "in-memory" for one never saved)."""
    from pixelllm import PixelLLM, PixelLLMPredictor
    from pixelllm.checkpoint import file_fingerprint
    from tests.helpers import small_model

    def served_by(model) -> dict:
        studio = ws.Studio(predictor=PixelLLMPredictor(model, device="cpu"), store=annotation_store,
                           min_word_interval=0.0)
        api.caption(studio, str(example_images[0]), "", "", 2, False, 1, 1, None, VISITOR)
        return annotation_store.list_generations(limit=1)[0]

    versions = []
    for seed in (1, 2):  # two finetunes, both called "ft1"
        model = small_model(seed=seed)
        model.add_adapter("ft1")
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.5)
        assert served_by(model)["extra"]["adapter_version"] == "in-memory"
        model.save_pretrained(tmp_path / f"run{seed}")
        row = served_by(PixelLLM.from_pretrained(tmp_path / f"run{seed}"))
        assert row["adapter"] == "ft1"
        assert row["extra"]["adapter_version"] == file_fingerprint(
            tmp_path / f"run{seed}" / "adapters" / "ft1" / "adapter_model.safetensors")
        versions.append(row["extra"]["adapter_version"])
    assert versions[0] != versions[1]
    assert "adapter_version" not in served_by(small_model(seed=1))["extra"]  # the base model: no adapter


def test_a_failing_store_warns_but_the_user_keeps_the_result(studio, example_images):
    class BrokenStore:
        def add_image(self, *args, **kwargs):
            raise StoreError("database is locked")

    studio.store = BrokenStore()
    session = _loaded(studio, example_images[0])
    with pytest.warns(UserWarning, match="could not be saved"):
        _, view, caption, files, _ = _run(studio, session, max_words=3)
    assert len(view["words"]) == 3 and caption and len(files) == 2
    assert json.loads(Path(files[0]).read_text())["generation_id"] is None


# ------------------------------------------------------------------------------------------ misc

def test_sessions_are_independent(studio, example_images):
    a = _loaded(studio, example_images[0])
    b = _loaded(studio, example_images[0])
    a, _ = ws.click(a, "Positive point", {"x": 1, "y": 1})
    assert b.prompts == [] and a.prompts != []
    assert ws.load_image(studio, None, a)[0].image is None  # clearing the image resets the session


def test_model_panel_and_viewer_text_are_escaped(small_predictor, example_images):
    hostile = "<img src=x onerror=alert(1)>"
    panel = cb.model_panel(ws.Studio(predictor=small_predictor, checkpoint=hostile))
    assert "<img" not in panel and "&lt;img src=x onerror=alert(1)&gt;" in panel
    for key in ("checkpoint", "preset", "device", "dtype", "parameters", "adapter"):
        assert key in ws.Studio(predictor=small_predictor).model_info()
    assert render.escape('"><script>') == "&quot;&gt;&lt;script&gt;"


def test_api_outputs_are_plain_json(studio, example_images):
    cap = api.caption(studio, str(example_images[0]), '{"points": [[50, 60]], "point_labels": [1]}',
                      "", 4, False, 1, 1, None)
    ref = api.refer(studio, str(example_images[0]), "the red circle\nthe blue triangle")
    dense = api.dense(studio, str(example_images[0]), 0.0, 2)
    for result in (cap, ref, dense):
        json.loads(json.dumps(result, allow_nan=False))
    assert len(cap["words"]) == 4 and cap["prompts"]["points"] == [[50.0, 60.0]]
    assert [r["expression"] for r in ref["results"]] == ["the red circle", "the blue triangle"]
    assert 1 <= len(dense["regions"]) <= 2 and all("words" in r for r in dense["regions"])


def test_display_image_is_sent_once_as_exact_png_when_small(studio, example_images):
    session = _loaded(studio, example_images[0])
    src = session.image["src"]
    assert src.startswith("data:image/png;base64,")
    import base64

    decoded = np.asarray(Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).convert("RGB"))
    assert np.array_equal(decoded, session.array)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, view = ws.click(session, "Positive point", {"x": 3, "y": 4})
    assert view["image"]["src"] is None and view["image"]["key"] == session.image["key"]


def test_app_arguments_and_device_choice(monkeypatch):
    import app

    monkeypatch.setenv("PIXELLLM_CHECKPOINT", "user/model")
    args = app.parse_args([])
    assert args.checkpoint == "user/model" and args.device == "auto" and args.db == "data/annotations.db"
    assert app.parse_args(["--checkpoint", "some/dir", "--port", "7999"]).port == 7999
    monkeypatch.delenv("PIXELLLM_CHECKPOINT")
    assert app.parse_args([]).checkpoint == app.DEFAULT_CHECKPOINT
    assert app.pick_device("cpu") == ("cpu", None)
    device, dtype = app.pick_device("auto")
    assert device == ("cuda" if torch.cuda.is_available() else device)
    assert (dtype is torch.bfloat16) == (device == "cuda")


def _notices(demo: gr.Blocks) -> list[str]:
    return [c["props"]["value"] for c in demo.config["components"]
            if c["props"].get("elem_id") == "annotate-store-notice"]


def test_store_location_on_a_space_and_what_annotators_are_told(tmp_path, monkeypatch, small_checkpoint):
    import app

    for name in ("PIXELLLM_DB", "SPACE_ID"):
        monkeypatch.delenv(name, raising=False)
    persistent = tmp_path / "data"  # stands for a Space's /data mount
    assert app.default_db(persistent=persistent) == "data/annotations.db"
    assert app.store_notice("data/annotations.db", persistent=persistent) is None  # not a Space: nothing to say
    monkeypatch.setenv("SPACE_ID", "someone/pixelllm-studio")
    ephemeral = app.store_notice(app.default_db(persistent=persistent), persistent=persistent)
    assert "no persistent storage" in ephemeral and str(Path("data/annotations.db").absolute()) in ephemeral
    persistent.mkdir()
    assert app.default_db(persistent=persistent) == str(persistent / "annotations.db")
    assert app.store_notice(str(persistent / "annotations.db"), persistent=persistent) is None
    monkeypatch.setenv("PIXELLLM_DB", str(tmp_path / "mine.db"))
    assert app.default_db(persistent=persistent) == str(tmp_path / "mine.db")
    elsewhere = app.store_notice(str(tmp_path / "mine.db"), persistent=persistent)  # storage exists, not used
    assert "not on this Space's persistent storage" in elsewhere and "no persistent storage" not in elsewhere
    assert "--no-store" in app.store_notice(None, persistent=persistent)

    # Through app.main: on a Space whose store is not under /data, the Annotate tab says so; off a Space it
    # says nothing.
    demos = []
    monkeypatch.setattr(app, "launch", lambda demo, **kwargs: demos.append(demo))
    monkeypatch.setattr(app, "check_address", lambda host, port: None)  # serves nothing
    argv = ["--db", str(tmp_path / "annotations.db"), "--checkpoint", str(small_checkpoint), "--device", "cpu"]
    app.main(argv)
    monkeypatch.delenv("SPACE_ID")
    app.main(argv)
    on_space, off_space = (_notices(d) for d in demos)
    assert len(on_space) == 1 and "wiped whenever the Space restarts" in on_space[0], on_space
    assert str(tmp_path / "annotations.db") in on_space[0]
    assert off_space == []
    for demo in demos:
        demo.close()


def test_app_main_serves_with_the_login_concurrency_and_address_asked_for(monkeypatch, small_checkpoint):
    """The flags and $PIXELLLM_AUTH reach the server: a login that stopped at argparse would serve everyone."""
    import app

    launched = []
    monkeypatch.setattr(app, "launch", lambda demo, **kwargs: launched.append((demo, kwargs)))
    monkeypatch.setattr(app, "check_address", lambda host, port: None)  # serves nothing
    monkeypatch.delenv("PIXELLLM_AUTH", raising=False)
    base = ["--no-store", "--checkpoint", str(small_checkpoint), "--device", "cpu"]
    app.main([*base, "--auth", "ann:pw,rev:x:y", "--concurrency", "3", "--host", "0.0.0.0", "--port", "7999",
              "--share"])
    monkeypatch.setenv("PIXELLLM_AUTH", "env:pw")
    app.main(base)
    (flagged, kwargs), (from_env, env_kwargs) = launched
    assert kwargs == {"host": "0.0.0.0", "port": 7999, "share": True, "auth": [("ann", "pw"), ("rev", "x:y")]}
    assert flagged._queue.default_concurrency_limit == 3
    assert env_kwargs["auth"] == [("env", "pw")] and not env_kwargs["share"]
    assert from_env._queue.default_concurrency_limit == app.parse_args([]).concurrency
    for demo, _ in launched:
        demo.close()


def test_the_app_reads_the_checkpoints_evaluation_from_any_working_directory(tmp_path, monkeypatch,
                                                                               small_checkpoint):
    """A relative --checkpoint that app.py resolves from its own folder (the embedded model's default, started from
    elsewhere): the Model tab and the low-score marks read metrics.json from that folder, not the working one."""
    import shutil

    import app

    home = tmp_path / "install"
    shutil.copytree(small_checkpoint, home / "ckpt")
    (home / "ckpt" / "metrics.json").write_text(json.dumps({
        "metrics": {"refer_p@0.5": {"model": 0.9, "baseline": 0.0}}, "settings": {"split": "test"},
        "counts": {"images": 7}}))
    monkeypatch.setattr(app, "ROOT", home)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    demos = []
    monkeypatch.setattr(app, "launch", lambda demo, **kwargs: demos.append(demo))
    monkeypatch.setattr(app, "check_address", lambda host, port: None)  # serves nothing
    app.main(["--no-store", "--checkpoint", "ckpt", "--device", "cpu"])
    panel = [c["props"]["value"] for c in demos[0].config["components"]
             if c["props"].get("elem_id") == "model-panel"]
    demos[0].close()
    assert len(panel) == 1 and "split test, 7 images" in panel[0]


def test_model_panel_shows_the_checkpoint_evaluation(small_predictor, tmp_path):
    def panel() -> str:  # a new studio each time: it reads metrics.json once
        return cb.model_panel(ws.Studio(predictor=small_predictor, checkpoint=str(tmp_path)))

    first = panel()
    assert "Evaluation" not in first  # no metrics.json beside the checkpoint
    penalty = small_predictor.model.config.repetition_penalty
    assert f"<th>Caption repetition penalty (default)</th><td><code>{penalty:g}</code>" in first
    (tmp_path / "metrics.json").write_text(json.dumps({
        "metrics": {"refer_p@0.5": {"model": 0.9481, "baseline": 0.0},
                    "<b>x</b>": {"model": None, "baseline": 0.5}},
        "baselines": {"refer_p@0.5": "whole-image box"}, "settings": {"split": "test"}, "counts": {"images": 500}}))
    shown = panel()
    assert "split test, 500 images" in shown
    assert "<td><code>refer_p@0.5</code></td><td>0.948</td><td>0.000</td><td>whole-image box</td>" in shown
    assert "<b>x</b>" not in shown and "&lt;b&gt;x&lt;/b&gt;" in shown  # the file is data, escaped
    (tmp_path / "metrics.json").write_text("{not json")
    assert "Evaluation: metrics.json: Expecting property name" in panel()  # the panel still renders


def test_a_referral_under_the_evaluations_absent_median_is_marked_low(small_predictor, example_images, tmp_path):
    """The mark follows metrics.json's `refer_score_quantiles.absent.p50`; without an evaluation there is none."""
    def studio() -> ws.Studio:  # a new studio each time: it reads metrics.json once
        return ws.Studio(predictor=small_predictor, checkpoint=str(tmp_path), min_word_interval=0.0,
                         download_root=tmp_path / "downloads")

    def details(studio: ws.Studio) -> list[str]:
        _, view, _ = cb.refer(studio, _loaded(studio, example_images[0]), "the red circle\nthe blue triangle")
        for region in view["regions"]:  # the viewer draws a low one dashed
            assert region["low"] == ("low score" in region["detail"])
        return [region["detail"] for region in view["regions"]]

    plain = studio()
    assert plain.low_refer_score() is None and not any("low score" in d for d in details(plain))
    for median, marked in ((0.999999, True), (1e-9, False)):  # the small model's scores lie between the two
        (tmp_path / "metrics.json").write_text(json.dumps({"metrics": {}, "refer_score_quantiles": {
            "present": {"p50": 0.5}, "absent": {"p50": median}}}))
        evaluated = studio()
        assert evaluated.low_refer_score() == median
        assert all(("· low score: may not be in the image" in d) == marked for d in details(evaluated))


def test_a_refused_call_keeps_its_traceback_at_debug_for_the_host(caplog):
    """A refused call prints no traceback (user_errors: print_exception=False), so a ValueError raised by a bug
    rather than by the user would leave no trace: its traceback is logged at DEBUG, found by raising the level."""
    with caplog.at_level(logging.DEBUG, logger="pixelllm.ui.state"):
        with pytest.raises(gr.Error, match="Upload, paste or pick an example image first"):
            ws.click(ws.Session(), "Positive point", {"x": 1, "y": 1})
    refused = [r for r in caplog.records if r.name == "pixelllm.ui.state" and r.levelno == logging.DEBUG]
    assert refused and "click refused: Upload, paste" in refused[0].getMessage() and refused[0].exc_info

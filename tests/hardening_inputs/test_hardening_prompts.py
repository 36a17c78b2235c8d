"""Hardening: malformed prompts, text, referring expressions, traced captions and numbers, through the public API
and through the predictor: refused with the user's message (and no traceback in the host's log) or normalised as
documented.

The rest of tests/hardening_inputs/: image files (predictor, page upload, API): test_hardening_images.py; store
faults behind the app and app.py refusing to start: test_hardening_app_faults.py. Shared helpers: conftest.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError

from pixelllm import image as imaging
from tests.hardening_inputs.conftest import (
    NORMAL_IMAGE,
    assert_boxes_inside,
    assert_refused,
    caption,
    dense,
    refer,
)

# ------------------------------------------------------------------------------------------ prompts

BOX_CASES = [  # (id, prompts, message) on the 256x256 example
    ("zero-area", {"box": [10, 10, 10, 50]}, "the box has no area inside the image"),
    ("outside-the-image", {"box": [300, 300, 400, 400]}, "the box has no area inside the image"),
    ("negative-outside", {"box": [-90, -90, -10, -10]}, "the box has no area inside the image"),
    ("nan", '{"box": [NaN, 10, 50, 50]}', "box prompt contains NaN or infinite values"),
    ("infinity", '{"box": [0, 0, Infinity, 50]}', "box prompt contains NaN or infinite values"),
    ("overflow-1e999", '{"points": [[1e999, 5]]}', "point prompt contains NaN or infinite values"),
    ("101-points", {"points": [[i % 256, i % 200] for i in range(101)]}, "101 points given; at most 100 are allowed"),
    ("negative-points-only", {"points": [[10, 10]], "point_labels": [0]}, "give at least one positive point"),
    ("fractional-label", {"points": [[10, 10]], "point_labels": [0.5]}, "point labels must be 1 (positive) or 0"),
    ("ragged-points", {"points": [[1, 2], [3]]}, "points must be a list of [x, y] pairs"),
    ("box-is-an-object", {"box": {"x": 1}}, "box must be [x0, y0, x1, y1]"),
    ("box-3-numbers", {"box": [1, 2, 3]}, "box must be [x0, y0, x1, y1]"),
    ("not-json", "{box: [1, 2", "prompts must be JSON"),
    ("unknown-key", {"boxes": [1, 2, 3, 4]}, "unknown prompt keys ['boxes']"),
    ("labels-without-points", {"point_labels": [1]}, "point_labels given without points"),
    ("labels-for-no-points", {"points": [], "labels": [1, 0], "box": [10, 10, 50, 50]},
     "point_labels given without points"),
]


@pytest.mark.parametrize("case_id, prompts, message", BOX_CASES, ids=[c[0] for c in BOX_CASES])
def test_bad_prompt_through_the_api(case_id, prompts, message, served_app, client):
    assert_refused(served_app, lambda: caption(client, NORMAL_IMAGE, prompts), message)


def test_a_refused_call_leaves_no_traceback_in_the_hosts_log(served_app, client, monkeypatch, capfd):
    """Every refused call (a bad prompt, an empty expression, a bad correction) printed two chained tracebacks,
    ~40 lines, to the server's stderr: a client looping on its mistake filled the host's log, and a real fault
    was hard to find in it. A real fault still prints its traceback."""
    capfd.readouterr()
    mistakes = [lambda: caption(client, NORMAL_IMAGE, {"box": [1, 2, 3]}),
                lambda: client.predict(image=handle_file(NORMAL_IMAGE), expressions="", api_name="/refer"),
                lambda: client.predict(correction={"generation_id": 1}, api_name="/save_correction")]
    for call in mistakes:
        with pytest.raises(AppError):
            call()
    log = capfd.readouterr().err
    assert "Traceback" not in log, f"{log.count('Traceback')} tracebacks in the server's log:\n{log[-3000:]}"

    def fault(*args, **kwargs):
        raise RuntimeError("a real fault")

    monkeypatch.setattr(served_app.studio.predictor, "refer", fault)
    with pytest.raises(AppError):
        client.predict(image=handle_file(NORMAL_IMAGE), expressions="the shape", api_name="/refer")
    log = capfd.readouterr().err
    assert "Traceback" in log and "RuntimeError: a real fault" in log, log[-3000:]


NORMALISED_PROMPTS = [  # (id, prompts sent, prompts the answer reports): documented normalisations
    ("corners-swapped", {"box": [200, 220, 100, 135]}, {"box": [100, 135, 200, 220]}),
    ("box-partly-outside-is-clipped", {"box": [-50, -20, 100, 400]}, {"box": [0, 0, 100, 256]}),
    ("points-outside-are-clamped", {"points": [[-10, 300], [50, 50]]}, {"points": [[0, 256], [50, 50]]}),
    ("100-points-allowed", {"points": [[i, i] for i in range(100)]}, {"points": [[i, i] for i in range(100)]}),
    ("labels-as-third-column", {"points": [[20, 20, 1], [40, 40, 0]]}, {"point_labels": [1, 0]}),
    ("empty-prompts", "", {"box": None, "points": []}),
]


@pytest.mark.parametrize("case_id, sent, reported", NORMALISED_PROMPTS, ids=[c[0] for c in NORMALISED_PROMPTS])
def test_prompt_normalisation_through_the_api(case_id, sent, reported, client):
    out = caption(client, NORMAL_IMAGE, sent)
    for key, value in reported.items():
        assert out["prompts"][key] == value, (key, out["prompts"][key])
    assert_boxes_inside([w["box"] for w in out["words"]], 256, 256)


def test_bad_prompts_are_refused_by_the_predictor(small_predictor):
    state = small_predictor.set_image(imaging.load_image(NORMAL_IMAGE))
    cases = [
        (dict(box=[10, 10, 10, 50]), "the box has no area inside the image"),
        (dict(box=[300, 300, 400, 400]), "the box has no area inside the image"),
        (dict(box=[float("nan"), 0, 5, 5]), "box prompt contains NaN or infinite values"),
        (dict(box=[0, 0, float("inf"), 5]), "box prompt contains NaN or infinite values"),
        (dict(points=[[float("nan"), 3]]), "point prompt contains NaN or infinite values"),
        (dict(points=np.zeros((101, 2))), "101 points given; at most 100 are allowed"),
        (dict(points=[[1, 2]], point_labels=[0]), "give at least one positive point"),
        (dict(points=[[1, 2, 3]]), "the point prompt must be a list of [x, y] pixel pairs"),
        (dict(box={"x": 1}), "a box must be 4 numbers"),
        (dict(text="x" * 10_000), "the text is 10000 characters long; the limit is 2000"),
        (dict(text="bad \ud800 surrogate"), "not valid Unicode"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError) as info:
            small_predictor.caption(state, max_new_tokens=4, **kwargs)
        assert message in str(info.value), (kwargs.keys(), str(info.value))
    with pytest.raises(ValueError, match="no area inside the image"):
        small_predictor.caption_boxes(state, [[5, 5, 5, 5]])
    with pytest.raises(ValueError, match="score_threshold must be between 0 and 1"):
        small_predictor.dense_caption(state, score_threshold=float("nan"))
    # normalisations: swapped corners, partly outside; and a normal call afterwards
    swapped = small_predictor.caption(state, box=[200, 220, 100, 135], max_new_tokens=6)
    straight = small_predictor.caption(state, box=[100, 135, 200, 220], max_new_tokens=6)
    assert [w.box for w in swapped.words] == [w.box for w in straight.words]
    assert small_predictor.caption(state, points=[[-10, 999]], max_new_tokens=4).words


# ------------------------------------------------------------------------------------------ text

TEXTS_NORMALISED = [  # (id, text sent, text the answer reports)
    ("empty", "", None),
    ("whitespace", "  \n\t  ", None),
    ("inner-whitespace", "  the \n red\tcircle ", "the red circle"),
    ("non-latin", "这是一个红色的圆圈 и синий квадрат", "这是一个红色的圆圈 и синий квадрат"),
    ("emoji", "🔴 circle 👀🏳️‍🌈", "🔴 circle 👀🏳️‍🌈"),
    ("html", '<img src=x onerror="window.__pwned=1"><script>alert(1)</script>',
     '<img src=x onerror="window.__pwned=1"><script>alert(1)</script>'),
    ("long", "the red circle " * 12, " ".join(["the red circle"] * 12)),  # 36-60 tokens: under the 64 read
]


@pytest.mark.parametrize("case_id, text, reported", TEXTS_NORMALISED, ids=[c[0] for c in TEXTS_NORMALISED])
def test_text_prompt_through_the_api(case_id, text, reported, served_app, client):
    out = caption(client, NORMAL_IMAGE, text=text)
    assert out["prompts"]["text"] == reported
    stored = served_app.store.get_generation(out["generation_id"])
    assert stored["prompts"]["text"] == reported  # stored verbatim (as data, never as markup)
    if reported is not None and "\n" not in text:  # /refer takes one expression per line
        ref = refer(client, NORMAL_IMAGE, text)
        assert [r["expression"] for r in ref["results"]] == [reported]


def test_text_too_long_through_the_api(served_app, client):
    assert_refused(served_app, lambda: caption(client, NORMAL_IMAGE, text="word " * 2000),
                   "the text is 9999 characters long; the limit is 2000")
    assert_refused(served_app, lambda: refer(client, NORMAL_IMAGE, "x" * 10_000),
                   "the text is 10000 characters long; the limit is 2000")
    # Within 2000 characters but more tokens than the model reads: refused, not silently cut to 64 tokens
    # while the whole text is echoed and logged as the prompt.
    assert_refused(served_app, lambda: caption(client, NORMAL_IMAGE, text="a" * 2000),
                   "the text prompt is 2000 tokens long; the model reads at most 64")
    assert_refused(served_app, lambda: refer(client, NORMAL_IMAGE, "the red circle\n" + "a" * 2000),
                   "referring expression 2 is 2000 tokens long; the model reads at most 64")


def test_a_huge_text_is_refused_on_its_length_before_it_is_split():
    """A 17 MB prompt was split into words (about 200 MB) before its length was checked."""
    from pixelllm.ui.callbacks import parse_expressions

    with pytest.raises(ValueError, match="the text is 40000 characters long"):  # the raw length: not yet collapsed
        imaging.check_text("a " * 20_000)
    with pytest.raises(ValueError, match="the expressions are 600000 characters long; at most 16 of 2000"):
        parse_expressions("the red circle\n" * 40_000)
    assert imaging.check_text("a" + " " * 15_000 + "b") == "a b"  # runs of whitespace still collapse


def trace(client: Client, image: Path, caption: str, prompts: str = "") -> dict:
    return client.predict(image=handle_file(str(image)), prompts=prompts, caption=caption, api_name="/trace")


def test_traced_captions_through_the_api(served_app, client):
    hostile = '<img src=x onerror="window.__pwned=1"> 🔴 圆圈  spaced   out'
    out = trace(client, NORMAL_IMAGE, hostile, json.dumps({"box": [100, 135, 200, 220]}))
    assert out["text"] == " ".join(hostile.split()) and [w["text"] for w in out["words"]] == hostile.split()
    assert_boxes_inside([w["box"] for w in out["words"]], 256, 256)
    stored = served_app.store.get_generation(out["generation_id"])
    assert stored["words"] == hostile.split() and stored["extra"]["traced"] is True
    assert_refused(served_app, lambda: trace(client, NORMAL_IMAGE, "  \n "), "Type the caption to trace.")
    assert_refused(served_app, lambda: trace(client, NORMAL_IMAGE, "a red circle", '{"box": [1, 2]}'),
                   "box must be [x0, y0, x1, y1]")
    assert_refused(served_app, lambda: trace(client, NORMAL_IMAGE, "a " * 600),
                   "the caption is 600 tokens long; the limit is 512")


@pytest.mark.parametrize("expressions, message", [
    ("", "Type at least one referring expression"),
    ("  \n \t\n", "Type at least one referring expression"),
    ("\n".join(f"thing {i}" for i in range(17)), "17 expressions given; at most 16 at once"),
], ids=["empty", "whitespace-lines", "17-lines"])
def test_bad_expressions_through_the_api(expressions, message, served_app, client):
    assert_refused(served_app, lambda: refer(client, NORMAL_IMAGE, expressions), message)


def test_bad_expressions_are_refused_by_the_predictor(small_predictor):
    state = small_predictor.set_image(imaging.load_image(NORMAL_IMAGE))
    with pytest.raises(ValueError, match="type at least one referring expression"):
        small_predictor.refer(state, ["", "   ", "\n"])
    with pytest.raises(ValueError, match="the text is 10000 characters long"):
        small_predictor.refer(state, ["x" * 10_000])
    hostile = "<b>bold</b> 🔴 圆圈"
    assert [r.expression for r in small_predictor.refer(state, [hostile, "  spaced   out "])] == [hostile, "spaced out"]


@pytest.mark.parametrize("call, message", [
    (lambda c: caption(c, NORMAL_IMAGE, max_words=0), "max words must be between 1 and 128"),
    (lambda c: dense(c, NORMAL_IMAGE, score_threshold=2.0), "the score threshold must be between 0 and 1"),
    (lambda c: dense(c, NORMAL_IMAGE, max_regions=0), "max regions must be between 1 and 100"),
    # the API's number fields reach the app's own checks unrounded: gradio's precision=0 made 3.5 four words and
    # answered "abc" with its generic "the upstream Gradio app has raised an exception"
    (lambda c: caption(c, NORMAL_IMAGE, max_words=3.5), "max words must be a whole number"),
    (lambda c: caption(c, NORMAL_IMAGE, max_words="abc"), "max words must be a whole number"),
    (lambda c: dense(c, NORMAL_IMAGE, max_regions="x"), "max regions must be a whole number"),
    (lambda c: c.predict(image=handle_file(str(NORMAL_IMAGE)), prompts="", text="", max_words=3, do_sample=True,
                         temperature=1.0, top_p=1.0, seed="x", api_name="/caption"),
     "the seed must be a whole number"),
], ids=["max-words-0", "threshold-2", "max-regions-0", "max-words-3.5", "max-words-abc", "max-regions-x",
        "seed-x"])
def test_bad_numbers_through_the_api(call, message, served_app, client):
    assert_refused(served_app, lambda: call(client), message)

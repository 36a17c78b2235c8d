"""The LN reader: per-utterance targets as Scenic's build_ln_tfrecord.py, expected values computed by hand."""

import json

import numpy as np
import pytest

from training.data.localized_narratives import (
    LNSample,
    read_localized_narratives,
    sentence_targets,
    utterance_targets,
)


def point(t: float, x: float, y: float) -> dict:
    return {"x": x, "y": y, "t": t}


def utterance(text: str, start: float, end: float) -> dict:
    return {"utterance": text, "start_time": start, "end_time": end}


# Two segments whose times interleave.  Sorted by t the trace is piecewise linear through
#   t=0 (0.1, 0.2), t=1 (0.3, 0.6), t=2 (0.5, 0.2), t=3 (1.1, 0.0), t=4 (0.5, -0.2).
# Concatenating the segments without sorting gives a different (wrong) trace.
TRACES = [
    [point(0, 0.1, 0.2), point(2, 0.5, 0.2), point(4, 0.5, -0.2)],
    [point(1, 0.3, 0.6), point(3, 1.1, 0.0)],
]


def test_targets_follow_the_sorted_piecewise_linear_trace():
    caption = [
        utterance("a", 0.0, 1.0),  # x 0.1 -> 0.3, y 0.2 -> 0.6
        utterance("b", 1.0, 2.0),  # x 0.3 -> 0.5, y 0.6 -> 0.2
        utterance("c", 3.0, 4.0),  # x 1.1 -> 0.5, y 0.0 -> -0.2 (outside [0, 1], not clipped)
    ]
    boxes, centres = utterance_targets(TRACES, caption)
    np.testing.assert_allclose(boxes, [[0.1, 0.2, 0.3, 0.6], [0.3, 0.2, 0.5, 0.6], [0.5, -0.2, 1.1, 0.0]],
                               atol=1e-6)
    # Linear over each utterance: the time average is the midpoint.
    np.testing.assert_allclose(centres, [[0.2, 0.4], [0.4, 0.4], [0.8, -0.1]], atol=1e-6)


def test_zero_duration_utterance_gives_a_point_box():
    # t = 2.5 lies halfway between t=2 (0.5, 0.2) and t=3 (1.1, 0.0).
    boxes, centres = utterance_targets(TRACES, [utterance("now", 2.5, 2.5)])
    np.testing.assert_allclose(boxes, [[0.8, 0.1, 0.8, 0.1]], atol=1e-6)
    np.testing.assert_allclose(centres, [[0.8, 0.1]], atol=1e-6)


def test_a_reversed_utterance_is_centred_on_its_plain_sample_mean_as_in_scenic():
    """Scenic falls back to the plain mean when t[-1] - t[0] < 1e-5 (signed): an utterance whose end comes before
    its start. Over [1.5, 0] the 16 samples are x(t) = 0.1 + 0.2 t up to t = 1, then 0.3 + 0.2 (t - 1): linear
    on a uniform grid, but with the kink at t = 1 between samples the plain mean and the trapezoid differ."""
    boxes, centres = utterance_targets(TRACES, [utterance("back", 1.5, 0.0)])
    t = np.linspace(1.5, 0.0, 16)
    x = np.where(t <= 1, 0.1 + 0.2 * t, 0.3 + 0.2 * (t - 1))
    y = np.where(t <= 1, 0.2 + 0.4 * t, 0.6 - 0.4 * (t - 1))
    np.testing.assert_allclose(centres, [[x.mean(), y.mean()]], atol=1e-6)
    np.testing.assert_allclose(boxes, [[x.min(), y.min(), x.max(), y.max()]], atol=1e-6)


def test_utterances_outside_the_trace_are_extrapolated_linearly():
    caption = [
        # after the last point: slope of [3, 4] is (-0.6, -0.2)/s -> t=5 (-0.1, -0.4), t=6 (-0.7, -0.6)
        utterance("late", 5.0, 6.0),
        # before the first point: slope of [0, 1] is (0.2, 0.4)/s -> t=-1 (-0.1, -0.2), t=0 (0.1, 0.2)
        utterance("early", -1.0, 0.0),
    ]
    boxes, centres = utterance_targets(TRACES, caption)
    np.testing.assert_allclose(boxes, [[-0.7, -0.6, -0.1, -0.4], [-0.1, -0.2, 0.1, 0.2]], atol=1e-6)
    np.testing.assert_allclose(centres, [[-0.4, -0.5], [0.0, 0.0]], atol=1e-6)


def test_box_and_centre_come_from_16_uniform_samples():
    # Over [0.5, 1.5] y rises 0.4 -> 0.6 (t=1) -> 0.4 at 0.4/s while x is linear (0.2 -> 0.4).
    # Samples t_k = 0.5 + k/15, k = 0..15: t = 1 is not sampled, so the box top is y(1 - 1/30) and
    # y_k = 0.4 + 0.4 * min(k/15, 1 - k/15); sum_k min(k, 15 - k) = 2 * (0 + 1 + ... + 7) = 56.
    boxes, centres = utterance_targets(TRACES, [utterance("peak", 0.5, 1.5)])
    y_top = 0.6 - 0.4 / 30
    np.testing.assert_allclose(boxes[0], [0.2, 0.4, 0.4, y_top], atol=1e-6)
    # Scenic's centre: trapezoidal integral over the samples / duration (half weight on both ends),
    # not the plain mean of the 16 samples (which would be y_sum / 16).
    y_sum = 16 * 0.4 + 0.4 * 56 / 15
    y_centre = (y_sum - 0.5 * (0.4 + 0.4)) / 15
    np.testing.assert_allclose(centres[0], [0.3, y_centre], atol=1e-6)


def test_duplicate_times_are_merged_into_their_mean():
    # The two points at t=1 merge into x=0.4 and those at t=2 into x=0.7: x = 0.1 + 0.3 t.
    traces = [[point(0, 0.1, 0.5), point(1, 0.3, 0.5)], [point(1, 0.5, 0.5), point(2, 0.6, 0.5), point(2, 0.8, 0.5)]]
    boxes, centres = utterance_targets(traces, [utterance("all", 0.0, 2.0), utterance("after", 2.0, 3.0)])
    np.testing.assert_allclose(boxes, [[0.1, 0.5, 0.7, 0.5], [0.7, 0.5, 1.0, 0.5]], atol=1e-6)
    np.testing.assert_allclose(centres, [[0.4, 0.5], [0.85, 0.5]], atol=1e-6)


def test_trace_at_a_single_time_is_constant():
    traces = [[point(1, 0.2, 0.4)], [point(1, 0.4, 0.6)]]
    boxes, centres = utterance_targets(traces, [utterance("x", 0.0, 3.0)])
    np.testing.assert_allclose(boxes, [[0.3, 0.5, 0.3, 0.5]], atol=1e-6)
    np.testing.assert_allclose(centres, [[0.3, 0.5]], atol=1e-6)


@pytest.mark.parametrize(
    ("traces", "caption", "num_samples"),
    [
        ([[point(0, 0.1, 0.1)]], [utterance("a", 0, 1)], 16),
        ([[]], [utterance("a", 0, 1)], 16),
        (TRACES, [utterance("a", 0, 1)], 0),
        ([[{"x": 0.1, "y": 0.1}] * 2], [utterance("a", 0, 1)], 16),
        (TRACES, [{"utterance": "a", "start_time": "soon", "end_time": 1}], 16),
    ],
)
def test_bad_input_raises_value_error(traces, caption, num_samples):
    with pytest.raises(ValueError):
        utterance_targets(traces, caption, num_samples=num_samples)


def ln_record(image_id: str, traces: list, timed_caption: list, **overrides) -> dict:
    record = {
        "dataset_id": "test",
        "image_id": image_id,
        "annotator_id": 93,
        "caption": " ".join(u["utterance"] for u in timed_caption),
        "timed_caption": timed_caption,
        "traces": traces,
        "voice_recording": "coco_val/coco_1/voice.ogg",
    }
    record.update(overrides)
    return record


GOOD_CAPTION = [
    utterance("Look", 0.0, 1.0),
    utterance("at this.", 1.0, 2.0),  # two words inheriting one utterance's target
    utterance("A", 3.0, 4.0),
    utterance("circle!", 2.5, 2.5),
    utterance('"quoted."', 5.0, 6.0),
    utterance("the end", -1.0, 0.0),
]


@pytest.fixture()
def ln_file(tmp_path):
    good = ln_record("img_1", TRACES, GOOD_CAPTION)
    lines = [
        json.dumps(good),
        "",  # blank lines are not records
        json.dumps(ln_record("no_points", [[], []], GOOD_CAPTION)),
        json.dumps(ln_record("one_point", [[point(0.5, 0.5, 0.5)], []], GOOD_CAPTION)),
        "{this is not json",
        json.dumps({k: v for k, v in good.items() if k != "traces"}),
        json.dumps(ln_record("text_x", [[point(0, "0.1", 0.2), point(1, 0.2, 0.2)]], GOOD_CAPTION)),
        json.dumps(ln_record("null_time", TRACES, [{"utterance": "a", "start_time": None, "end_time": 1}])),
        json.dumps([1, 2, 3]),
        json.dumps(ln_record("img_2", [[point(0, 0.0, 1.0), point(2, 1.0, 0.0)]], [utterance("Two words", 0, 2)],
                             annotator_id="a7")),
    ]
    path = tmp_path / "narratives.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_reader_keeps_good_records_and_counts_the_rest(ln_file):
    samples, stats = read_localized_narratives(ln_file)
    assert [s.image_id for s in samples] == ["img_1", "img_2"]
    assert (stats.records, stats.kept, stats.skipped_no_trace, stats.skipped_malformed) == (9, 2, 2, 5)


def test_reader_gives_every_word_its_utterance_target(ln_file):
    sample = read_localized_narratives(ln_file)[0][0]
    assert isinstance(sample, LNSample)
    assert sample.annotator_id == "93" and sample.dataset_id == "test"
    assert sample.words == ["Look", "at", "this.", "A", "circle!", '"quoted."', "the", "end"]
    expected_boxes = [
        [0.1, 0.2, 0.3, 0.6],  # Look [0, 1]
        [0.3, 0.2, 0.5, 0.6],  # at this. [1, 2]
        [0.3, 0.2, 0.5, 0.6],
        [0.5, -0.2, 1.1, 0.0],  # A [3, 4]
        [0.8, 0.1, 0.8, 0.1],  # circle! [2.5, 2.5]
        [-0.7, -0.6, -0.1, -0.4],  # "quoted." [5, 6]
        [-0.1, -0.2, 0.1, 0.2],  # the end [-1, 0]
        [-0.1, -0.2, 0.1, 0.2],
    ]
    assert sample.word_boxes.dtype == np.float32 and sample.word_boxes.shape == (8, 4)
    np.testing.assert_allclose(sample.word_boxes, expected_boxes, atol=1e-6)
    np.testing.assert_allclose(sample.word_centres[[0, 2, 4]], [[0.2, 0.4], [0.4, 0.4], [0.8, 0.1]], atol=1e-6)
    assert sample.sentences == [(0, 3), (3, 5), (5, 6), (6, 8)]


def test_second_sample_uses_a_two_point_trace(ln_file):
    sample = read_localized_narratives(ln_file)[0][1]
    assert sample.annotator_id == "a7" and sample.words == ["Two", "words"]
    np.testing.assert_allclose(sample.word_boxes, [[0.0, 0.0, 1.0, 1.0]] * 2, atol=1e-6)
    np.testing.assert_allclose(sample.word_centres, [[0.5, 0.5]] * 2, atol=1e-6)
    assert sample.sentences == [(0, 2)]


def test_sentence_targets_split_the_sample(ln_file):
    sample = read_localized_narratives(ln_file)[0][0]
    targets = sentence_targets(sample)
    assert [text for text, _ in targets] == ["Look at this.", "A circle!", '"quoted."', "the end"]
    np.testing.assert_allclose(targets[1][1], [[0.5, -0.2, 1.1, 0.0], [0.8, 0.1, 0.8, 0.1]], atol=1e-6)
    assert [boxes.shape for _, boxes in targets] == [(3, 4), (2, 4), (1, 4), (2, 4)]


def test_missing_file_raises(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_localized_narratives(tmp_path / "absent.jsonl")


TWO_POINTS = [[point(0, 0.1, 0.2), point(1, 0.5, 0.6)]]


@pytest.mark.parametrize("record", [
    # an integer beyond float's range (json reads integers of any size): OverflowError escaped the reader
    ln_record("huge_x", [[point(0, 10**400, 0.2), point(1, 0.5, 0.6)]], [utterance("a", 0, 1)]),
    ln_record("huge_end", TWO_POINTS, [utterance("a", 0, 10**400)]),
    # finite values whose targets overflow: these were kept with NaN / inf word boxes
    ln_record("wide_times", TWO_POINTS, [utterance("a", -1e308, 1e308)]),
    ln_record("float32_overflow", [[point(0, 1e39, 0.2), point(1, 0.5, 0.6)]], [utterance("a", 0, 1)]),
    ln_record("subnormal_step", [[point(0, 0.1, 0.2), point(1e-320, 0.5, 0.6)]], [utterance("a", 0, 1)]),
    # an unpaired surrogate escape ("\ud800"): kept, then the tokenizer failed with a TypeError mid-training
    ln_record("surrogate", TWO_POINTS, [utterance("a \ud800", 0, 1)]),
], ids=lambda record: record["image_id"])
def test_hostile_values_are_skipped_and_counted_never_kept_as_nan(tmp_path, record):
    good = ln_record("good", TWO_POINTS, [utterance("a b", 0, 1)])
    path = tmp_path / "narratives.jsonl"
    path.write_text(json.dumps(record) + "\n" + json.dumps(good) + "\n")
    samples, stats = read_localized_narratives(path)
    assert [s.image_id for s in samples] == ["good"]
    assert (stats.records, stats.kept, stats.skipped_malformed) == (2, 1, 1)


def test_a_line_nested_too_deeply_is_skipped_and_counted(tmp_path):
    """json raises RecursionError (not a ValueError) on deep nesting: it escaped the reader as a traceback."""
    good = ln_record("good", TWO_POINTS, [utterance("a", 0, 1)])
    path = tmp_path / "narratives.jsonl"
    path.write_text("[" * 100_000 + "]" * 100_000 + "\n" + json.dumps(good) + "\n")
    samples, stats = read_localized_narratives(path)
    assert [s.image_id for s in samples] == ["good"] and stats.skipped_malformed == 1


def test_a_byte_order_mark_and_crlf_lines_lose_no_record(tmp_path):
    """A file saved by a Windows editor: UTF-8 BOM and CRLF line ends. The BOM made the first (good) record count
    as malformed, silently dropped."""
    records = [ln_record(f"img_{k}", TWO_POINTS, [utterance("a b", 0, 1)]) for k in range(2)]
    path = tmp_path / "narratives.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(r) + "\r\n" for r in records).encode())
    samples, stats = read_localized_narratives(path)
    assert [s.image_id for s in samples] == ["img_0", "img_1"]
    assert (stats.records, stats.kept, stats.skipped_malformed) == (2, 2, 0)

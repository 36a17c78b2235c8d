"""Opening in the Annotate tab (pixelllm/ui/annotate.py, annotate_panels.py) with a real annotation store: the
current output again; browse and open; the page's kept copies of unsaved edits (`restore_kept`: only onto their
output, base kept, superseded refused, status from the store, login); the export zip; adapter comparison.
The editor document: test_annotate_editing.py; saving and review: test_annotate_saving.py."""

from __future__ import annotations

import copy as copy_module
import json
import threading
import zipfile

import gradio as gr
import pytest
import torch

from pixelllm import PixelLLMPredictor
from pixelllm.ui import annotate as an
from pixelllm.ui import annotate_doc, records
from pixelllm.ui import annotate_panels as panels
from pixelllm.ui import callbacks as cb
from pixelllm.ui import workspace as ws
from pixelllm.ui.decoding import token_budget
from tests.annotate.conftest import opened, recording


def test_opening_the_current_output_again_says_its_corrections_exist(studio, captioned):
    """As opening it from the list does: a save from a fresh open starts a second chain for the same output."""
    state = opened(studio, captioned)
    state, view = an.save(studio, state, "draft", "ana", None)
    state, view = an.open_current(studio, captioned, state)
    assert "1 correction chain(s) exist for it" in view["message"]


def test_browse_filters_and_open(studio, captioned, annotation_store):
    state = opened(studio, captioned)
    sha = state.image["sha"]
    state, _ = an.save(studio, state, "submitted", "Gil Smith")
    listing = panels.list_items(studio, "Corrections", sha[:6], "smith", "submitted", "")
    assert [r["id"] for r in listing["rows"]] == [state.head_id] and listing["rows"][0]["annotator"] == "Gil Smith"
    assert panels.list_items(studio, "Corrections", sha[:6], "nobody", "any", "")["rows"] == []
    assert panels.list_items(studio, "Corrections", "", "", "draft", "")["rows"] == []
    outputs = panels.list_items(studio, "Model outputs", sha, "", "any", "")
    assert outputs["rows"][0]["id"] == captioned.last["generation_id"]
    with pytest.raises(gr.Error, match="hexadecimal"):
        panels.list_items(studio, "Corrections", "xyz", "", "any", "")

    other, view = an.open_item(studio, None, {"kind": "correction", "id": state.head_id})
    assert other.head_id == state.head_id and view["image"]["src"].startswith("data:image/")
    assert [w["text"] for w in view["words"]] == annotation_store.get_correction(state.head_id)["words"]
    other, _ = an.edit_event(other, {"op": "text", "i": 0, "text": "unsaved", "rev": other.rev})
    target = {"kind": "generation", "id": captioned.last["generation_id"]}
    with pytest.raises(gr.Error, match="unsaved edits"):
        an.open_item(studio, other, target)
    other, view = an.open_item(studio, other, target)  # asked again: discard and open
    assert other.head_id is None and other.generation_id == target["id"] and "correction chain" in view["message"]


def test_export_zip(studio, captioned, annotation_store):
    state = opened(studio, captioned)
    traces, timed = recording(len(state.doc["words"]))
    state, _ = an.edit_event(state, {"op": "trace", "traces": traces, "timed_caption": timed, "rev": state.rev})
    state, _ = an.save(studio, state, "submitted", "hal")
    path, summary = panels.export(studio, ["submitted"])
    assert "1 LN record" in summary
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        record = json.loads(archive.read("pixelllm-corrections/corrections.ln.jsonl").decode())
    assert any(n.startswith("pixelllm-corrections/images/") for n in names)
    assert record["traces"] == annotate_doc.hold_trace_ends(traces, timed) and record["annotator_id"] == "hal"
    with pytest.raises(gr.Error, match="at least one status"):
        panels.export(studio, [])
    with pytest.raises(gr.Error, match="no accepted corrections to export"):  # not an empty zip
        panels.export(studio, ["accepted"])
    # the button: no file and why, so the page does not keep showing the previous zip as this export's
    assert panels.export_for_page(studio, ["submitted"])[0] is not None
    with pytest.warns(UserWarning, match="no accepted corrections"):  # gr.Warning outside a request
        assert panels.export_for_page(studio, ["accepted"]) == (
            None, "Nothing exported: no accepted corrections to export (an empty zip would be all you got)")


def test_compare_adapters(studio, captioned, tmp_path, example_images):
    from tests.conftest import _talkative
    from tests.helpers import small_model

    lock = threading.Lock()
    base_view, tuned_view, note = panels.compare_adapters(studio, captioned, lock)
    assert "No LoRA adapter is active" in note and tuned_view["message"] == "no LoRA adapter is active"
    assert tuned_view["image"] == base_view["image"]  # the image shown, not an "upload an image" placeholder
    model = small_model(seed=0)
    _talkative(model)  # an untrained model otherwise stops at once (see conftest)
    model.add_adapter("fix")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    own = ws.Studio(predictor=PixelLLMPredictor(model, device="cpu"), store=None)
    base_view, tuned_view, note = panels.compare_adapters(own, captioned, lock)
    assert own.predictor.adapter == "fix"  # restored
    assert "fix" in note and base_view["words"] and tuned_view["words"]
    assert base_view["message"].startswith("base model") and "fix" in tuned_view["message"]

    # a typed caption that was traced is compared as a trace: the same words, each model's boxes
    _, _, _, traced = cb.trace(own, captioned, "a large red circle", records.Visitor("s1"))
    base_view, tuned_view, note = panels.compare_adapters(own, traced, lock)
    assert "tracing the same caption" in note and own.predictor.adapter == "fix"
    assert [w["text"] for w in base_view["words"]] == [w["text"] for w in tuned_view["words"]] == \
        ["a", "large", "red", "circle"]
    assert [w["box"] for w in base_view["words"]] != [w["box"] for w in tuned_view["words"]]
    own.predictor.set_adapter(None)
    assert [w["box"] for w in base_view["words"]] == [w.to_dict()["box"] for w in own.predictor.trace(
        own.predictor.set_image(traced.array), "a large red circle").words]

    # a caption made under a box prompt is compared under that box, by both models
    own.predictor.set_adapter("fix")
    boxed, _ = ws.drag_box(ws.load_image(own, str(example_images[0]), None)[0], {"box": [10, 20, 110, 90]})
    *_, (_, _, _, boxed) = list(cb.generate(own, boxed, "", 6, False, 1.0, 1.0, None, records.Visitor("s1")))
    base_view, tuned_view, note = panels.compare_adapters(own, boxed, lock)
    predictor, state = own.predictor, own.predictor.set_image(boxed.array)
    budget = {"max_new_tokens": token_budget(own.default_max_words)}
    box = boxed.caption["prompts"]["box"]
    assert box == [10, 20, 110, 90]
    def words(**kwargs):  # this small random model says "we we ..." whatever it is shown: compare the boxes too
        return [(w.text, w.to_dict()["box"]) for w in predictor.caption(state, **budget, **kwargs).words]

    def shown(view):
        return [(w["text"], w["box"]) for w in view["words"]]

    assert shown(tuned_view) == words(box=box)
    with predictor.using_adapter(None):
        assert shown(base_view) == words(box=box) != words()  # the box mattered


def _kept_copy(view: dict) -> dict:
    """What static/annotate_unsaved.js keeps in localStorage for a page showing `view` (and sends back on Restore)."""
    src = view["source"]
    return {"opened": view["opened"], "login": view["login"], "task": view["task"],
            "timed_caption": view["timed_caption"],
            "traces": view["traces"],
            "source": {"image_sha": src["image_sha"], "generation_id": src["generation_id"],
                       "correction_id": src["correction_id"]},
            "words": [{"text": w["text"], "box": w["box"], "non_visual": w["non_visual"]} for w in view["words"]]}


def test_unsaved_edits_kept_by_the_page_are_restored_only_onto_their_output_and_base(studio, captioned,
                                                                                       annotation_store):
    """A reload drops the server-side document; the page keeps a copy of its unsaved edits and sends it back when the
    output is opened again (restore_kept). It is restored onto that same output only, as unsaved edits (undo goes back
    to the stored version), on the correction it was made on: a save is refused as superseded when someone else saved
    on that correction meanwhile, and the head's status comes from the store, not from the copy."""
    state = opened(studio, captioned)
    assert len(state.opened) >= 8 and an.editor_value(state)["opened"] == state.opened
    state, _ = an.save(studio, state, "draft", "ana")
    first = state.head_id
    state, _ = an.edit_event(state, {"op": "text", "i": 0, "text": "kept"})
    state, _ = an.edit_event(state, {"op": "non_visual", "i": 1, "value": True})
    copy_ = _kept_copy(an.editor_value(state))
    assert copy_["source"]["correction_id"] == first

    # the page reloaded: a new session opens the same correction and restores the copy
    fresh, view = an.open_item(studio, None, {"kind": "correction", "id": first})
    assert view["opened"] and view["opened"] != copy_["opened"] and not view["dirty"]
    fresh, view = an.restore_kept(studio, fresh, copy_)
    assert view["dirty"] and view["restored"] == copy_["opened"] and view["words"][0]["text"] == "kept"
    assert view["source"]["correction_id"] == first and "Restored the unsaved edits" in view["message"]
    undone, _ = an.history_event(copy_module.deepcopy(fresh), {"op": "undo"})
    assert not undone.dirty  # undo goes back to the version just opened
    # edits made after the offer appeared are not overwritten by a restore (the page's copy of them neither)
    edited, _ = an.edit_event(copy_module.deepcopy(undone), {"op": "text", "i": 0, "text": "mine"})
    with pytest.raises(gr.Error, match="unsaved edits of its own"):
        an.restore_kept(studio, edited, copy_)
    assert edited.doc["words"][0]["text"] == "mine"
    undone.rev = 1
    with pytest.raises(gr.Error, match="changed meanwhile"):  # a bool is not a revision (True == 1)
        an.restore_kept(studio, undone, {**copy_, "rev": True})
    fresh, view = an.save(studio, fresh, "draft", "ana")
    head = annotation_store.head(first)
    assert head["parent_id"] == first and head["words"][0] == "kept" and head["non_visual"] == [1]

    # another output (another generation of the same image): refused, never restored onto it
    gen = annotation_store.get_generation(captioned.last["generation_id"])
    other_id = annotation_store.log_generation(gen["image_sha"], gen["task"], gen["words"], gen["boxes"],
                                               model_id="test", model_version="0")
    other, _ = an.open_item(studio, None, {"kind": "generation", "id": other_id})
    with pytest.raises(gr.Error, match="another output"):
        an.restore_kept(studio, other, copy_)
    wrong = {**copy_, "source": {**copy_["source"], "image_sha": "0" * 64}}
    with pytest.raises(gr.Error, match="another output"):
        an.restore_kept(studio, an.open_item(studio, None, {"kind": "correction", "id": first})[0], wrong)

    # a copy made on `first`, restored after the chain moved on (someone else saved on it): the restore says so,
    # and the save is refused as superseded — the other row stays the head
    late, view = an.open_item(studio, None, {"kind": "correction", "id": first})
    assert view["source"]["correction_id"] == fresh.head_id != first
    late_copy = {**copy_, "words": [{**copy_["words"][0], "text": "late"}, *copy_["words"][1:]]}
    late, view = an.restore_kept(studio, late, late_copy)
    assert f"made on correction #{first}" in view["message"] and view["source"]["correction_id"] == first
    late, view = an.save(studio, late, "draft", "ana")
    assert "superseded" in view["message"] and late.dirty
    assert annotation_store.head(first)["id"] == fresh.head_id

    # opening another output over the restored edits: refused once, then discarded — the answer names the opening
    # whose kept copy the page drops
    with pytest.raises(gr.Error, match="unsaved edits"):
        an.open_item(studio, late, {"kind": "generation", "id": other_id})
    dropped = late.opened
    late, view = an.open_item(studio, late, {"kind": "generation", "id": other_id})
    assert view["discarded"] == dropped and view["opened"] != dropped

    # a copy equal to the version opened restores nothing (and does not move the editor onto its base)
    same, _ = an.open_item(studio, None, {"kind": "correction", "id": first})
    same, view = an.restore_kept(studio, same, copy_)
    assert not view["dirty"] and "nothing to restore" in view["message"]
    assert view["source"]["correction_id"] == fresh.head_id and view["restored"] == copy_["opened"]

    # the head's status comes from the store: a copy made on a submitted correction is not autosaved over it
    sub, _ = an.open_item(studio, None, {"kind": "correction", "id": fresh.head_id})
    sub, _ = an.save(studio, sub, "submitted", "ana")
    sub, _ = an.edit_event(sub, {"op": "text", "i": 0, "text": "after"})
    page = _kept_copy(an.editor_value(sub))
    page["source"]["status"] = "draft"  # a copy claiming otherwise is not believed
    again, _ = an.open_item(studio, None, {"kind": "correction", "id": sub.head_id})
    again, view = an.restore_kept(studio, again, page)
    assert view["source"]["status"] == "submitted"
    again, view = an.save(studio, again, "draft", "ana", auto=True)
    assert "Not autosaved" in view["message"] and annotation_store.head(first)["id"] == sub.head_id


def test_undo_after_restoring_kept_edits_made_on_another_base_goes_back_to_the_open_head(studio, captioned,
                                                                                           annotation_store):
    """Restore is one undoable step back to the version just opened; the base must follow. A copy made on the
    generation (a new chain), restored over an open correction of it, then undone: the editor shows that correction
    again, and an edit saved from there supersedes it (it started a second chain of the generation); redo takes the
    copy's base back."""
    state = opened(studio, captioned)
    state, _ = an.edit_event(state, {"op": "text", "i": 0, "text": "kept"})
    copy_ = _kept_copy(an.editor_value(state))
    assert copy_["source"]["correction_id"] is None  # made on the generation: a new chain
    other = opened(studio, captioned)  # meanwhile a chain of the generation is saved (another tab)
    other, _ = an.save(studio, other, "draft", "bob")
    head = other.head_id

    fresh, _ = an.open_item(studio, None, {"kind": "correction", "id": head})
    fresh, view = an.restore_kept(studio, fresh, copy_)
    assert view["source"]["correction_id"] is None and view["dirty"]
    fresh, view = an.history_event(fresh, {"op": "undo"})
    assert not view["dirty"] and view["source"]["correction_id"] == head  # back on the open head
    fresh, view = an.history_event(fresh, {"op": "redo"})
    assert view["dirty"] and view["source"]["correction_id"] is None  # the copy's base again
    fresh, _ = an.history_event(fresh, {"op": "undo"})
    fresh, _ = an.edit_event(fresh, {"op": "text", "i": 0, "text": "undone"})
    fresh, view = an.save(studio, fresh, "draft", "ana")
    saved = annotation_store.head(head)
    assert saved["parent_id"] == head and saved["words"][0] == "undone"


def test_a_copy_kept_under_another_login_is_not_restored(studio, captioned):
    """Behind --auth the page keeps its unsaved edits under the signed-in login (the editor value names it,
    `with_login`) and offers only that login's copies; the server also refuses a copy kept under another login
    (or made without one), and without --auth one made under a login."""
    state = opened(studio, captioned)
    assert an.editor_value(state)["login"] == ""
    state, view = an.with_login(an.edit_event(state, {"op": "text", "i": 0, "text": "ritas"}), "rita")
    assert view["login"] == "rita"
    copy_ = _kept_copy(view)
    assert copy_["login"] == "rita"
    for login, kept in (("sam", "rita"), ("sam", ""), (None, "rita"), ("rita", None)):
        fresh, _ = an.open_item(studio, None, {"kind": "generation", "id": captioned.last["generation_id"]})
        with pytest.raises(gr.Error, match="another login"):
            an.restore_kept(studio, fresh, {**copy_, "login": kept}, login)
        assert not fresh.dirty
    fresh, _ = an.open_item(studio, None, {"kind": "generation", "id": captioned.last["generation_id"]})
    fresh, view = an.restore_kept(studio, fresh, copy_, "rita")
    assert view["dirty"] and view["words"][0]["text"] == "ritas"
    fresh, _ = an.open_item(studio, None, {"kind": "generation", "id": captioned.last["generation_id"]})
    fresh, view = an.restore_kept(studio, fresh, {**copy_, "login": ""}, None)  # no --auth, no login: restored
    assert view["dirty"]

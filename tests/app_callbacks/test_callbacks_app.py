"""app.py and the Model panel (pixelllm/ui/callbacks.py): arguments and device choice; where the store goes on a
Space and what annotators are told; main() serves with the login, concurrency and address asked for; the panel
escapes what it shows and reads the checkpoint's evaluation (metrics.json) from any working directory.

The rest of tests/app_callbacks/: prompts and Inspect words: test_callbacks_prompts.py; captions, decoding options
and Trace: test_callbacks_caption.py; opening and replacing images: test_callbacks_images.py; Refer and Dense:
test_callbacks_refer_dense.py; downloads and the store: test_callbacks_records.py. Fixtures: conftest.py."""

from __future__ import annotations

import json
from pathlib import Path

import gradio as gr
import torch

from pixelllm.ui import callbacks as cb
from pixelllm.ui import render
from pixelllm.ui import workspace as ws

# ------------------------------------------------------------------------------------------ app.py

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


# ------------------------------------------------------------------------------------------ the Model panel

def test_model_panel_and_viewer_text_are_escaped(small_predictor, example_images):
    hostile = "<img src=x onerror=alert(1)>"
    panel = cb.model_panel(ws.Studio(predictor=small_predictor, checkpoint=hostile))
    assert "<img" not in panel and "&lt;img src=x onerror=alert(1)&gt;" in panel
    for key in ("checkpoint", "preset", "device", "dtype", "parameters", "adapter"):
        assert key in ws.Studio(predictor=small_predictor).model_info()
    assert render.escape('"><script>') == "&quot;&gt;&lt;script&gt;"


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

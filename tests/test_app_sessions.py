"""Memory per visitor: Gradio keeps every session's gr.State (the Session holds the uploaded image's pixels) and
its per-session component config; the app caps how many sessions keep them (`STATE_SESSION_CAPACITY`), so a
public Space's memory stays bounded however many visitors upload a photo and leave."""

from __future__ import annotations

import json
import uuid

import pytest


def _call(client, url: str, session_hash: str, fn_index: int, data: list) -> dict:
    """One event over Gradio's queue protocol, as the browser sends it."""
    joined = client.post(f"{url}gradio_api/queue/join", json={"data": data, "event_data": None, "fn_index": fn_index,
                                                             "trigger_id": None, "session_hash": session_hash})
    joined.raise_for_status()
    event_id = joined.json()["event_id"]
    with client.stream("GET", f"{url}gradio_api/queue/data", params={"session_hash": session_hash}) as resp:
        for line in resp.iter_lines():
            if line.startswith("data:"):
                msg = json.loads(line[5:])
                if msg.get("event_id") == event_id and msg.get("msg") == "process_completed":
                    assert msg.get("success"), str(msg)[:300]
                    return msg["output"]
    raise AssertionError("the event never completed")


@pytest.fixture
def capped_app(small_checkpoint, example_images, tmp_path, monkeypatch):
    import torch

    import app as app_module
    import pixelllm.ui
    from pixelllm import PixelLLM, PixelLLMPredictor
    from pixelllm.ui import build_demo
    from tests.conftest import free_port

    monkeypatch.setattr(pixelllm.ui, "STATE_SESSION_CAPACITY", 3, raising=False)
    torch.set_num_threads(1)
    predictor = PixelLLMPredictor(PixelLLM.from_pretrained(small_checkpoint), device="cpu")
    store = app_module.open_store(str(tmp_path / "annotations.db"))
    demo = build_demo(predictor, store, checkpoint=str(small_checkpoint), min_word_interval=0.0)
    port = free_port()
    app_module.launch(demo, host="127.0.0.1", port=port, block=False)
    yield f"http://127.0.0.1:{port}/", demo
    demo.close()
    store.close()


def test_sessions_that_upload_and_leave_do_not_accumulate(capped_app, example_images):
    import httpx

    from pixelllm.ui.workspace import Session

    url, demo = capped_app
    on_image = next(i for i, fn in demo.fns.items() if fn.name == "on_image")
    hashes = [uuid.uuid4().hex[:11] for _ in range(8)]
    with httpx.Client(timeout=120) as client:
        for i, session_hash in enumerate(hashes):  # 8 visitors, each uploads an image (and never comes back)
            image = example_images[i % len(example_images)]
            path = client.post(f"{url}gradio_api/upload",
                               files={"files": (image.name, image.read_bytes(), "image/png")}).json()[0]
            _call(client, url, session_hash, on_image,
                  [{"path": path, "orig_name": image.name, "meta": {"_type": "gradio.FileData"}}, None])

    held = demo.state_holder.session_data
    sessions = [v for s in held.values() for v in s.state_data.values() if isinstance(v, Session)]
    assert len(held) <= 3, f"{len(held)} sessions kept for 8 visitors who left"
    assert len(sessions) <= 3
    # the most recent visitor still has their image
    latest = [v for v in held[hashes[-1]].state_data.values() if isinstance(v, Session)]
    assert latest and latest[0].array is not None

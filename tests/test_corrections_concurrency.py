"""8 annotators submitting 25 corrections each through gradio_client at once: exactly 200 rows, none lost or
duplicated (the closing-the-loop issue's concurrency acceptance)."""

from __future__ import annotations

import io
import threading

import pytest
from PIL import Image

pytestmark = pytest.mark.slow


def test_eight_clients_times_twenty_five_corrections(served_app):
    from gradio_client import Client

    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (10, 120, 200)).save(buffer, format="PNG")
    sha = served_app.store.add_image(buffer.getvalue(), 64, 48, ext="png")
    before = len(served_app.store.list_corrections(heads_only=False, limit=10_000))
    errors: list[str] = []
    ids: list[int] = []
    lock = threading.Lock()
    start = threading.Barrier(8)

    def annotator(k: int) -> None:
        client = Client(served_app.url, download_files=False, verbose=False)
        start.wait()
        for i in range(25):
            payload = {"image_sha": sha, "annotator": f"concurrent-{k}", "status": "submitted",
                       "words": ["a", "blue", "rectangle", str(i)],
                       "boxes": [[0, 0, 10, 10], [5, 5, 20, 20], [0, 0, 64, 48], [1, 1, 2, 2]],
                       "client_token": f"c{k}-{i}"}
            try:
                result = client.predict(correction=payload, api_name="/save_correction")
                with lock:
                    ids.append(int(result["correction_id"]))
            except Exception as err:  # recorded and asserted below, with the message
                with lock:
                    errors.append(f"{k}/{i}: {err}")

    threads = [threading.Thread(target=annotator, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not errors, errors[:5]
    assert len(ids) == 200 and len(set(ids)) == 200
    rows = served_app.store.list_corrections(heads_only=False, limit=10_000)
    assert len(rows) - before == 200
    mine = [r for r in rows if r["annotator"].startswith("concurrent-")]
    assert sorted(r["id"] for r in mine) == sorted(ids)
    assert {(r["annotator"], r["words"][-1]) for r in mine} == {(f"concurrent-{k}", str(i))
                                                               for k in range(8) for i in range(25)}
    assert served_app.store.integrity_check() == "ok"

"""Concurrency soak: 500 mixed calls (caption, refer, dense, save correction) from 4 gradio_client clients against
one app process (`served_app`: the app launched in this process by app.py's `launch`, small random checkpoint).

Checked: every valid call succeeds; every generation the API reports is in the store exactly once; every
correction saved is in the store exactly once (retries with the same client_token return the first id, each
client's edit chain is intact); the database passes integrity_check. The process's RSS before and after is
printed and written to test-artifacts/soak.json (only a generous sanity bound is asserted).

Corrections go through the app's `/save_correction` API endpoint (the Annotate tab's); on a build without that
endpoint the client threads call the shared AnnotationStore's `save_correction` instead, and the report says so.
"""

from __future__ import annotations

import contextlib
import gc
import json
import sqlite3
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import psutil
import pytest
from gradio_client import Client, handle_file
from PIL import Image

CLIENTS = 4
CALLS_PER_CLIENT = 125  # 500 in all
# Half of the calls are saves (human-speed writes racing the app's own generation logging), half model calls.
CYCLE = ("caption", "save", "refer", "save", "dense", "save", "caption", "save")
RSS_SANITY_BOUND = 1.5e9  # bytes of growth that would mean a real leak (a request's worth is a few MB)


def _images(example_images: list[Path], folder: Path) -> list[Path]:
    """The examples plus a few odd sizes, so the embedding cache sees hits and misses."""
    extra = []
    for i, (w, h) in enumerate([(64, 48), (300, 120), (33, 200)]):
        path = folder / f"soak_{i}.png"
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        extra.append(path)
    return [*example_images, *extra]


def _count(db_path: Path, sql: str) -> int:
    with contextlib.closing(sqlite3.connect(db_path)) as conn:
        return conn.execute(sql).fetchone()[0]


class Worker(threading.Thread):
    def __init__(self, index: int, url: str, store, images: list[Path], use_api: bool = True):
        super().__init__(name=f"soak-client-{index}")
        self.index, self.url, self.store, self.images, self.use_api = index, url, store, images, use_api
        self.failures: list[str] = []
        self.generation_ids: list[int] = []
        self.saved: dict[str, int] = {}   # client_token -> correction id (first save)
        self.chain: list[int] = []        # this client's edit chain, in order
        self.head: dict = {}              # the chain head's words and boxes (an edit keeps to its image)
        self.latency: dict[str, list[float]] = {}
        self.calls = 0

    def run(self) -> None:
        rng = np.random.default_rng(self.index)
        client = Client(self.url, download_files=False, verbose=False)
        last: dict | None = None  # the last model output, what a correction corrects
        for i in range(CALLS_PER_CLIENT):
            op = CYCLE[(i + self.index) % len(CYCLE)]
            if op == "save" and last is None:  # nothing to correct yet
                op = "caption"
            image = self.images[int(rng.integers(len(self.images)))]
            start = time.perf_counter()
            try:
                if op == "save":
                    self._save(client, i, last, rng)
                else:
                    last = self._model_call(client, op, image, rng)
            except Exception as err:  # noqa: BLE001 - every failure is reported by the test
                self.failures.append(f"{op} #{i} on {image.name}: {type(err).__name__}: {err}")
            self.latency.setdefault(op, []).append(time.perf_counter() - start)
            self.calls += 1

    def _model_call(self, client: Client, op: str, image: Path, rng) -> dict:
        with Image.open(image) as img:
            w, h = img.size
        if op == "caption":
            prompts = [{}, {"box": [0, 0, w / 2, h / 2]}, {"points": [[w / 3, h / 3]]}][int(rng.integers(3))]
            out = client.predict(image=handle_file(str(image)), prompts=json.dumps(prompts), text="", max_words=3,
                                 do_sample=False, temperature=1.0, top_p=1.0, seed=-1, api_name="/caption")
            assert out["image"] == {"width": w, "height": h} and out["words"], out
            entry = {"words": [x["text"] for x in out["words"]], "boxes": [x["box"] for x in out["words"]]}
        elif op == "refer":
            out = client.predict(image=handle_file(str(image)), expressions="the red circle\nthe blue square",
                                 api_name="/refer")
            assert [r["expression"] for r in out["results"]] == ["the red circle", "the blue square"], out
            entry = {"words": [r["expression"] for r in out["results"]], "boxes": [r["box"] for r in out["results"]]}
        else:
            out = client.predict(image=handle_file(str(image)), score_threshold=0.0, max_regions=2, api_name="/dense")
            assert 1 <= len(out["regions"]) <= 2, out
            entry = {"words": [r["caption"] or "region" for r in out["regions"]],
                     "boxes": [r["box"] for r in out["regions"]]}
        assert isinstance(out["generation_id"], int), out
        self.generation_ids.append(out["generation_id"])
        return {**entry, "generation_id": out["generation_id"]}

    def _save(self, client: Client, i: int, last: dict, rng) -> None:
        annotator = f"annotator-{self.index}"
        if self.chain and rng.random() < 0.5:  # an edit of this client's current head (of the head's image)
            kwargs, base = dict(parent_id=self.chain[-1]), self.head
        else:
            kwargs, base = dict(generation_id=last["generation_id"]), last
        words = [w.upper() if rng.random() < 0.3 else w for w in base["words"]]
        kwargs.update(annotator=annotator, caption=" ".join(words), words=words, boxes=base["boxes"],
                      status="submitted" if i % 2 else "draft", client_token=f"soak-{self.index}-{i}")

        def save() -> int:
            if not self.use_api:
                return self.store.save_correction(**kwargs)
            out = client.predict(correction=kwargs, api_name="/save_correction")
            assert out["words"] == words and out["client_token"] == kwargs["client_token"], out
            return out["correction_id"]

        correction_id = save()
        if rng.random() < 0.25:  # a client retrying after a timeout: same token, same id, no new row
            again = save()
            assert again == correction_id, (again, correction_id)
        assert kwargs["client_token"] not in self.saved
        self.saved[kwargs["client_token"]] = correction_id
        if "parent_id" in kwargs or not self.chain:
            self.chain.append(correction_id)
            self.head = {"words": words, "boxes": base["boxes"]}


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_500_mixed_calls_from_4_clients(served_app, example_images, tmp_path, artifacts_dir):
    store, db = served_app.store, served_app.db_path
    endpoints = Client(served_app.url, download_files=False, verbose=False).view_api(
        print_info=False, return_format="dict")
    has_save_endpoint = "/save_correction" in endpoints["named_endpoints"]
    images = _images(example_images, tmp_path)
    warm = Worker(99, served_app.url, store, images)  # warm every code path before measuring memory
    for op in ("caption", "refer", "dense"):
        warm._model_call(Client(served_app.url, download_files=False, verbose=False), op, images[0],
                         np.random.default_rng(0))
    gc.collect()
    process = psutil.Process()
    rss_before = process.memory_info().rss
    corrections_before = _count(db, "SELECT count(*) FROM corrections")
    generations_before = _count(db, "SELECT count(*) FROM generations")

    workers = [Worker(i, served_app.url, store, images, use_api=has_save_endpoint) for i in range(CLIENTS)]
    started = time.perf_counter()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=800)
    elapsed = time.perf_counter() - started
    gc.collect()
    rss_after = process.memory_info().rss

    assert not any(w.is_alive() for w in workers), "a client hung"
    failures = [f for w in workers for f in w.failures]
    assert not failures, failures[:10]
    assert sum(w.calls for w in workers) == CLIENTS * CALLS_PER_CLIENT == 500

    # generations: every id the API reported is a distinct row; nothing else was logged meanwhile
    generation_ids = [g for w in workers for g in w.generation_ids]
    assert len(set(generation_ids)) == len(generation_ids)
    assert _count(db, "SELECT count(*) FROM generations") - generations_before == len(generation_ids)
    for gid in generation_ids[::25]:
        assert store.get_generation(gid) is not None

    # corrections: each save exactly once (retries included), under its token, chains intact
    saved = {token: cid for w in workers for token, cid in w.saved.items()}
    assert len(set(saved.values())) == len(saved)
    assert _count(db, "SELECT count(*) FROM corrections") - corrections_before == len(saved)
    with contextlib.closing(sqlite3.connect(db)) as conn:
        rows = dict(conn.execute("SELECT client_token, id FROM corrections WHERE client_token LIKE 'soak-%'"))
    assert rows == saved, "lost or duplicated corrections"
    for worker in workers:
        if worker.chain:
            history = [r["id"] for r in store.history(worker.chain[-1])]
            assert history == worker.chain, (worker.name, history, worker.chain)
            assert {r["annotator"] for r in store.history(worker.chain[-1])} == {f"annotator-{worker.index}"}
    assert store.integrity_check() == "ok"

    latency = Counter()
    for w in workers:
        for op, values in w.latency.items():
            latency[op] += len(values)
    percentiles = {op: {"n": latency[op], "p50_s": round(float(np.percentile(v, 50)), 3),
                        "p95_s": round(float(np.percentile(v, 95)), 3)}
                   for op in latency for v in [[x for w in workers for x in w.latency.get(op, [])]]}
    report = {"calls": 500, "clients": CLIENTS, "elapsed_s": round(elapsed, 1), "failures": 0,
              "generations": len(generation_ids), "corrections": len(saved),
              "rss_before_mb": round(rss_before / 2**20, 1), "rss_after_mb": round(rss_after / 2**20, 1),
              "rss_growth_mb": round((rss_after - rss_before) / 2**20, 1), "latency": percentiles,
              "save_path": "/save_correction API" if has_save_endpoint else "AnnotationStore.save_correction "
                           "called from the client threads (no /save_correction endpoint yet)"}
    (artifacts_dir / "soak.json").write_text(json.dumps(report, indent=2))
    print("\nsoak:", json.dumps(report))
    assert rss_after - rss_before < RSS_SANITY_BOUND, report

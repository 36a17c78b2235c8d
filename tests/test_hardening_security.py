"""Hardening: security. Typed and model-made text stays text in the browser; server files (the annotation
database, its images, the weights, the code) are not reachable through the web app's file routes; uploads are
capped. Rows of docs/hardening.md name these tests; safetensors-only loading and export paths are tested in
tests/model/test_model_persistence.py and tests/export/test_export_refusals.py.

`served_app` (conftest) is the app launched by app.py's own `launch`; the browser test serves a model whose every
word and region caption is an HTML/JS payload.
"""

from __future__ import annotations

import http.client
import re
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import quote, urlsplit

import httpx
import pytest
import torch

from pixelllm.ui import callbacks as cb
from pixelllm.ui import workspace as ws
from tests.helpers import set_slider

ROOT = Path(__file__).resolve().parents[1]
SQLITE_HEADER = b"SQLite format 3\x00"
TIMEOUT = 20_000  # ms

PAYLOADS = [
    '<img src=x onerror="window.__pwned=1">',
    "<script>window.__pwned=2</script>",
    '"><svg onload="window.__pwned=3">',
    "<b>bold</b>&amp;",
]


# ------------------------------------------------------------------------------------------ file routes

def _get_raw(base: str, target: str) -> tuple[int, bytes]:
    """GET with the request target sent byte for byte (httpx would normalise away `../`)."""
    parts = urlsplit(base)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        conn.putrequest("GET", target, skip_accept_encoding=True)
        conn.endheaders()
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def _served_roots(served_app) -> list[Path]:
    """Every folder Gradio's file route serves from for this app (gradio.route_utils.file_fetch)."""
    from gradio import utils
    from gradio.data_classes import _StaticFiles

    blocks = served_app.demo
    roots = [utils.get_upload_folder(), str(utils.get_cache_folder()), *blocks.allowed_paths, *_StaticFiles.all_paths]
    return [Path(r).resolve() for r in roots]


def _inside(path: Path, root: Path) -> bool:
    return path.resolve() == root or root in path.resolve().parents


def test_database_and_server_files_are_not_served(served_app):
    store = served_app.store
    sha = store.add_image((ROOT / "assets" / "examples" / "example_000000.png").read_bytes(), 256, 256)
    secrets = {
        "database": served_app.db_path,
        "wal": Path(f"{served_app.db_path}-wal"),
        "stored image": Path(store.get_image(sha)["abs_path"]),
        "weights": served_app.checkpoint / "model.safetensors",
        "app source": ROOT / "app.py",
        "system file": Path("/etc/passwd"),
    }
    assert all(p.exists() for name, p in secrets.items() if name != "wal")
    db = str(served_app.db_path)
    up = "../" * 12
    attempts = [f"/gradio_api/file={quote(str(p))}" for p in secrets.values()]
    attempts += [
        f"/file={db}",
        f"/gradio_api/file/{db}",                                  # the deprecated route
        f"/gradio_api/file={up}{db.lstrip('/')}",                  # ../ climbing out of the working directory
        f"/gradio_api/file={quote(up + db.lstrip('/'), safe='')}",  # the same, percent-encoded
        f"/gradio_api/file={served_app.db_path.parent}/./{served_app.db_path.name}",
        "/gradio_api/file=..%2F..%2F..%2F..%2F..%2F..%2F..%2F..%2Fetc%2Fpasswd",
        f"/gradio_api/file={_upload_dir()}/{up}{db.lstrip('/')}",  # from a served folder, climbing out
        "/gradio_api/file=data/annotations.db",                    # the default --db, relative to the app folder
        "/gradio_api/file=app.py",
    ]
    for target in attempts:
        status, body = _get_raw(served_app.url, target)
        assert status in (403, 404), (target, status)
        assert not body.startswith(SQLITE_HEADER) and b"root:x:0:0" not in body, target
    # none of them lives under a folder Gradio serves (uploads, example cache, allowed and static paths)
    roots = _served_roots(served_app)
    for name, path in secrets.items():
        assert not any(_inside(path, root) for root in roots), (name, path, roots)
    assert not any(_inside(ROOT / "data" / "annotations.db", root) for root in roots)


def _upload_dir() -> str:
    from gradio import utils

    return utils.get_upload_folder()


def test_uploads_are_served_back_positive_control(served_app):
    """The route used above does serve what was uploaded: the 403s are not a wrong URL."""
    base = served_app.url.rstrip("/")
    png = (ROOT / "assets" / "examples" / "example_000001.png").read_bytes()
    response = httpx.post(f"{base}/gradio_api/upload", files={"files": ("ok.png", png, "image/png")}, timeout=60)
    assert response.status_code == 200, response.text
    [path] = response.json()
    assert _get_raw(served_app.url, f"/gradio_api/file={path}") == (200, png)


def test_upload_over_the_cap_is_refused(served_app):
    from gradio.utils import _parse_file_size

    from pixelllm.ui import MAX_FILE_SIZE

    cap = _parse_file_size(MAX_FILE_SIZE)
    assert cap == 25 * 1024 * 1024
    assert served_app.demo.max_file_size == cap  # app.launch passed it
    before = {p for p in Path(_upload_dir()).rglob("*") if p.is_file()}
    big = b"\x89PNG\r\n\x1a\n" + b"\0" * (cap + 1024)
    response = httpx.post(f"{served_app.url.rstrip('/')}/gradio_api/upload",
                          files={"files": ("huge.png", big, "image/png")}, timeout=120)
    assert response.status_code == 413, (response.status_code, response.text[:200])
    assert "maximum allowed size" in response.text
    left = {p for p in Path(_upload_dir()).rglob("*") if p.is_file()} - before
    assert not [p for p in left if p.stat().st_size > cap], "no partial upload is kept"
    small = httpx.post(f"{served_app.url.rstrip('/')}/gradio_api/upload",  # the app still takes uploads
                       files={"files": ("ok.png", big[: 1024 * 1024], "image/png")}, timeout=60)
    assert small.status_code == 200


def test_server_made_html_escapes_user_and_model_text(small_predictor):
    studio = ws.Studio(predictor=small_predictor, checkpoint=PAYLOADS[0] + PAYLOADS[1])
    html = cb.model_panel(studio)
    assert "<img" not in html and "<script" not in html
    assert "&lt;img src=x onerror=&quot;window.__pwned=1&quot;&gt;" in html


# ------------------------------------------------------------------------------------------ browser

@pytest.fixture(scope="module")
def hostile_app(small_checkpoint, example_images, tmp_path_factory):
    """The studio with a model whose words and region captions are HTML/JS payloads, and a payload as its
    checkpoint name (shown in the Model tab)."""
    import app as app_module
    from pixelllm import PixelLLM, PixelLLMPredictor
    from pixelllm.store import AnnotationStore
    from pixelllm.ui import build_demo
    from tests.conftest import free_port

    class HostilePredictor(PixelLLMPredictor):
        def stream_caption(self, state, **kwargs):
            for word in super().stream_caption(state, **kwargs):
                word.text = PAYLOADS[word.index % len(PAYLOADS)]
                yield word

        def dense_caption(self, state, **kwargs):
            regions = super().dense_caption(state, **kwargs)
            for region in regions:
                for word in region.caption.words:
                    word.text = PAYLOADS[word.index % len(PAYLOADS)]
                region.caption.text = " ".join(w.text for w in region.caption.words) or PAYLOADS[0]
            return regions

    torch.set_num_threads(1)
    predictor = HostilePredictor(PixelLLM.from_pretrained(small_checkpoint), device="cpu")
    folder = tmp_path_factory.mktemp("hostile-store")  # removed with pytest's other temporary folders
    store = AnnotationStore(folder / "annotations.db")
    demo = build_demo(predictor, store, checkpoint=PAYLOADS[0], examples=[str(p) for p in example_images],
                      min_word_interval=0.0)
    port = free_port()
    app_module.launch(demo, host="127.0.0.1", port=port, block=False)
    yield SimpleNamespace(url=f"http://127.0.0.1:{port}/", store=store)
    demo.close()
    store.close()


@pytest.mark.browser
def test_typed_and_model_html_never_executes(page, hostile_app, artifacts_dir):
    from playwright.sync_api import expect

    errors: list[str] = []
    dialogs: list[str] = []
    page.on("pageerror", lambda err: errors.append(f"pageerror: {err}"))
    page.on("console", lambda msg: errors.append(f"console.error: {msg.text}") if msg.type == "error" else None)
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    page.set_viewport_size({"width": 1400, "height": 1000})
    page.set_default_timeout(TIMEOUT)
    page.goto(hostile_app.url)

    page.locator("#examples button").first.click()
    expect(page.locator("#caption-viewer .px-stage.px-has-image")).to_have_count(1, timeout=TIMEOUT)
    typed = '<img src=x onerror="window.__pwned=1"> <script>alert(1)</script>'
    page.locator("#text-prompt textarea").fill(typed)
    page.locator("#generate").click()
    root = page.locator("#caption-viewer .px-root")
    expect(root).to_have_attribute("data-status", "done", timeout=TIMEOUT)

    row = hostile_app.store.list_generations(task="caption", limit=1)[0]
    assert row["prompts"]["text"] == typed  # the typed text reached the model as text
    n = len(row["words"])
    assert n >= 2 and row["words"][:2] == PAYLOADS[:2]
    shown = page.locator("#caption-viewer .px-word").all_text_contents()
    assert [t.strip() for t in shown] == row["words"]  # rendered literally, as text
    expect(page.locator("#caption-text textarea")).to_have_value(" ".join(row["words"]))

    page.get_by_role("tab", name="Dense captions").click()
    expect(page.locator("#dense-viewer .px-stage.px-has-image")).to_have_count(1, timeout=TIMEOUT)
    set_slider(page, "dense-threshold", "0")
    page.locator("#dense-run").click()
    rows = page.locator("#dense-viewer .px-region-row .px-region-text")
    expect(rows.first).to_be_visible(timeout=TIMEOUT)
    dense_row = hostile_app.store.list_generations(task="dense", limit=1)[0]
    assert [t.strip() for t in rows.all_text_contents()] == dense_row["words"]
    page.locator("#dense-viewer .px-region-row").first.click()
    expect(page.locator("#dense-viewer .px-root")).to_have_attribute("data-status", "done", timeout=TIMEOUT)

    page.get_by_role("tab", name="Model").click()
    expect(page.locator("#model-panel")).to_contain_text(PAYLOADS[0])  # the checkpoint name, as text
    page.screenshot(path=str(artifacts_dir / "hardening-xss.png"))

    assert page.evaluate("typeof window.__pwned") == "undefined"
    assert page.locator('img[src="x"]').count() == 0
    # no <script> element made of a payload (Gradio's own config <script> holds the escaped Model-tab HTML as JSON)
    assert not page.evaluate("[...document.scripts].some(s => /^\\s*window\\.__pwned/.test(s.textContent))")
    assert page.locator("svg[onload]").count() == 0
    assert not dialogs, dialogs
    assert not [e for e in errors if re.search(r"pwned|Failed to load resource", e)], errors
    assert not errors, errors


def test_auth_keeps_logged_outputs_from_visitors_who_have_not_logged_in(small_predictor, example_images,
                                                                       annotation_store):
    """Every visitor can browse every logged output and export every correction: `--auth` (or $PIXELLLM_AUTH)
    puts the whole app, page and API, behind a login; a correction is then stored under the login, not under
    a name the client types."""
    import argparse

    from gradio_client import Client, handle_file

    import app as app_module
    from pixelllm.ui import build_demo
    from tests.conftest import free_port

    assert app_module.parse_auth("ann:s3:cret, rev:pw") == [("ann", "s3:cret"), ("rev", "pw")]
    for bad in ("ann", "ann:", ":pw", "ann:pw,"):
        with pytest.raises(argparse.ArgumentTypeError, match="USER:PASSWORD"):
            app_module.parse_auth(bad)
    demo = build_demo(small_predictor, annotation_store, min_word_interval=0.0)
    port = free_port()
    app_module.launch(demo, host="127.0.0.1", port=port, block=False, auth=[("ann", "s3:cret")])
    url = f"http://127.0.0.1:{port}/"
    try:
        for path in ("config", "gradio_api/info"):
            assert httpx.get(url + path, timeout=30).status_code == 401, path
        with pytest.raises(ValueError, match="Could not login"):
            Client(url, auth=("ann", "wrong"), verbose=False)
        client = Client(url, auth=("ann", "s3:cret"), verbose=False)
        out = client.predict(handle_file(str(example_images[0])), "", "", 3, False, 1.0, 1.0, -1, 1.0,
                             api_name="/caption")
        assert len(out["words"]) == 3
        generation = out["generation_id"]
        assert annotation_store.get_generation(generation)["user"] == "ann"  # each output logs who asked
        saved = client.predict({"generation_id": generation, "words": ["a"], "boxes": [[1, 1, 9, 9]]},
                               api_name="/save_correction")
        assert annotation_store.get_correction(saved["correction_id"])["annotator"] == "ann"
        with pytest.raises(Exception, match="signed in as 'ann'"):
            client.predict({"generation_id": generation, "annotator": "bob", "words": ["b"],
                            "boxes": [[1, 1, 9, 9]]}, api_name="/save_correction")
        assert [c["annotator"] for c in annotation_store.list_corrections()] == ["ann"]
    finally:
        demo.close()

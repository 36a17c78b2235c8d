"""Shared test setup and fixtures (keep them general: every test module may use them).

Environment, set before anything imports gradio or huggingface_hub: no network (`HF_HUB_OFFLINE=1`), no
analytics, and a fresh `GRADIO_TEMP_DIR` per run (the default /tmp/gradio is shared by everything on the
machine); it is removed at the end of the run.

Models:
- `small_checkpoint` / `small_pixelllm` / `small_predictor`: a few-hundred-thousand-parameter random PixelLLM
  built from the tiny preset with smaller ViT/T5 (tests/helpers.py), saved with `save_pretrained` and loaded back
  with `PixelLLM.from_pretrained` — the real code both ways. Its embedding rows of word-continuation pieces and
  of EOS are shrunk before saving, so that greedy decoding of this untrained model emits many whole words
  (an untrained model otherwise glues one token to itself forever or stops at once), which the app tests need.
- `app_checkpoint`: what end-to-end (browser) tests serve. `PIXELLLM_TEST_CHECKPOINT` if set, else the embedded
  model `assets/checkpoints/shapes-tiny` when it exists (real words and traces), else `small_checkpoint`.

Browser: pytest-playwright's `page` fixture is the one style used in the whole run; `browser_type_launch_args`
points it at Debian's Chromium (/usr/bin/chromium; `make browser` installs it). Tests marked `browser` are
skipped with a reason when that binary is missing.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
_GRADIO_TMP = tempfile.mkdtemp(prefix="pixelllm-gradio-")
os.environ["GRADIO_TEMP_DIR"] = _GRADIO_TMP

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
EMBEDDED_CHECKPOINT = ROOT / "assets" / "checkpoints" / "shapes-tiny"
EXAMPLES_DIR = ROOT / "assets" / "examples"
ARTIFACTS = ROOT / "test-artifacts"


def pytest_sessionfinish(session, exitstatus) -> None:
    shutil.rmtree(_GRADIO_TMP, ignore_errors=True)


def pytest_collection_modifyitems(config, items) -> None:
    if CHROMIUM.exists():
        return
    skip = pytest.mark.skip(reason=f"{CHROMIUM} missing: run `make browser` (apt-get install chromium)")
    for item in items:
        if "browser" in item.keywords:
            item.add_marker(skip)


# ------------------------------------------------------------------------------------------ models

def _talkative(model) -> None:
    """Shrink the (tied) embeddings of word-continuation pieces and of EOS so that greedy decoding of a random
    model produces many separate words instead of one endless word or nothing."""
    import torch

    from pixelllm.tokenizer import _word_start_table

    starts = torch.tensor(_word_start_table(model.tokenizer))
    with torch.no_grad():
        weight = model.language_model.get_input_embeddings().weight
        weight[~starts[: weight.shape[0]]] *= 0.2
        weight[model.config.eos_token_id] *= 0.2


@pytest.fixture(scope="session")
def small_checkpoint(tmp_path_factory) -> Path:
    """A small random PixelLLM checkpoint directory (config.json, model.safetensors, tokenizer)."""
    from tests.helpers import small_model

    model = small_model(seed=0)
    _talkative(model)
    directory = tmp_path_factory.mktemp("small-checkpoint")
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def small_pixelllm(small_checkpoint):
    from pixelllm import PixelLLM

    return PixelLLM.from_pretrained(small_checkpoint)


@pytest.fixture(scope="session")
def small_predictor(small_pixelllm):
    from pixelllm import PixelLLMPredictor

    return PixelLLMPredictor(small_pixelllm, device="cpu")


@pytest.fixture(scope="session")
def app_checkpoint(request) -> Path:
    """The checkpoint end-to-end tests serve (see the module docstring for the order of preference)."""
    override = os.environ.get("PIXELLLM_TEST_CHECKPOINT")
    if override:
        return Path(override)
    if (EMBEDDED_CHECKPOINT / "model.safetensors").is_file():
        return EMBEDDED_CHECKPOINT
    return request.getfixturevalue("small_checkpoint")


@pytest.fixture(scope="session")
def example_images() -> list[Path]:
    """The Shapes example images shipped in assets/examples (the app's Examples row)."""
    images = sorted(EXAMPLES_DIR.glob("*.png"))
    if not images:
        pytest.fail(f"no example images in {EXAMPLES_DIR}")
    return images


@pytest.fixture
def annotation_store(tmp_path):
    """A fresh AnnotationStore in a temporary folder, closed after the test."""
    from pixelllm.store import AnnotationStore

    store = AnnotationStore(tmp_path / "annotations.db")
    yield store
    store.close()


@pytest.fixture
def upload():
    """Copies an image into gradio's upload folder (GRADIO_TEMP_DIR), as an upload from a page puts it there;
    returns its path."""
    import uuid

    from gradio.utils import get_upload_folder

    def put(path: Path) -> str:
        folder = Path(get_upload_folder()) / uuid.uuid4().hex
        folder.mkdir(parents=True)
        return str(shutil.copy(path, folder / path.name))
    return put


# ------------------------------------------------------------------------------------------ browser

@pytest.fixture(scope="session")
def browser_type_launch_args(browser_type_launch_args):
    return {
        **browser_type_launch_args,
        "executable_path": str(CHROMIUM),
        "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"],
    }


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    """test-artifacts/ at the repository root (screenshots and the like; git-ignored)."""
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS


# ------------------------------------------------------------------------------------------ served app (API)

def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def served_app(small_checkpoint, tmp_path_factory):
    """The studio serving `small_checkpoint` from this process on a free port, launched by app.py's own `launch`
    (same upload cap, queue and concurrency as `python app.py`), with a fresh AnnotationStore. For gradio_client
    and raw-HTTP tests. Yields SimpleNamespace(url, demo, studio, store, db_path, checkpoint)."""
    from types import SimpleNamespace

    import torch

    import app as app_module
    from pixelllm import PixelLLM, PixelLLMPredictor
    from pixelllm.ui import build_demo

    torch.set_num_threads(1)
    predictor = PixelLLMPredictor(PixelLLM.from_pretrained(small_checkpoint), device="cpu")
    db_path = tmp_path_factory.mktemp("served-store") / "annotations.db"
    store = app_module.open_store(str(db_path))
    demo = build_demo(predictor, store, checkpoint=str(small_checkpoint), min_word_interval=0.0)
    port = free_port()
    app_module.launch(demo, host="127.0.0.1", port=port, block=False)
    yield SimpleNamespace(url=f"http://127.0.0.1:{port}/", demo=demo, studio=demo.studio, store=store,
                          db_path=db_path, checkpoint=small_checkpoint)
    demo.close()
    store.close()


def start_studio(checkpoint, example_images, store_path, auth=None, port=None):
    """Launch the real app (build_demo) in this process on a free port (or `port`: a restart on the same address);
    returns url/store/demo. Close with `stop_studio`. auth: (user, password) pairs to put it behind a login, as
    `app.py --auth`."""
    from types import SimpleNamespace

    import torch

    from pixelllm import PixelLLM, PixelLLMPredictor
    from pixelllm.store import AnnotationStore
    from pixelllm.ui import MAX_FILE_SIZE, build_demo

    torch.set_num_threads(1)
    predictor = PixelLLMPredictor(PixelLLM.from_pretrained(checkpoint), device="cpu")
    store = AnnotationStore(store_path)
    demo = build_demo(predictor, store, checkpoint=str(checkpoint), examples=[str(p) for p in example_images])
    port = port or free_port()
    demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=port, quiet=True, ssr_mode=False,
                max_file_size=MAX_FILE_SIZE, auth=auth)
    return SimpleNamespace(url=f"http://127.0.0.1:{port}/", store=store, demo=demo, predictor=predictor)


def stop_studio(studio) -> None:
    studio.demo.close()
    studio.store.close()

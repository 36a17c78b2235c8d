"""Ratio 5 (app overhead through gradio_client, beside its floors) and the app's peak RSS."""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from pixelllm import image as imaging
from pixelllm.bench.core import ROOT, Bench, Ratio, ban_eos, median_ms, ratio_of
from pixelllm.predictor import PixelLLMPredictor
from pixelllm.ui.decoding import token_budget


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def predictor_stream(pred: PixelLLMPredictor, array: np.ndarray, words: int) -> tuple[int, float]:
    """The predictor's part of an app caption (same decoding budget as the app's /caption): set_image (cached)
    and stream until `words` words. Returns (words, seconds to the first word)."""
    start = time.perf_counter()
    first = math.nan
    count = 0
    stream = pred.stream_caption(pred.set_image(array), max_new_tokens=token_budget(words))
    with contextlib.closing(stream):
        for count, _word in enumerate(stream, start=1):
            if count == 1:
                first = time.perf_counter() - start
            if count >= words:
                break
    return count, first


def bench_app(b: Bench, absolute: dict[str, Any]) -> Ratio:
    s = b.settings
    ratio = Ratio("app_overhead", f"app overhead: /caption via gradio_client / predictor ({s.app_words} words)",
                  1.5, "<=")
    pred = b.predictor
    path = b.workdir / "bench_0.png"
    array = imaging.load_image(path)
    pred.set_image(array)
    stats: dict[str, list] = {"words": [], "first": []}

    def alone() -> None:
        count, first = predictor_stream(pred, array, s.app_words)
        stats["words"].append(count)
        stats["first"].append(first)

    with ban_eos(b.model):  # the app shares this model: both sides write the same app_words-word caption
        try:
            from pixelllm.ui import build_demo
        except ImportError as err:
            ratio.reason = f"app missing ({err})"
            times = b.interleave({"predictor": alone}, reps=s.app_reps)
        else:
            times = _app_times(b, build_demo, path, alone, ratio)
    pred_s = statistics.median(times["predictor"])
    timed = len(times["predictor"])  # the warm-up calls came first: keep the timed ones
    words = statistics.median(stats["words"][-timed:])
    firsts = [x for x in stats["first"][-timed:] if math.isfinite(x)]
    absolute["time_to_first_word_ms"] = round(1000 * statistics.median(firsts), 2) if firsts else None
    absolute["words_per_s"] = round(words / pred_s, 2)
    absolute["stream_words"] = words
    if "app" in times:
        ratio.value = ratio_of(times["app"], times["predictor"])
        ratio.detail.update(app_ms=median_ms(times["app"]))
    ratio.detail.update(predictor_ms=median_ms(times["predictor"]), predictor_words=words, image=path.name)
    return ratio


def _app_times(b: Bench, build_demo: Callable, path: Path, alone: Callable[[], None],
               ratio: Ratio) -> dict[str, list[float]]:
    import httpx
    from gradio_client import Client, handle_file

    from pixelllm.store import AnnotationStore
    from pixelllm.ui import api

    s = b.settings
    store = AnnotationStore(b.workdir / "annotations.db")  # the app logs every generation, as in production
    demo = build_demo(b.predictor, store, checkpoint="bench", examples=[])
    port = _free_port()
    demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=port, quiet=True, ssr_mode=False)
    floor_demo = _noop_demo()
    floor_port = _free_port()
    floor_demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=floor_port, quiet=True,
                      ssr_mode=False)
    try:
        client = Client(f"http://127.0.0.1:{port}/", download_files=False, verbose=False)
        endpoints = client.view_api(return_format="dict", print_info=False)["named_endpoints"]
        if "/caption" not in endpoints:
            ratio.reason = "app has no /caption endpoint"
            return b.interleave({"predictor": alone}, reps=s.app_reps)
        # The /caption contract: image file, prompts JSON, text prompt, decoding options -> words + boxes.
        args = {"prompts": "", "text": "", "max_words": s.app_words, "do_sample": False, "temperature": 1.0,
                "top_p": 1.0, "seed": -1, "repetition_penalty": b.model.config.repetition_penalty}  # as `alone`
        order = [p["parameter_name"] for p in endpoints["/caption"]["parameters"]]
        app_words: dict[str, list[int]] = {"app": [], "http": [], "callback": []}

        def via_app() -> None:
            result = client.predict(image=handle_file(str(path)), **args, api_name="/caption")
            app_words["app"].append(len(result["words"]))

        http = httpx.Client(base_url=f"http://127.0.0.1:{port}/gradio_api/", timeout=300)

        def via_http() -> None:  # the same endpoint through Gradio's HTTP call API, as curl or a browser would
            with open(path, "rb") as handle:
                uploaded = http.post("upload", files={"files": (path.name, handle, "image/png")}).json()[0]
            image = {"path": uploaded, "meta": {"_type": "gradio.FileData"}}
            data = [image if name == "image" else args[name] for name in order]
            event = http.post("call/caption", json={"data": data}).json()["event_id"]
            app_words["http"].append(len(_sse_result(http, f"call/caption/{event}")[0]["words"]))

        def via_callback() -> None:  # the app's handler without Gradio: file read, decode, caption, store log
            result = api.caption(demo.studio, str(path), **args)
            app_words["callback"].append(len(result["words"]))

        # gradio_client's own floor: the same upload, queue and event stream to an endpoint that does nothing.
        floor_client = Client(f"http://127.0.0.1:{floor_port}/", download_files=False, verbose=False)

        def via_floor() -> None:
            floor_client.predict(handle_file(str(path)), api_name="/noop")

        times = b.interleave({"app": via_app, "predictor": alone, "http": via_http, "callback": via_callback,
                              "client_floor": via_floor}, reps=s.app_reps)
        pred = statistics.median(times["predictor"])
        floor = statistics.median(times["client_floor"])
        ratio.detail.update(
            client_floor_ms=round(1000 * floor, 1),
            app_minus_floor_ratio=round((statistics.median(times["app"]) - floor) / pred, 3),
            app_words=statistics.median(app_words["app"]),
            http_api_ms=median_ms(times["http"]), http_api_ratio=round(statistics.median(times["http"]) / pred, 3),
            callback_ms=median_ms(times["callback"]),
            callback_ratio=round(statistics.median(times["callback"]) / pred, 3),
            gradio_client_extra_ms=round(1000 * (statistics.median(times["app"])
                                                 - statistics.median(times["http"])), 1))
        http.close()
        return times
    finally:
        with contextlib.redirect_stdout(sys.stderr):  # gradio prints "Closing server..." on stdout
            demo.close()
            floor_demo.close()
        store.close()


def _noop_demo() -> Any:
    """A Gradio app whose one queued endpoint takes a file like /caption does and returns at once."""
    import gradio as gr

    with gr.Blocks() as floor:
        file = gr.File(type="filepath")
        out = gr.JSON()
        gr.Button().click(lambda _path: {"words": []}, file, out, api_name="noop")
    floor.queue()
    return floor


def _sse_result(http: Any, url: str) -> Any:
    """Read a Gradio call-API event stream to its end; return the `complete` event's data."""
    event = None
    with http.stream("GET", url) as resp:
        for line in resp.iter_lines():
            if line.startswith("event:"):
                event = line.split(":", 1)[1].strip()
            elif line.startswith("data:") and event in ("complete", "error"):
                if event == "error":
                    raise RuntimeError(f"/caption failed through the HTTP API: {line[5:].strip()}")
                return json.loads(line[5:])
    raise RuntimeError("/caption: the event stream ended without a result")


def app_peak_rss(checkpoint: str, device: str, workdir: Path, calls: int) -> dict[str, Any]:
    """Start `app.py` with the checkpoint as a subprocess, make a few /caption and /dense calls, and read its
    peak resident memory (VmHWM on Linux; otherwise the largest RSS psutil sampled)."""
    import psutil
    from gradio_client import Client, handle_file

    app = ROOT / "app.py"
    if not app.is_file():
        return {"app_peak_rss_mb": None, "reason": "app missing (no app.py)"}
    port = _free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False",
           "GRADIO_TEMP_DIR": str(workdir / "gradio-app")}
    cmd = [sys.executable, str(app), "--checkpoint", checkpoint, "--device", device, "--port", str(port),
           "--host", "127.0.0.1", "--db", str(workdir / "app.db")]
    log = open(workdir / "app.log", "wb")
    proc = subprocess.Popen(cmd, cwd=str(ROOT), env=env, stdout=log, stderr=subprocess.STDOUT)
    peak = {"rss": 0}
    stop = threading.Event()

    def sample() -> None:
        ps = psutil.Process(proc.pid)
        while not stop.wait(0.05):
            try:
                peak["rss"] = max(peak["rss"], ps.memory_info().rss)
            except psutil.Error:
                return

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        url = f"http://127.0.0.1:{port}/"
        deadline = time.time() + 300
        while True:
            if proc.poll() is not None:
                tail = (workdir / "app.log").read_text(errors="replace")[-2000:]
                return {"app_peak_rss_mb": None, "reason": f"app.py exited with {proc.returncode}: {tail}"}
            try:
                urllib.request.urlopen(url, timeout=2).close()
                break
            except OSError:
                if time.time() > deadline:
                    return {"app_peak_rss_mb": None, "reason": "app.py did not start within 300 s"}
                time.sleep(0.5)
        client = Client(url, download_files=False, verbose=False)
        image = handle_file(str(workdir / "bench_0.png"))
        for _ in range(calls):
            client.predict(image=image, prompts="", text="", max_words=40, do_sample=False, temperature=1.0,
                           top_p=1.0, seed=-1, api_name="/caption")
        client.predict(image=image, score_threshold=0.3, max_regions=16, api_name="/dense")
        hwm = _vm_hwm(proc.pid)
        stop.set()
        sampler.join()
        rss = hwm if hwm is not None else peak["rss"]
        return {"app_peak_rss_mb": round(rss / 2**20, 1), "app_rss_source": "VmHWM" if hwm else "psutil samples",
                "app_calls": f"{calls} x /caption (40 words) + 1 x /dense"}
    finally:
        stop.set()
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _vm_hwm(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None

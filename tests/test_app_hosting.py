"""`python app.py` as a host runs it: the address it listens on, its temporary folder, what it prints when it
starts, and how it stops (SIGTERM from docker / systemd / a Space restarting; Ctrl+C). Real processes where the
behaviour is the process's (start-up output, signals, exit status); in-process where a function decides."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import EXAMPLES_DIR, ROOT, free_port


class AppProcess:
    """`python app.py ARGS` with its stdout and stderr collected line by line as they come."""

    def __init__(self, args: list[str], cwd: Path, env: dict[str, str] | None = None):
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "app.py"), *args], cwd=cwd, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
                                          **(env or {})})
        self.out: list[str] = []
        self.err: list[str] = []
        for stream, lines in ((self.proc.stdout, self.out), (self.proc.stderr, self.err)):
            threading.Thread(target=lambda s=stream, ls=lines: ls.extend(iter(s.readline, "")), daemon=True).start()

    def wait_for(self, text: str, timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        while not any(text in line for line in self.out):
            assert self.proc.poll() is None, f"app.py exited {self.proc.returncode}: {self.output()[-3000:]}"
            assert time.monotonic() < deadline, f"no {text!r} after {timeout} s: {self.output()[-3000:]}"
            time.sleep(0.05)

    def finish(self, timeout: float = 60) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            time.sleep(0.2)  # the reader threads drain the pipes

    def output(self) -> str:
        return "".join(self.out) + "".join(self.err)


def run_app(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "app.py"), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})


# ------------------------------------------------------------------------------------------ where it listens

@pytest.mark.parametrize("argv, env", [(["--port", "70000"], {}), (["--port", "-1"], {}), (["--port", "0"], {}),
                                       ([], {"GRADIO_SERVER_PORT": "abc"}),
                                       ([], {"GRADIO_SERVER_PORT": "99999"})],
                         ids=["70000", "negative", "zero", "env-not-a-number", "env-too-big"])
def test_a_port_that_is_no_port_is_refused_by_the_argument_parser(argv, env, monkeypatch, capsys):
    """It was accepted (70000, -1, 0: an OverflowError / ConnectError traceback from gradio once the model had
    loaded) or crashed argparse's default (`GRADIO_SERVER_PORT=abc`: a ValueError traceback)."""
    import app

    monkeypatch.delenv("GRADIO_SERVER_PORT", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as info:
        app.parse_args(argv)
    assert info.value.code == 2
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert "argument --port: must be a port number from 1 to 65535" in message, message
    assert "GRADIO_SERVER_PORT" in message
    monkeypatch.setenv("GRADIO_SERVER_PORT", "7911")
    assert app.parse_args([]).port == 7911 and app.parse_args(["--port", "65535"]).port == 65535


@pytest.mark.parametrize("case", ["port-in-use", "unresolvable-host"])
def test_an_address_it_cannot_listen_on_is_refused_in_one_line_before_the_model_loads(case, tmp_path,
                                                                                      small_checkpoint):
    """Another process on the port, or a host name that does not resolve: gradio raised "Cannot find empty port
    … passing the `server_port` parameter to `launch()`" with a traceback, after the model had loaded."""
    with contextlib.ExitStack() as stack:
        port = free_port()
        host = "127.0.0.1"
        if case == "port-in-use":
            listener = stack.enter_context(socket.socket())
            listener.bind((host, port))
            listener.listen()
            expected = "the port is in use"
        else:
            host = "no-such-host.invalid"
            expected = f"the host {host!r} does not resolve"
        proc = run_app(["--host", host, "--port", str(port), "--checkpoint", str(small_checkpoint),
                        "--db", str(tmp_path / "a.db"), "--device", "cpu"], cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()], proc.stderr
    assert f"cannot listen on {host}:{port}: {expected}" in proc.stderr, proc.stderr
    assert "* Model:" not in proc.stdout  # refused before the model was read


def test_a_bare_ipv6_host_is_served(small_predictor):
    """`--host ::1` / `--host ::` (IPv6 addresses without brackets) failed in gradio's own start-up request
    (httpx.InvalidURL "Invalid port: ':1:PORT'") after the model had loaded; `[::1]` worked."""
    import urllib.request

    import app
    from pixelllm.ui import build_demo

    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback on this machine")
    port = free_port()
    demo = build_demo(small_predictor, None, checkpoint="small", min_word_interval=0.0)
    try:
        app.launch(demo, host="::1", port=port, block=False)
        with urllib.request.urlopen(f"http://[::1]:{port}/config", timeout=30) as response:
            assert response.status == 200
    finally:
        demo.close()


def test_concurrency_bounds_the_model_calls_of_every_endpoint_together(small_checkpoint, monkeypatch):
    """`--concurrency 1` (a GPU host keeping one paper-size call in memory) still ran /caption, /trace, /refer and
    /dense at once, 4 model calls, and each tab's buttons besides: gradio gives every event listener its own group
    of `default_concurrency_limit`. Now every model call is in one group of N."""
    from concurrent.futures import ThreadPoolExecutor

    import torch
    from gradio_client import Client, handle_file

    import app
    from pixelllm import PixelLLM, PixelLLMPredictor
    from pixelllm.ui import build_demo

    torch.set_num_threads(1)
    predictor = PixelLLMPredictor(PixelLLM.from_pretrained(small_checkpoint), device="cpu")
    encode, running, peak, lock = predictor.set_image, [0], [0], threading.Lock()

    def counted(image):  # every model call encodes (or looks up) its image first; held long enough to overlap
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        try:
            time.sleep(0.5)
            return encode(image)
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(predictor, "set_image", counted)
    demo = build_demo(predictor, None, checkpoint="small", concurrency=1, min_word_interval=0.0)
    port = free_port()
    app.launch(demo, host="127.0.0.1", port=port, block=False)
    try:
        image = handle_file(str(EXAMPLES_DIR / "example_000000.png"))
        calls = [{"api_name": "/caption", "max_words": 2}, {"api_name": "/trace", "caption": "a shape"},
                 {"api_name": "/refer", "expressions": "the shape"}, {"api_name": "/dense", "max_regions": 1}]
        clients = [Client(f"http://127.0.0.1:{port}/", verbose=False) for _ in calls]
        with ThreadPoolExecutor(len(calls)) as pool:
            answers = list(pool.map(lambda c, kw: c.predict(image=image, **kw), clients, calls))
    finally:
        demo.close()
    assert [a["task"] for a in answers] == ["caption", "trace", "refer", "dense"]
    assert peak[0] == 1, f"{peak[0]} model calls ran at once with --concurrency 1"
    # the tabs' model calls are in the same group
    fns = [fn for fn in demo.fns.values() if fn.name in ("caption", "trace", "refer", "dense", "on_generate",
                                                         "on_trace", "on_refer", "on_dense", "on_dense_select",
                                                         "on_compare")]
    assert len({fn.concurrency_id for fn in fns}) == 1, {fn.name: fn.concurrency_id for fn in fns}

def test_an_unwritable_gradio_temp_dir_is_refused_in_one_line(tmp_path, small_checkpoint):
    """GRADIO_TEMP_DIR (or the default /tmp/gradio of another user) that cannot be written: a NotADirectoryError /
    PermissionError traceback from gradio's app creation after the model had loaded."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    folder = blocker / "gradio"
    proc = run_app(["--port", str(free_port()), "--checkpoint", str(small_checkpoint), "--db", str(tmp_path / "a.db"),
                    "--device", "cpu"], cwd=tmp_path, env={"GRADIO_TEMP_DIR": str(folder)})
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert f"cannot write gradio's temporary folder {folder}" in proc.stderr and "GRADIO_TEMP_DIR" in proc.stderr
    assert "* Model:" not in proc.stdout


# ------------------------------------------------------------------------------------------ starting and stopping

def test_start_up_names_the_model_and_the_store_without_library_chatter(tmp_path, small_checkpoint):
    """Before: two `INFO httpx: HTTP Request: …` lines (gradio's own requests to itself, shown because app.py set
    the root logger to INFO), and nothing said which checkpoint was served or where corrections were stored."""
    db = tmp_path / "store" / "annotations.db"
    app_proc = AppProcess(["--port", str(free_port()), "--checkpoint", str(small_checkpoint), "--db",
                           "store/annotations.db", "--device", "cpu"], cwd=tmp_path)
    try:
        app_proc.wait_for("To create a public link")
    finally:
        app_proc.proc.send_signal(signal.SIGINT)
        app_proc.finish()
    output = app_proc.output()
    assert f"* Model: {small_checkpoint} (tiny," in output and "parameters, cpu, float32)" in output, output
    assert f"* Annotation store: {db}\n" in output, output  # absolute: a relative --db depends on the cwd
    assert "httpx" not in output and "INFO" not in output, output


def _caption_jobs(url: str, count: int) -> list:
    from gradio_client import Client, handle_file

    client = Client(url, verbose=False)
    image = handle_file(str(EXAMPLES_DIR / "example_000000.png"))
    # 8 words each: the calls end well inside gradio's 5 s close window even on a slow, loaded machine
    return [client.submit(image=image, prompts="", text="", max_words=8, do_sample=True, temperature=1.0, top_p=1.0,
                          seed=seed, api_name="/caption") for seed in range(count)]


def test_sigterm_while_captions_run_finishes_them_and_exits_cleanly(tmp_path, small_checkpoint):
    """SIGTERM (docker stop, systemd, a Space restarting) killed the process at once: exit status -15, no message,
    the captions in progress cut (gradio_client: CancelledError) and never logged. Now it closes as Ctrl+C does:
    the running and queued calls finish within gradio's 5 s close window and are logged, one line says why it
    stops, exit 0, and the store is whole for the next start."""
    from gradio_client.utils import Status

    from pixelllm.store import AnnotationStore

    db = tmp_path / "annotations.db"
    port = free_port()
    app_proc = AppProcess(["--port", str(port), "--checkpoint", str(small_checkpoint), "--db", str(db),
                           "--device", "cpu"], cwd=tmp_path)
    try:
        app_proc.wait_for("To create a public link")
        jobs = _caption_jobs(f"http://127.0.0.1:{port}/", 4)
        deadline = time.monotonic() + 120
        # every call has reached the server (a call still being sent when it closes fails to connect, which is
        # not what this tests), and one of them runs
        arrived = (Status.IN_QUEUE, Status.SENDING_DATA, Status.PROCESSING, Status.ITERATING, Status.PROGRESS,
                   Status.FINISHED)
        while not (all(job.status().code in arrived for job in jobs)
                   and any(job.status().code in (Status.PROCESSING, Status.ITERATING) for job in jobs)):
            assert time.monotonic() < deadline, [job.status().code for job in jobs]
            time.sleep(0.01)
        running = sum(not job.done() for job in jobs)
        app_proc.proc.send_signal(signal.SIGTERM)
        returncode = app_proc.finish(timeout=60)
    finally:
        if app_proc.proc.poll() is None:
            app_proc.proc.kill()
    assert running >= 1
    assert returncode == 0, (returncode, app_proc.output()[-3000:])
    stderr = "".join(app_proc.err)
    assert "SIGTERM received: stopping" in stderr and "Traceback" not in stderr, stderr[-3000:]
    ids = [job.result(timeout=30)["generation_id"] for job in jobs]  # CancelledError before
    with contextlib.closing(sqlite3.connect(db)) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        logged = {row[0] for row in conn.execute("SELECT id FROM generations")}
    assert set(ids) <= logged and len(logged) == len(jobs), (ids, logged)
    with AnnotationStore(db) as store:  # the next start opens it and can write
        store.check_writable()


def test_a_stop_while_the_app_starts_is_one_line(tmp_path, small_checkpoint):
    """SIGTERM or Ctrl+C while the model and gradio load (a host giving up on a slow start): SIGINT printed a
    KeyboardInterrupt traceback of 60 lines from wherever the import was, SIGTERM ended it with no word."""

    def wait_for_handler(proc: subprocess.Popen, sig: int, seconds: float) -> None:
        """Until `proc` handles `sig` (its default action replaced: /proc's SigCgt mask), at most `seconds`."""
        deadline = time.monotonic() + seconds
        while proc.poll() is None and time.monotonic() < deadline:
            status = Path(f"/proc/{proc.pid}/status").read_text()
            caught = int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:")), 16)
            if caught & (1 << (sig - 1)):
                return
            time.sleep(0.01)

    if not Path("/proc/self/status").exists():
        pytest.skip("needs /proc to see when app.py handles SIGTERM")
    for sig in (signal.SIGINT, signal.SIGTERM):
        app_proc = AppProcess(["--port", str(free_port()), "--checkpoint", str(small_checkpoint), "--db",
                               str(tmp_path / "a.db"), "--device", "cpu"], cwd=tmp_path)
        wait_for_handler(app_proc.proc, signal.SIGINT, 30)  # Python is up and runs app.py's imports
        wait_for_handler(app_proc.proc, signal.SIGTERM, 1)  # app.py's own handler (the model takes seconds more)
        app_proc.proc.send_signal(sig)
        returncode = app_proc.finish()
        stderr = "".join(app_proc.err)
        assert returncode == 130, (sig, returncode, stderr[-3000:])
        lines = stderr.strip().splitlines()
        # the interrupt ends the start-up; or, if a library swallowed it, the watchdog it started ends the process
        assert lines[-1] in ("interrupted: the app stopped", "still stopping after 20 s: exiting now") \
            and len(lines) <= 2, (sig, stderr[-3000:])
        assert "Traceback" not in stderr


def test_a_shutdown_that_hangs_ends_within_the_watchdog(tmp_path, small_checkpoint):
    """A stop could wait for ever on whatever the interpreter's shutdown joins (a library's non-daemon thread): in a
    full suite run under load app.py had not exited a minute after Ctrl+C. Here a thread that never ends holds the
    shutdown; the process is gone EXIT_WITHIN_S after the signal, saying so."""
    import app

    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text("import threading, time\n"
                                           "threading.Thread(target=time.sleep, args=(3600,), daemon=False).start()\n")
    env = {"PYTHONPATH": f"{hook}{os.pathsep}{ROOT}"}
    app_proc = AppProcess(["--port", str(free_port()), "--checkpoint", str(small_checkpoint), "--no-store",
                           "--device", "cpu"], cwd=tmp_path, env=env)
    try:
        app_proc.wait_for("To create a public link")
        app_proc.proc.send_signal(signal.SIGINT)
        began = time.monotonic()
        returncode = app_proc.finish(timeout=app.EXIT_WITHIN_S + 40)
    finally:
        if app_proc.proc.poll() is None:
            app_proc.proc.kill()
    assert returncode == 130 and time.monotonic() - began >= app.EXIT_WITHIN_S - 1, returncode
    assert f"still stopping after {app.EXIT_WITHIN_S} s: exiting now" in "".join(app_proc.err)

"""The bench: SIGTERM (as Ctrl+C) during the training scale-out stops torchrun's workers too. torchrun starts its
workers in their own sessions (torch.distributed.elastic's SubprocessHandler: start_new_session=True), so a SIGKILL
to the launcher left them running, orphaned, after the bench had exited; torchrun stops them itself on SIGTERM."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

from pixelllm.bench import training
from pixelllm.bench.run import stopped_by_sigterm_as_by_ctrl_c

WORKER = """
import os, sys, time
from pathlib import Path
Path(sys.argv[1], f"worker-{os.environ['LOCAL_RANK']}").write_text(str(os.getpid()))
time.sleep(300)
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (reaped by nobody yet) is gone for our purpose
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(sys.platform != "linux", reason="signals and /proc")
def test_sigterm_during_a_torchrun_run_stops_its_workers(tmp_path, monkeypatch):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    monkeypatch.setattr(training, "_train_cmd", lambda config, out, nproc: [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--no-python",
        sys.executable, str(script), str(tmp_path)])
    pids: list[int] = []

    def term_when_workers_run() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            files = sorted(tmp_path.glob("worker-*"))
            if len(files) == 2 and all(f.read_text() for f in files):
                pids.extend(int(f.read_text()) for f in files)
                os.kill(os.getpid(), signal.SIGTERM)
                return
            time.sleep(0.1)

    threading.Thread(target=term_when_workers_run, daemon=True).start()
    with pytest.raises(KeyboardInterrupt), stopped_by_sigterm_as_by_ctrl_c():
        training._train_runs([(tmp_path / "c.json", tmp_path / "out", 2, tmp_path / "run.log")])
    assert len(pids) == 2
    deadline = time.monotonic() + 30
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = [p for p in pids if _alive(p)]
    for p in left:  # never leave them behind, whatever the outcome
        os.kill(p, signal.SIGKILL)
    assert not left, f"torchrun's workers {left} still run after the bench stopped"

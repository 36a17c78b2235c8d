"""PixelLLM Studio: `python app.py` (embedded checkpoint) or `python app.py --checkpoint PATH|HUB_ID`.

args -> model + predictor + annotation store -> pixelllm.ui.build_demo(...) -> launch. Also the entry point of
the Hugging Face Space (README front matter: sdk gradio, app_file app.py).
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import signal
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
DEFAULT_CHECKPOINT = "assets/checkpoints/shapes-tiny"
DEFAULT_DB = "data/annotations.db"
EXAMPLES = ROOT / "assets" / "examples"
#: Where a Hugging Face Space mounts its persistent storage, when it has some; the rest of its disk is lost at
#: every restart (https://huggingface.co/docs/hub/spaces-storage).
SPACE_PERSISTENT = Path("/data")


def on_space(environ=os.environ) -> bool:
    return bool(environ.get("SPACE_ID"))


def default_db(environ=os.environ, persistent: Path = SPACE_PERSISTENT) -> str:
    """The store's default path: $PIXELLLM_DB; else, on a Space with persistent storage (a writable /data),
    /data/annotations.db, so annotators' corrections survive restarts; else data/annotations.db."""
    if environ.get("PIXELLLM_DB"):
        return environ["PIXELLLM_DB"]
    if on_space(environ) and persistent.is_dir() and os.access(persistent, os.W_OK | os.X_OK):
        return str(persistent / "annotations.db")
    return DEFAULT_DB


def store_notice(db: str | None, environ=os.environ, persistent: Path = SPACE_PERSISTENT) -> str | None:
    """What the Annotate tab tells annotators about where their work goes, when they need to know: no store at
    all, or a store on a Space's ephemeral disk. None when the store is somewhere that lasts."""
    if db is None:
        return ("**No annotation store** (the app was started with `--no-store`): nothing you do here is saved. "
                "Restart it without `--no-store` to save corrections.")
    path = Path(db).absolute()
    if not on_space(environ) or path.is_relative_to(persistent):
        return None
    if persistent.is_dir():  # the Space has persistent storage, but the store was put elsewhere ($PIXELLLM_DB, --db)
        return (f"**The annotation store is not on this Space's persistent storage**: it is at {path} (set by "
                f"PIXELLLM_DB or --db), on the Space's own disk, which is wiped whenever the Space restarts or "
                f"sleeps; {persistent} would last. Export your corrections before leaving, or ask the Space's owner "
                f"to point the store under {persistent}.")
    return (f"**This Space has no persistent storage**: the annotation store ({path}) is on the Space's own "
            "disk, which is wiped whenever the Space restarts or sleeps. Export your corrections before "
            "leaving, or ask the Space's owner to add persistent storage (Settings → Persistent storage; it "
            f"is mounted at {persistent} and used automatically).")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--checkpoint", default=os.environ.get("PIXELLLM_CHECKPOINT") or DEFAULT_CHECKPOINT,
                        help="checkpoint folder or hub id (default: $PIXELLLM_CHECKPOINT or the embedded model)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"],
                        help="auto picks cuda > mps > cpu (bfloat16 on CUDA)")
    parser.add_argument("--port", type=port_number, default=os.environ.get("GRADIO_SERVER_PORT") or "7860",
                        help="port to listen on, 1-65535 (default $GRADIO_SERVER_PORT or 7860)")
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME") or "127.0.0.1",
                        help="interface to listen on (0.0.0.0 to serve the network; Spaces set it)")
    parser.add_argument("--share", action="store_true", help="create a public gradio.live link")
    parser.add_argument("--db", default=default_db(),
                        help="annotation store (SQLite file; default $PIXELLLM_DB, else /data/annotations.db on a "
                             "Space with persistent storage, else data/annotations.db); the app refuses to start "
                             "if it cannot be opened")
    parser.add_argument("--no-store", action="store_true",
                        help="run without the annotation store: nothing is logged, corrections cannot be saved")
    parser.add_argument("--concurrency", type=positive_int, default=2,
                        help="model calls running at once, every tab and API endpoint together (>= 1)")
    parser.add_argument("--auth", default=os.environ.get("PIXELLLM_AUTH") or None, type=parse_auth,
                        metavar="USER:PASSWORD[,USER:PASSWORD...]",
                        help="require a login (default $PIXELLLM_AUTH): every visitor sees every logged output "
                             "and can export all corrections, so a public host with real images needs one")
    return parser.parse_args(argv)


def positive_int(value: str) -> int:
    number = int(value)  # argparse turns the ValueError of a non-number into its own message
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {number} (0 would queue every call forever)")
    return number


def port_number(value: str) -> int:
    """A TCP port, 1-65535 (argparse also runs it on the default, $GRADIO_SERVER_PORT)."""
    try:
        number = int(value)
    except ValueError:
        number = None
    if number is None or not 1 <= number <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number from 1 to 65535, got {value!r} "
                                         "(from --port or $GRADIO_SERVER_PORT)")
    return number


def check_address(host: str, port: int) -> None:
    """SystemExit naming the reason when the server could not listen on host:port (a port another process holds,
    a host name that does not resolve or is not this machine's). Checked before the model loads: gradio found out
    only after it, with a traceback that pointed at `launch()` arguments."""
    name = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    where = f"{host}:{port}"
    try:
        family, kind, proto, _, address = socket.getaddrinfo(name, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except (socket.gaierror, UnicodeError) as err:
        raise SystemExit(f"cannot listen on {where}: the host {host!r} does not resolve "
                         f"({getattr(err, 'strerror', None) or err}); pass --host 127.0.0.1 (this machine only) "
                         "or --host 0.0.0.0 (the network), or set GRADIO_SERVER_NAME") from err
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: a closed server's port is free
        try:
            sock.bind(address)
        except OSError as err:
            reason = {errno.EADDRINUSE: "the port is in use (another process is listening there)",
                      errno.EADDRNOTAVAIL: f"{host} is not an address of this machine",
                      errno.EACCES: "permission denied (ports below 1024 need privileges)"}.get(err.errno)
            raise SystemExit(f"cannot listen on {where}: {reason or err.strerror or err}; pass --port N (or set "
                             "GRADIO_SERVER_PORT) or --host ADDRESS (GRADIO_SERVER_NAME)") from err


def check_temp_dir(environ=os.environ) -> None:
    """SystemExit naming the folder when gradio's temporary folder cannot be written: gradio keeps uploads and the
    app its downloads there, and it failed with a traceback after the model had loaded."""
    from pixelllm.files import probe_writable

    folder = Path(environ.get("GRADIO_TEMP_DIR") or Path(tempfile.gettempdir()) / "gradio")
    try:
        probe_writable(folder)
    except OSError as err:
        raise SystemExit(f"cannot write gradio's temporary folder {folder.absolute()} (uploads and downloads go "
                         f"there): {err.strerror or err}; set GRADIO_TEMP_DIR to a folder this user can write") from err


def parse_auth(value: str) -> list[tuple[str, str]]:
    """`user:password` pairs, comma-separated (a password may hold ':'; neither may be empty)."""
    pairs = []
    for item in value.split(","):
        user, sep, password = item.strip().partition(":")
        if not sep or not user or not password:
            raise argparse.ArgumentTypeError("--auth takes USER:PASSWORD pairs separated by commas")
        pairs.append((user, password))
    return pairs


def pick_device(choice: str) -> tuple[str, object]:
    """(device, dtype): auto = cuda > mps > cpu; bfloat16 on CUDA, float32 elsewhere."""
    import torch

    if choice == "auto":
        if torch.cuda.is_available():
            choice = "cuda"
        elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            choice = "mps"
        else:
            choice = "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    if choice == "mps" and not torch.backends.mps.is_available():
        raise SystemExit("--device mps: MPS is not available")
    return choice, (torch.bfloat16 if choice == "cuda" else None)


def resolve_checkpoint(checkpoint: str) -> str:
    """Relative folders are looked up from the working directory, then next to app.py."""
    path = Path(checkpoint).expanduser()
    if not path.is_absolute() and not path.exists() and (ROOT / path).is_dir():
        return str(ROOT / path)
    return checkpoint


def open_store(path: str):
    """The annotation store, or SystemExit naming the file. Annotators' work goes there: a store that cannot be
    opened (corrupt, not an annotation store, read-only file or folder, newer schema) stops the app at start rather
    than letting people work for hours with nothing saved. `--no-store` runs without one, on purpose."""
    from pixelllm.store import AnnotationStore, StoreError

    store = None
    try:
        store = AnnotationStore(path)
        store.check_writable()  # a read-only file (or folder holding its WAL files) opens; every save would fail
        return store
    except (StoreError, ValueError) as err:
        if store is not None:
            store.close()
        raise SystemExit(f"cannot open the annotation store {Path(path).absolute()}: {err}\n"
                         "Move the file aside together with its -wal and -shm files (or restore a backup), pass "
                         "--db OTHER.db, or run with --no-store to serve without logging.") from err


def launch(demo, *, host: str = "127.0.0.1", port: int = 7860, share: bool = False, block: bool = True,
           auth: list[tuple[str, str]] | None = None) -> None:
    """Serve `demo` with the app's limits (upload cap MAX_FILE_SIZE, no SSR). block=False returns once the
    server is up (tests serve the app in their own process this way). auth: (user, password) pairs to log in.
    At most STATE_SESSION_CAPACITY sessions keep their state (each holds its image): memory stays bounded however
    many visitors come."""
    from pixelllm import ui

    if ":" in host and not host.startswith("["):  # a bare IPv6 address (`::`, `::1`): gradio builds its URL from it
        host = f"[{host}]"
    demo.launch(server_name=host, server_port=port, share=share, max_file_size=ui.MAX_FILE_SIZE, ssr_mode=False,
                prevent_thread_lock=not block, quiet=not block, auth=auth or None,
                state_session_capacity=ui.STATE_SESSION_CAPACITY)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    # WARNING: at INFO every library's chatter reached the host's log (httpx's own requests, matplotlib's font cache)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    check_address(args.host, args.port)  # before the store, torch and the model: a host's mistake fails at once
    check_temp_dir()
    if args.no_store:
        logging.warning("--no-store: outputs and corrections will not be saved")
        store = None
    else:
        store = open_store(args.db)  # before torch, gradio and the model load: a bad store fails at once
    notice = store_notice(None if args.no_store else args.db)
    if notice and not args.no_store:
        logging.warning(notice.replace("**", ""))
    from pixelllm import PixelLLM, PixelLLMPredictor
    from pixelllm.ui import build_demo

    checkpoint = resolve_checkpoint(args.checkpoint)
    device, dtype = pick_device(args.device)
    try:  # read straight into the device and dtype it serves in (a paper-size model: 7.6 GB, not 15 + 7.6)
        model = PixelLLM.from_pretrained(checkpoint, map_location=str(device), dtype=dtype)
    except FileNotFoundError as err:
        hint = (f" The embedded model belongs in {DEFAULT_CHECKPOINT} (`python -m training.train --config "
                "training/configs/shapes_tiny.yaml` trains it into runs/shapes_tiny/export); or pass --checkpoint "
                "PATH|HUB_ID."
                if args.checkpoint == DEFAULT_CHECKPOINT else "")
        raise SystemExit(f"cannot load the checkpoint: {err}.{hint}") from err
    except (ValueError, OSError) as err:  # pickle refused, weights that do not fit the config, hub errors
        raise SystemExit(f"cannot load the checkpoint {checkpoint}: {err}") from err
    if model.tokenizer is None:
        raise SystemExit(f"cannot serve the checkpoint {checkpoint}: it has no tokenizer (tokenizer.json or "
                         "spiece.model beside its weights)")
    predictor = PixelLLMPredictor(model, device=device, dtype=dtype)
    print(f"* Model: {checkpoint} ({model.config.preset}, {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M "
          f"parameters, {device}, {str(dtype or model.dtype).replace('torch.', '')})\n"
          f"* Annotation store: {'none (--no-store)' if store is None else store.path}", flush=True)
    examples = sorted(str(p) for p in EXAMPLES.glob("*.png"))
    demo = build_demo(predictor, store, checkpoint=args.checkpoint, examples=examples,
                      concurrency=args.concurrency, store_notice=notice)
    try:
        launch(demo, host=args.host, port=args.port, share=args.share, auth=args.auth)
    except OSError as err:  # e.g. the port was taken between check_address and now
        raise SystemExit(f"cannot serve on {args.host}:{args.port}: {err}") from err


EXIT_WITHIN_S = 20  # after Ctrl+C / SIGTERM: gradio's close waits 5 s for requests; longer is a hang


def stop(signum: int, frame: object) -> None:
    """Ctrl+C or SIGTERM (docker stop, systemd, a Space restarting) closes the app: the server stops and the
    requests in progress get up to 5 s (gradio's server close timeout) to finish, logging their outputs and saving
    their corrections; a longer one is cut. SIGTERM used to end the process at once: no message, exit status -15,
    requests cut. A second SIGTERM ends it at once; and whatever the shutdown waits on, the process is gone
    EXIT_WITHIN_S seconds after the first signal (a host's stop once waited more than a minute, under load)."""
    if signum == signal.SIGTERM:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        print("SIGTERM received: stopping; requests in progress get up to 5 s to finish (send it again to stop at "
              "once)", file=sys.stderr, flush=True)
    if not any(t.name == "exit-watchdog" for t in threading.enumerate()):
        threading.Thread(target=_exit_after, args=(EXIT_WITHIN_S,), name="exit-watchdog", daemon=True).start()
    raise KeyboardInterrupt


def _exit_after(seconds: float) -> None:
    time.sleep(seconds)
    print(f"still stopping after {seconds:g} s: exiting now", file=sys.stderr, flush=True)
    os._exit(130)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # Ctrl+C or SIGTERM while the app starts (gradio handles them once it serves)
        print("interrupted: the app stopped", file=sys.stderr)
        sys.exit(130)

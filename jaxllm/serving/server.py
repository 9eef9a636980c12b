"""uvicorn around the app: in the foreground (`stage: serve`) or in a thread (tests, bench).

In the foreground, Ctrl-C (SIGINT) or SIGTERM stops the server gracefully and `run` returns:
uvicorn (>= 0.29) would raise the signal again once it has shut down, which ends the process
(SIGTERM) or raises KeyboardInterrupt (SIGINT) before the caller can write its summary;
`_Uvicorn` catches the signals without raising them again (`Server.stopped_by` names it).
"""

from __future__ import annotations

import contextlib
import signal
import socket
import threading
import time
from collections.abc import Iterator

import uvicorn

from jaxllm.serving.app import Backend, build_app


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now (the OS's pick)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class _Uvicorn(uvicorn.Server):
    """uvicorn's server whose stop signals end `run` normally: a signal-stopped server is a
    finished run. (uvicorn's own `capture_signals` re-raises the captured signals once it
    has shut down; this one restores the previous handlers and raises nothing.)"""

    stop_signal: int | None = None

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield  # signals reach the main thread only: a server in a thread has none
            return

        def handle(sig: int, frame) -> None:
            self.stop_signal = sig
            self.handle_exit(sig, frame)  # the first stops gracefully, a second SIGINT forces

        previous = {sig: signal.signal(sig, handle) for sig in STOP_SIGNALS}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            captured = getattr(self, "_captured_signals", None)
            if isinstance(captured, list):
                captured.clear()  # nothing left for uvicorn to raise again


class Server:
    """The app of `backend` on host:port (port 0: a free one), its engine started with it."""

    def __init__(self, backend: Backend, host: str = "127.0.0.1", port: int = 0,
                 log_level: str = "warning"):  # fmt: skip
        self.backend, self.host = backend, host
        self.port = port or free_port(host)
        config = uvicorn.Config(build_app(backend), host=host, port=self.port,
                                log_level=log_level, timeout_graceful_shutdown=2)  # fmt: skip
        self.uvicorn = _Uvicorn(config)
        self.thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def stopped_by(self) -> str | None:
        """The signal that stopped `run` ("SIGINT", "SIGTERM"), or None."""
        sig = self.uvicorn.stop_signal
        return None if sig is None else signal.Signals(sig).name

    def run(self) -> None:
        """Serves until interrupted (Ctrl-C / SIGTERM), then stops the engine and returns."""
        if self.backend.engine.thread is None:
            self.backend.engine.start()
        try:
            self.uvicorn.run()
        finally:
            self.backend.engine.stop()

    def start(self, timeout: float = 30.0) -> Server:
        """Serves from a background thread; returns once it listens."""
        self.thread = threading.Thread(target=self.run, name="jaxllm-http", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.uvicorn.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError(f"the server did not start on {self.url}")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        self.uvicorn.should_exit = True
        if self.thread is not None:
            self.thread.join(timeout=30)

"""uvicorn around the app: in the foreground (`stage: serve`) or in a thread (tests, bench)."""

from __future__ import annotations

import socket
import threading
import time

import uvicorn

from jaxllm.serving.app import Backend, build_app


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now (the OS's pick)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class Server:
    """The app of `backend` on host:port (port 0: a free one), its engine started with it."""

    def __init__(self, backend: Backend, host: str = "127.0.0.1", port: int = 0,
                 log_level: str = "warning"):  # fmt: skip
        self.backend, self.host = backend, host
        self.port = port or free_port(host)
        config = uvicorn.Config(build_app(backend), host=host, port=self.port,
                                log_level=log_level, timeout_graceful_shutdown=2)  # fmt: skip
        self.uvicorn = uvicorn.Server(config)
        self.thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def run(self) -> None:
        """Serves until interrupted (Ctrl-C / SIGTERM), then stops the engine."""
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

"""Runs a real `zse serve` process on a free loopback port, as a user would."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class ServerProcess:
    """``zse serve MODEL ARGS`` on a free port; waits until ``/health`` answers."""

    def __init__(self, model: Path | None, *args: str, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self._log = tempfile.NamedTemporaryFile(prefix="zse-serve-", suffix=".log", delete=False)
        cmd = [sys.executable, "-m", "zse", "serve", "--port", str(self.port), *args]
        if model is not None:
            cmd.insert(4, str(model))
        environ = {k: v for k, v in os.environ.items() if k != "ZSE_API_KEY"}
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            cmd,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )
        self._wait_ready()

    def _wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"zse serve exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url("/health"), timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"zse serve did not answer within {timeout} s:\n{self.log()}")

    def url(self, path: str) -> str:
        return self.base + path

    @property
    def api_base(self) -> str:
        return self.base + "/v1"

    def log(self) -> str:
        return Path(self._log.name).read_text(errors="replace")

    def health(self) -> dict[str, object]:
        data: dict[str, object] = httpx.get(self.url("/health"), timeout=5).json()
        return data

    def wait_idle(self, timeout: float = 10) -> bool:
        """True once the engine runs no sequence and has none waiting."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            engine = self.health()["engine"]
            assert isinstance(engine, dict)
            if engine["running_sequences"] == 0 and engine["waiting_requests"] == 0:
                return True
            time.sleep(0.05)
        return False

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()
        Path(self._log.name).unlink(missing_ok=True)

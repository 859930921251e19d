"""A local `epd serve` subprocess for `epd bench sweep`: started on a free port, stopped with SIGTERM.

The port is read from the server's "ready" log line (it binds port 0), so sweeps never collide
with another server; every wait is bounded, and a server that will not stop is killed.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

READY = re.compile(r"ready: OpenAI API at http://([\w.:-]+):(\d+)/v1")
STOP_TIMEOUT_S = 60.0


class ServerFailed(Exception):
    """The server exited or did not become ready; the message holds its log's tail."""


class LocalServer:
    """`python -m epd.cli serve --model M --layout L ... --port 0`, as a context manager."""

    def __init__(self, args: list[str], log_path: Path, start_timeout: float = 600.0) -> None:
        self.args, self.log_path, self.start_timeout = args, log_path, start_timeout
        self.proc: subprocess.Popen | None = None
        self.url = ""

    def __enter__(self) -> LocalServer:
        try:
            self.start()
        except BaseException:  # not ready (or interrupted): never leave the server behind
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        cmd = [sys.executable, "-m", "epd.cli", "serve", *self.args, "--host", "127.0.0.1", "--port", "0"]
        with open(self.log_path, "w") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            match = READY.search(self.log())
            if match:
                self.url = f"http://{match.group(1)}:{match.group(2)}"
                self._wait_healthy(deadline)
                return
            if self.proc.poll() is not None:
                raise ServerFailed(f"epd serve exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            time.sleep(0.2)
        raise ServerFailed(f"epd serve not ready after {self.start_timeout:.0f} s:\n{self.log()[-3000:]}")

    def _wait_healthy(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise ServerFailed(f"{self.url}/health never answered 200:\n{self.log()[-3000:]}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> int | None:
        """SIGTERM (the server drains and stops its instances), then SIGKILL if it hangs."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)

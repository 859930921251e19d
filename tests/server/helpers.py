"""A real `epd serve` process on a free loopback port, and helpers to talk to it.

Plain functions and one class; fixtures live in conftest.py. Every wait is bounded.
"""

from __future__ import annotations

import base64
import io
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import httpx
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from epd.testing.images import noise_image

READY = re.compile(r"ready: OpenAI API at http://([\d.]+):(\d+)/v1")
START_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 60.0
# Zero when nothing runs: pinned KV and MM blocks, admitted requests, image files in shared memory.
IDLE_ZERO = ("epd_instance_kv_cache_usage", "epd_instance_mm_cache_usage", "epd_requests_admitted")
IDLE_ZERO += ("epd_shared_file_bytes_in_use",)


def png_data_url(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def image_message(text: str, *seeds: int, size: tuple[int, int] = (64, 48)) -> list[dict]:
    """One user message: one noise image per seed, then the text."""
    parts: list[dict] = [
        {"type": "image_url", "image_url": {"url": png_data_url(noise_image(*size, seed=s))}} for s in seeds
    ]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]


class ServerProcess:
    """`python -m epd.cli serve ARGS --port 0`; the port is read from its "ready" log line."""

    def __init__(self, args: list[str], log_path: Path, api_key: str | None = None) -> None:
        self.args, self.log_path, self.api_key = args, log_path, api_key
        self.proc: subprocess.Popen | None = None
        self.url = ""

    def start(self) -> ServerProcess:
        cmd = [sys.executable, "-m", "epd.cli", "serve", *self.args, "--port", "0"]
        if self.api_key:
            cmd += ["--api-key", self.api_key]
        self._log = open(self.log_path, "w")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            match = READY.search(self.log())
            if match:
                self.url = f"http://{match.group(1)}:{match.group(2)}"
                self.wait_healthy(deadline - time.monotonic())
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            time.sleep(0.2)
        self.stop(signal.SIGKILL)
        raise TimeoutError(f"server not ready after {START_TIMEOUT_S} s:\n{self.log()[-3000:]}")

    def wait_healthy(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"/health not 200 after {timeout} s")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def descendants(self) -> set[int]:
        return descendants(self.proc.pid) if self.proc else set()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT_S) -> int:
        """Send `sig`, wait for the exit, return the exit code (killing it if it hangs)."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            tail = self.log()[-3000:]
            raise AssertionError(f"server did not exit within {timeout} s of {sig}:\n{tail}") from None
        finally:
            self._log.close()
        return code


def descendants(pid: int) -> set[int]:
    """Every live process below `pid` (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])  # the name may hold spaces and ')'
        children.setdefault(ppid, []).append(int(entry))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def alive(pids: set[int]) -> set[int]:
    out = set()
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        if stat.rsplit(")", 1)[1].split()[0] != "Z":  # a zombie has exited
            out.add(pid)
    return out


def metrics(url: str) -> dict[str, dict[tuple, float]]:
    """/metrics as {sample name: {sorted label items: value}}."""
    text = httpx.get(url + "/metrics", timeout=10).text
    out: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def wait_until_idle(url: str, timeout: float = 30.0) -> dict[str, dict[tuple, float]]:
    """Wait until no request is admitted and every instance reports KV and pinned MM use 0.

    Instances report every 250 ms, so a fresh report must arrive after the last request.
    """
    deadline = time.monotonic() + timeout
    time.sleep(0.6)  # past two report intervals: what we read was measured after the requests
    while True:
        m = metrics(url)
        busy = {}
        for name in IDLE_ZERO:
            nonzero = {labels: v for labels, v in m.get(name, {}).items() if v}
            if nonzero:
                busy[name] = nonzero
        if not busy:
            return m
        if time.monotonic() > deadline:
            raise AssertionError(f"still busy after {timeout} s: {busy}")
        time.sleep(0.3)


def wait_for_metrics(
    url: str, condition: Callable[[dict], bool], timeout: float = 60.0, what: str = "a state"
) -> dict[str, dict[tuple, float]]:
    """Poll /metrics until `condition(metrics)` holds; return those metrics. Bounded by `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        m = metrics(url)
        if condition(m):
            return m
        if time.monotonic() > deadline:
            raise AssertionError(f"/metrics did not show {what} within {timeout} s")
        time.sleep(0.05)


def gauge(m: dict[str, dict[tuple, float]], name: str, **labels: str) -> float:
    """A sample's value (0 when absent), its labels matching `labels` exactly."""
    return m.get(name, {}).get(tuple(sorted(labels.items())), 0.0)


def raw_connection(url: str, timeout: float = 30.0) -> socket.socket:
    """A plain TCP connection to the server, for requests httpx would not send (partial, stalled)."""
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=timeout)


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) of the next response on `sock` (Content-Length framed)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError(f"connection closed before a response: {data[:200]!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    length = int(headers.get("content-length", "0"))
    while len(body) < length and (chunk := sock.recv(65536)):
        body += chunk
    return int(status_line.split()[1]), headers, body


def encode_image(img: Image.Image, fmt: str, **save_kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **save_kwargs)
    return buf.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims width x height pixels but carries almost no data (a decompression bomb)."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")

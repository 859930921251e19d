"""The front door under hostile traffic: what other clients see while it is abused.

    python -m epd.bench.front_door [--model DIR] [--out results.json]

Starts `epd serve` (default: the built-in demo model, 1EPD on the CPU) and runs the scenarios
of the hardening review, each while a separate process pings /health every 20 ms:
- `big_prompt`: one chat request with a 21 MB text (under the 32 MiB body limit): the time to its
  answer (a 400) and the slowest /health meanwhile;
- `many_messages`: 300,000 one-word messages;
- `abandoned_images`: six requests of 16 PNGs of 5792 x 5792 px each, abandoned after 0.5 s, run
  once with the default pixel limit and once on a server that admits such images
  (`--max-image-pixels 40000000`), then a text request: its latency, and the server's memory
  (RSS of the server and its children) idle, after, and once settled.
Prints one line per scenario and writes the figures as JSON.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import multiprocessing as mp
import tempfile
import threading
import time
from pathlib import Path

import httpx
from PIL import Image

from epd.bench.serve.launcher import LocalServer
from epd.demo import DEMO_MODEL_DIR

PING_INTERVAL_S = 0.02


def _ping(url: str, ready: mp.Event, stop: mp.Event, out: mp.Queue) -> None:
    """In its own process (the GIL of this one is busy building requests): /health latencies."""
    worst, count = 0.0, 0
    with httpx.Client(timeout=60) as http:
        for _ in range(5):  # the connection and the client's first-use costs: not the server's
            http.get(url + "/health")
        ready.set()
        while not stop.is_set():
            start = time.perf_counter()
            http.get(url + "/health")
            worst, count = max(worst, time.perf_counter() - start), count + 1
            time.sleep(PING_INTERVAL_S)
    out.put((worst, count))


class HealthWatch:
    """Pings /health from another process while the block runs; `worst_s` is the slowest answer."""

    def __init__(self, url: str) -> None:
        ctx = mp.get_context("spawn")
        self.ready, self.stop, self.out = ctx.Event(), ctx.Event(), ctx.Queue()
        self.proc = ctx.Process(target=_ping, args=(url, self.ready, self.stop, self.out), daemon=True)
        self.worst_s, self.pings = 0.0, 0

    def __enter__(self) -> HealthWatch:
        self.proc.start()
        if not self.ready.wait(timeout=120):
            raise RuntimeError("the /health pinger did not start")
        time.sleep(0.2)  # a few pings of the idle server first
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.worst_s, self.pings = self.out.get(timeout=120)
        self.proc.join(timeout=10)


def _chat(model: str, content: object, n_messages: int = 1) -> dict:
    messages = [{"role": "user", "content": content}] * n_messages
    return {"model": model, "messages": messages, "max_tokens": 4}


def _timed_post(url: str, body: dict | bytes, timeout: float = 120) -> tuple[int, float]:
    payload = body if isinstance(body, bytes) else json.dumps(body).encode()
    start = time.perf_counter()
    resp = httpx.post(url + "/v1/chat/completions", content=payload, timeout=timeout,
                      headers={"Content-Type": "application/json"})  # fmt: skip
    return resp.status_code, time.perf_counter() - start


def _served_model(url: str) -> str:
    return httpx.get(url + "/v1/models", timeout=10).json()["data"][0]["id"]


def _rss_bytes(pid: int) -> int:
    """Resident memory of `pid` and its descendants (instance processes, if any)."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            status = Path(f"/proc/{p}/status").read_text()
            children = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except OSError:
            continue
        total += next(int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmRSS"))
        todo += [int(c) for c in children]
    return total


def big_prompt(url: str, model: str) -> dict:
    text = "lorem ipsum dolor sit amet " * (21_000_000 // 27)
    body = json.dumps(_chat(model, text)).encode()  # built first: this machine may have 2 cores
    with HealthWatch(url) as watch:
        status, seconds = _timed_post(url, body)
    return {"status": status, "answer_s": seconds, "health_worst_s": watch.worst_s, "pings": watch.pings}


def many_messages(url: str, model: str) -> dict:
    body = json.dumps(_chat(model, "word", n_messages=300_000)).encode()
    with HealthWatch(url) as watch:
        status, seconds = _timed_post(url, body)
    return {"status": status, "answer_s": seconds, "health_worst_s": watch.worst_s, "pings": watch.pings}


def _big_png_url() -> str:
    # A flat 5792 x 5792 PNG compresses to a few hundred kB; its pixels are what costs.
    buf = io.BytesIO()
    Image.new("RGB", (5792, 5792), (200, 40, 40)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def abandoned_images(server: LocalServer, model: str) -> dict:
    url = server.url
    image = {"type": "image_url", "image_url": {"url": _big_png_url()}}
    body = json.dumps(_chat(model, [image] * 16 + [{"type": "text", "text": "what?"}])).encode()
    idle_rss = _rss_bytes(server.proc.pid)

    def abandon() -> None:
        try:
            httpx.post(url + "/v1/chat/completions", content=body, timeout=0.5,
                       headers={"Content-Type": "application/json"})  # fmt: skip
        except httpx.TimeoutException:
            pass  # what the scenario is: the client gives up

    threads = [threading.Thread(target=abandon) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    status, text_s = _timed_post(url, _chat(model, "hello"))
    after_rss = _rss_bytes(server.proc.pid)
    time.sleep(5)  # what the allocator gives back once the work has stopped
    settled_rss = _rss_bytes(server.proc.pid)
    return {
        "text_status": status,
        "text_answer_s": text_s,
        "rss_idle_mb": idle_rss / 2**20,
        "rss_after_mb": after_rss / 2**20,
        "rss_settled_mb": settled_rss / 2**20,
    }


def _serve(model: str, log_dir: Path, *extra: str) -> LocalServer:
    return LocalServer(["--model", model, *extra], log_dir / f"serve{len(extra)}.log", start_timeout=300)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="model directory (default: the demo model)")
    parser.add_argument("--out", default=None, help="write the figures here as JSON")
    args = parser.parse_args()
    model_dir = args.model or str(DEMO_MODEL_DIR)
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        with _serve(model_dir, Path(tmp)) as server:
            model = _served_model(server.url)
            results["big_prompt"] = big_prompt(server.url, model)
            results["many_messages"] = many_messages(server.url, model)
            results["abandoned_images_default_limit"] = abandoned_images(server, model)
        with _serve(model_dir, Path(tmp), "--max-image-pixels", "40000000") as server:
            results["abandoned_images_admitted"] = abandoned_images(server, _served_model(server.url))
    for name, figures in results.items():
        print(f"{name:32s} " + "  ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                         for k, v in figures.items()))  # fmt: skip
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

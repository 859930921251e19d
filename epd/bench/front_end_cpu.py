"""CPU time the API process spends per image: what limits how many images one front end admits.

    python -m epd.bench.front_end_cpu --model DIR --layout 1E+1P+1D [--images 3 --size 1280x960]
        [--requests 24 --concurrency 4] [--keep-alive] [--server-pythonpath OLD_TREE] [--out results.json]

Starts `epd serve`, sends chat requests whose images are distinct noise PNGs (incompressible:
the worst case, ~3.7 MB a 1280x960 image) as base64 data URLs, one output token each, and reads
the API process's own CPU time (utime + stime of its pid in /proc, its instance processes not
included) and minor page faults before and after. Prints CPU ms per image and per request, page
faults per request, the server's mean `preprocess` (epd_timings), and the CPU per image by thread
(the server's epd_api_thread_cpu_seconds: its event loop, router, input pool, zmq I/O). The CPU
figure includes what the process spends with nothing to do over the run's wall time; its idle
rate, measured first (`--idle-seconds`), says how much of the figure that is.
`--server-pythonpath` runs the server from another tree (e.g. a worktree of an older commit),
for a before/after in one run.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from epd.bench.serve.launcher import LocalServer
from epd.proc_stat import MINFLT, STIME, UTIME, stat_fields


def noise_png(width: int, height: int, seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def chat_body(model: str, pngs: list[bytes]) -> bytes:
    parts = [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(p).decode()}}
        for p in pngs
    ]
    parts.append({"type": "text", "text": "describe"})
    body = {"model": model, "messages": [{"role": "user", "content": parts}], "max_tokens": 1}
    body["epd_timings"] = True
    return json.dumps(body).encode()


def process_cpu_seconds(pid: int) -> float:
    """utime + stime of the process itself (all its threads), from /proc/<pid>/stat."""
    fields = stat_fields(f"/proc/{pid}/stat")
    return (int(fields[UTIME]) + int(fields[STIME])) / os.sysconf("SC_CLK_TCK")


def process_minor_faults(pid: int) -> int:
    """Minor page faults of the process itself: memory it touched for the first time (each costs
    microseconds of CPU in a VM, so a buffer mapped afresh per request shows here)."""
    return int(stat_fields(f"/proc/{pid}/stat")[MINFLT])


def thread_cpu_seconds(url: str) -> dict[str, float]:
    """The server's CPU seconds by thread or pool (epd_api_thread_cpu_seconds on /metrics: the
    event loop, the router's thread, the input pool, zmq's I/O); {} where it has none (an older
    tree run with --server-pythonpath)."""
    seconds = {}
    for line in httpx.get(url + "/metrics", timeout=60).text.splitlines():
        if line.startswith("epd_api_thread_cpu_seconds{"):
            labels, value = line.rsplit(" ", 1)
            seconds[labels.split('thread="', 1)[1].split('"', 1)[0]] = float(value)
    return seconds


def idle_cpu_rate(pid: int, seconds: float) -> float:
    """CPU seconds per second the process spends while no request is in flight."""
    if seconds <= 0:
        return 0.0
    before, started = process_cpu_seconds(pid), time.perf_counter()
    time.sleep(seconds)
    return (process_cpu_seconds(pid) - before) / (time.perf_counter() - started)


def send_all(url: str, bodies: list[bytes], concurrency: int, keep_alive: bool = False) -> list[dict]:
    """POST each body, `concurrency` at a time; each on a connection of its own (as the first
    runs of this bench did), or, `keep_alive`, on connections each sending thread keeps (as a
    client with a connection pool does: no connect per request, TCP windows already open)."""
    mine, opened = threading.local(), []  # each thread's client; all of them, to close

    def post(body: bytes) -> dict:
        send = httpx.post
        if keep_alive:
            if not hasattr(mine, "client"):
                mine.client = httpx.Client(timeout=600)
                opened.append(mine.client)
            send = mine.client.post
        resp = send(
            url + "/v1/chat/completions",
            content=body,
            headers={"content-type": "application/json"},
            timeout=600,
        )
        if resp.status_code != 200:
            raise RuntimeError(f"the server answered {resp.status_code}: {resp.text[:1000]}")
        return resp.json()

    try:
        with ThreadPoolExecutor(concurrency) as pool:
            return list(pool.map(post, bodies))
    finally:
        for client in opened:
            client.close()


def measure(args: argparse.Namespace) -> dict:
    width, height = (int(x) for x in args.size.lower().split("x"))
    n_images = args.images * (args.requests + args.warmup)
    pngs = [noise_png(width, height, seed) for seed in range(n_images)]
    groups = [pngs[i : i + args.images] for i in range(0, n_images, args.images)]
    if args.server_pythonpath:
        os.environ["PYTHONPATH"] = args.server_pythonpath
        os.chdir(tempfile.gettempdir())  # `python -m` puts the working directory first on the path
    server_args = ["--model", args.model, "--layout", args.layout, "--served-model-name", "m"]
    server_args += args.serve_arg
    with tempfile.TemporaryDirectory() as tmp, LocalServer(server_args, Path(tmp) / "server.log") as server:
        bodies = [chat_body("m", g) for g in groups]
        send_all(server.url, bodies[: args.warmup], args.concurrency, args.keep_alive)
        pid = server.proc.pid
        idle_rate = idle_cpu_rate(pid, args.idle_seconds)
        before, faults, started = process_cpu_seconds(pid), process_minor_faults(pid), time.perf_counter()
        threads_before = thread_cpu_seconds(server.url)
        replies = send_all(server.url, bodies[args.warmup :], args.concurrency, args.keep_alive)
        cpu, wall = process_cpu_seconds(pid) - before, time.perf_counter() - started
        threads_after = thread_cpu_seconds(server.url)
        threads = {name: t - threads_before.get(name, 0.0) for name, t in threads_after.items()}
        faults = process_minor_faults(pid) - faults
    timings = [r["epd_timings"] for r in replies if r.get("epd_timings")]
    preprocess = [t["preprocess"] for t in timings]
    stages = sorted({name for t in timings for name in (t.get("stages") or {})})
    stage_means = {
        name: float(np.mean([(t.get("stages") or {}).get(name) or 0.0 for t in timings])) for name in stages
    }
    images = args.images * args.requests
    return {
        "layout": args.layout,
        "keep_alive": args.keep_alive,
        "server_pythonpath": args.server_pythonpath or "",
        "image_bytes": len(pngs[0]),
        "requests": args.requests,
        "images": images,
        "api_cpu_ms_per_image": 1000 * cpu / images,
        "api_cpu_ms_per_request": 1000 * cpu / args.requests,
        "api_cpu_ms_per_image_by_thread": {name: 1000 * t / images for name, t in threads.items() if t > 0},
        "api_minor_faults_per_request": faults / args.requests,
        "preprocess_ms_mean": 1000 * float(np.mean(preprocess)) if preprocess else None,
        # What the process spends with no request (router loop, heartbeats, instance stats) over
        # the run's wall time, per image: part of the figure above, not of any request's path.
        "idle_cpu_ms_per_s": 1000 * idle_rate,
        "idle_cpu_ms_per_image": 1000 * idle_rate * wall / images,
        "wall_s": wall,
        "ttft_s_mean": float(np.mean([t["ttft"] for t in timings])) if timings else None,
        "stage_s_mean": stage_means,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--layout", default="1E+1P+1D")
    p.add_argument("--images", type=int, default=3, help="images per request")
    p.add_argument("--size", default="1280x960")
    p.add_argument("--requests", type=int, default=24)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--keep-alive", action="store_true", help="reuse connections (one per sending thread)")
    p.add_argument(
        "--idle-seconds", type=float, default=3.0, help="measure the idle CPU rate this long first"
    )
    p.add_argument("--server-pythonpath", default=None, help="run the server from this tree")
    p.add_argument("--serve-arg", action="append", default=[], help="extra `epd serve` argument (repeat)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    result = measure(args)
    print(
        f"{args.layout:>12}  {result['api_cpu_ms_per_image']:7.2f} ms CPU/image  "
        f"{result['api_cpu_ms_per_request']:7.2f} ms CPU/request  "
        f"{result['api_minor_faults_per_request']:6.0f} page faults/request  "
        f"preprocess {result['preprocess_ms_mean']:.2f} ms  ({result['images']} images of "
        f"{result['image_bytes'] / 1e6:.1f} MB)  {args.server_pythonpath or 'this tree'}"
    )
    print(
        f"              idle baseline {result['idle_cpu_ms_per_s']:.1f} ms/s: "
        f"{result['idle_cpu_ms_per_image']:.2f} ms of each image's figure"
    )
    by_thread = sorted(result["api_cpu_ms_per_image_by_thread"].items(), key=lambda kv: -kv[1])
    if by_thread:
        print("              by thread, ms/image: " + ", ".join(f"{k} {v:.2f}" for k, v in by_thread))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

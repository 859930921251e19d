"""Where a streamed nccl message's time goes: a timestamp at each hand-over, on both sides.

    python3 nccl_trace.py OUT [MB]      (two GPUs: cuda:0 -> cuda:1; prints the table)

The connector's own methods are wrapped to stamp each key: send() called, notice pushed, sends
posted (producer); notice received, recvs posted, landed, taken (consumer). One untimed
streamed round first (the consumer's allocator grows once), then 40 messages back to back.
Written against the connector as of commit f41ff70 (one notice and one op per message); the
batched notices that came after it (Notice.headers, post_sends / post_recvs) need its wrappers
adapted.
"""

import json
import multiprocessing as mp
import statistics
import sys
import time

import torch
import zmq

from epd.transfer import create_connector, nccl_channel, nccl_recv, nccl_send

N, WARM = 40, 5


def stamper(table: dict):
    def mark(name: str, key: str) -> None:
        table.setdefault(key, {})[name] = time.time()

    return mark


def patch_consumer(mark) -> None:
    loop, channel = nccl_recv.NcclRecvLoop, nccl_channel.Channel
    notice, deliver, post_recv = loop._notice, loop._deliver, channel.post_recv

    def on_notice(self, message):
        mark("notice", message.header.key)
        return notice(self, message)

    def on_deliver(self, landing):
        mark("landed", landing.header.key)
        return deliver(self, landing)

    def on_post_recv(self, header):
        mark("post_start", header.key)
        posted = post_recv(self, header)
        mark("posted", header.key)
        return posted

    loop._notice, loop._deliver, channel.post_recv = on_notice, on_deliver, on_post_recv


def patch_producer(mark) -> None:
    loop, channel = nccl_send.NcclSendLoop, nccl_channel.Channel
    push, post_send = loop._push, channel.post_send
    order = iter(range(1 << 30))

    def on_push(self, pair, message):
        pushed = push(self, pair, message)
        if pushed and hasattr(message, "header"):
            mark("notice_sent", message.header.key)
        return pushed

    def on_post_send(self, tensors, ready=None):
        posted = post_send(self, tensors, ready)
        mark("send_posted", f"seq{next(order)}")
        return posted

    loop._push, channel.post_send = on_push, on_post_send


def consumer(address_q, count: int, out: str) -> None:
    table: dict = {}
    mark = stamper(table)
    patch_consumer(mark)
    conn = create_connector("nccl", device="cuda:1")
    address_q.put(conn.address)
    poller = zmq.Poller()
    for pollable in conn.pollables():
        poller.register(pollable, zmq.POLLIN)
    got = 0
    while got < count:
        poller.poll(60_000)
        for item in conn.poll_received():
            mark("taken", item.key)
            got += 1
    with open(out, "w") as f:
        json.dump(table, f)
    conn.close()


def wait_sent(producer, count: int, mark=None) -> None:
    done = 0
    while done < count:
        results = producer.poll_sent()
        for result in results:
            if mark is not None:
                mark("done_seen", result.key)
        done += len(results)
        if not results:
            time.sleep(50e-6)  # never a busy loop: it would starve the connector's send thread


def main() -> None:
    out, mb = sys.argv[1], float(sys.argv[2]) if len(sys.argv) > 2 else 16.0
    ctx = mp.get_context("spawn")
    address_q = ctx.Queue()
    proc = ctx.Process(target=consumer, args=(address_q, WARM + 2 * N, f"{out}/consumer.json"))
    proc.start()
    table: dict = {}
    mark = stamper(table)
    patch_producer(mark)
    tokens = int(mb * (1 << 20) / (28 * 2 * 4 * 128 * 2))
    kv = torch.randn(28, 2, tokens, 4, 128, device="cuda:0").to(torch.bfloat16)
    with create_connector("nccl", device="cuda:0") as producer:
        address = address_q.get(timeout=120)
        for i in range(WARM):
            producer.send(address, f"w{i}", {"x": kv})
            wait_sent(producer, 1)
        for i in range(N):  # untimed: the consumer's allocator grows to the payloads in flight
            producer.send(address, f"r{i}", {"x": kv})
        wait_sent(producer, N)
        time.sleep(0.2)
        for i in range(N):
            mark("send_called", f"k{i}")
            producer.send(address, f"k{i}", {"x": kv})
        wait_sent(producer, N, mark)
        proc.join(120)
    with open(f"{out}/consumer.json") as f:
        consumed = json.load(f)
    report(table, consumed, mb)


def report(produced: dict, consumed: dict, mb: float) -> None:
    keys = [f"k{i}" for i in range(N)]
    # the warm-up byte's send comes first, then WARM + N sends before the timed ones
    seq = {key: f"seq{i + WARM + N + 1}" for i, key in enumerate(keys)}
    columns = {
        "notice_sent": lambda k: produced[k]["notice_sent"],
        "send_posted": lambda k: produced[seq[k]]["send_posted"],
        "notice_recv": lambda k: consumed[k]["notice"],
        "post_start": lambda k: consumed[k]["post_start"],
        "posted": lambda k: consumed[k]["posted"],
        "landed": lambda k: consumed[k]["landed"],
        "taken": lambda k: consumed[k]["taken"],
        "done_seen": lambda k: produced[k]["done_seen"],
    }
    for name, at in columns.items():
        ms = [1e3 * (at(k) - produced[k]["send_called"]) for k in keys]
        median = statistics.median(ms)
        print(f"{name:12s} ms after send(): median {median:8.3f}  first {ms[0]:8.3f}  last {ms[-1]:8.3f}")
    landed = [consumed[k]["landed"] for k in keys]
    gap = statistics.median(b - a for a, b in zip(landed, landed[1:]))
    print(f"landed gaps: median {1e3 * gap:.3f} ms -> {mb * (1 << 20) / gap / 1e9:.1f} GB/s")
    posts = [consumed[k]["posted"] - consumed[k]["post_start"] for k in keys]
    print(f"a recv post costs {1e3 * statistics.median(posts):.3f} ms (median)")
    spans = {name: 1e3 * (at(keys[-1]) - at(keys[0])) for name, at in columns.items()}
    print("spans, first to last key (ms): " + ", ".join(f"{n} {v:.3f}" for n, v in spans.items()))


if __name__ == "__main__":
    main()

"""Where a streamed nccl message's time goes: timestamps at each hand-over, producer and consumer."""
import json, statistics, sys, time
import multiprocessing as mp
import torch, zmq

from epd.transfer import create_connector, nccl_channel, nccl_recv, nccl_send

def patch(T, side):
    def mark(name, key):
        T.setdefault(key, {})[name] = time.time()
    C = nccl_channel.Channel
    if side == "consumer":
        R = nccl_recv.NcclRecvLoop
        on, od, opr = R._notice, R._deliver, C.post_recv
        R._notice = lambda self, n: (mark("notice", n.header.key), on(self, n))[1]
        R._deliver = lambda self, l: (mark("landed", l.header.key), od(self, l))[1]
        def post_recv(self, header):
            mark("post_start", header.key); r = opr(self, header); mark("posted", header.key); return r
        C.post_recv = post_recv
    else:
        S = nccl_send.NcclSendLoop
        op = S._push
        def _push(self, pair, message):
            ok = op(self, pair, message)
            if ok and hasattr(message, "header"):
                mark("notice_sent", message.header.key)
            return ok
        S._push = _push
        ops = C.post_send
        counter = {"i": -1}
        def post_send(self, tensors, ready=None):
            counter["i"] += 1
            r = ops(self, tensors, ready)
            mark("send_posted", f"seq{counter['i']}")
            return r
        C.post_send = post_send
    return mark

def consumer(q, n, out):
    T = {}
    mark = patch(T, "consumer")
    conn = create_connector("nccl", device="cuda:1")
    q.put(conn.address)
    poller = zmq.Poller()
    for p in conn.pollables():
        poller.register(p, zmq.POLLIN)
    got = 0
    while got < n:
        poller.poll(60000)
        for item in conn.poll_received():
            mark("taken", item.key); got += 1
    json.dump(T, open(out, "w"))
    conn.close()

def main():
    out = sys.argv[1]; n = 40; warm = 5; mb = float(sys.argv[2]) if len(sys.argv) > 2 else 16
    ctx = mp.get_context("spawn"); q = ctx.Queue()
    p = ctx.Process(target=consumer, args=(q, 2 * n + warm, out + "/consumer.json")); p.start()
    T = {}
    mark = patch(T, "producer")
    tokens = int(mb * (1 << 20) / (28 * 2 * 4 * 128 * 2))
    x = torch.randn(28, 2, tokens, 4, 128, device="cuda:0").to(torch.bfloat16)
    with create_connector("nccl", device="cuda:0") as prod:
        addr = q.get(timeout=120)
        for i in range(warm):
            prod.send(addr, f"w{i}", {"x": x})
            while not prod.poll_sent(): time.sleep(50e-6)
        time.sleep(0.2)
        for i in range(n):  # an untimed round first: the consumer's allocator grows once
            prod.send(addr, f"r{i}", {"x": x})
        got = 0
        while got < n:
            rs = prod.poll_sent(); got += len(rs)
            if not rs: time.sleep(50e-6)
        time.sleep(0.2)
        for i in range(n):
            mark("send_called", f"k{i}"); prod.send(addr, f"k{i}", {"x": x})
        done = 0
        while done < n:
            rs = prod.poll_sent()
            for r in rs:
                mark("done_seen", r.key); done += 1
            if not rs: time.sleep(50e-6)
        p.join(120)
    json.dump(T, open(out + "/producer.json", "w"))
    C = json.load(open(out + "/consumer.json"))
    keys = [f"k{i}" for i in range(n)]
    seq = {f"k{i}": f"seq{i + warm + n + 1}" for i in range(n)}  # +1: the warm-up byte's send
    rows = []
    for k in keys:
        t0 = T[k]["send_called"]
        r = {"notice_sent": T[k].get("notice_sent", 0) - t0, "send_posted": T.get(seq[k], {}).get("send_posted", 0) - t0,
             "notice_recv": C[k]["notice"] - t0, "post_start": C[k]["post_start"] - t0, "posted": C[k]["posted"] - t0,
             "landed": C[k]["landed"] - t0, "taken": C[k]["taken"] - t0, "done_seen": T[k]["done_seen"] - t0}
        rows.append(r)
    for name in rows[0]:
        vals = [r[name] * 1e3 for r in rows]
        print(f"{name:12s} ms after send(): median {statistics.median(vals):8.3f}  first {vals[0]:8.3f}  last {vals[-1]:8.3f}")
    landed = [C[k]["landed"] for k in keys]; posted = [C[k]["posted"] for k in keys]; notices = [C[k]["notice"] for k in keys]
    gaps = [1e3 * (b - a) for a, b in zip(landed, landed[1:])]
    print(f"landed gaps ms: median {statistics.median(gaps):.3f} -> {mb * (1 << 20) / (statistics.median(gaps) / 1e3) / 1e9:.1f} GB/s")
    print(f"post cost ms (post_start->posted): median {statistics.median([1e3*(C[k]['posted']-C[k]['post_start']) for k in keys]):.3f}")
    print(f"notice arrivals span ms: {1e3*(notices[-1]-notices[0]):.3f}; posts span {1e3*(posted[-1]-posted[0]):.3f}; landed span {1e3*(landed[-1]-landed[0]):.3f}")
    sc = [T[k]["send_called"] for k in keys]
    print(f"send() calls span ms: {1e3*(sc[-1]-sc[0]):.3f}")

if __name__ == "__main__":
    main()

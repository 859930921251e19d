"""Chaos: instances of every role SIGKILLed or SIGSTOPped at random under a steady stream of
requests, restarts on. Every request ends with the tokens of an undisturbed 1EPD run.

A seeded plan says which role to disturb next and how; the instance is picked among that role's
available ones, and only while another one of the role is available, so a role is never wholly
down. Each disturbance is followed by state, never by sleeps:

| kind | done                 | then (when the router says so)              | over when                   |
|------|----------------------|---------------------------------------------|-----------------------------|
| kill | SIGKILL              | -                                           | it is alive with a new pid  |
| stop | SIGSTOP              | marked down (silence): SIGCONT, so whatever | it is alive with a new pid  |
|      |                      | it says late must be ignored (fenced)       | (the restarter killed it)   |
"""

from __future__ import annotations

import os
import random
import signal
import time
from collections import deque
from dataclasses import dataclass

import torch

from epd import LLM, SamplingParams
from epd.cluster.layout import ROLE_ORDER, Role
from epd.testing.images import noise_image

SEED = 17
LAYOUT = "2E+2P+2D"
SILENCE_TIMEOUT_S = 2.0
CHAOS_S = 20.0  # the stream and the disturbances last this long at least; then the last requests drain
# ...and until every role was hit both ways: on a loaded machine instances take longer to come
# back, and each disturbance waits for a second available instance of its role. A bound, not a guess.
CHAOS_MAX_S = 300.0
GAP_S = (1.5, 3.0)  # between two disturbances
RATE = 10.0  # requests a second: few enough that the reference run stays short
MAX_IN_FLIGHT = 16
MAX_PER_INSTANCE = 3  # disturbances of one instance (restarts are limited to 5 each)
DRAIN_TIMEOUT_S = 60.0
BACK_TIMEOUT_S = 60.0
IDLE_TIMEOUT_S = 10.0
IMAGE_PAD = "<|vision_start|><|image_pad|><|vision_end|>"


def prompt_for(i: int) -> str | dict:
    """Every other request brings an image of its own, so a P that dies has some on their way (their
    pins on E leaked before). Each prompt starts with its own text: no KV block is shared across
    requests, as a prefix hit reads KV computed in another batch, whose rounding can flip a
    near-tie of the tiny random model."""
    head, tail = f"Chaos request {i}: ", "tell me more. " * (i % 5)
    if i % 2:
        return head + tail
    image = noise_image(56, 56, seed=i)
    return {"prompt": f"{head}{IMAGE_PAD}{tail}", "multi_modal_data": {"image": [image]}}


def params_for(i: int, rng: random.Random) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=rng.randint(16, 192), ignore_eos=True)


@dataclass
class Disturbance:
    at: float  # seconds since the chaos began
    name: str
    pid: int
    kind: str  # "kill" or "stop"
    resumed: bool = False  # a stopped one got SIGCONT
    back_after: float | None = None  # seconds from the disturbance to its new process serving


class Chaos:
    """Disturbs instances by a seeded plan; `tick` moves every disturbance along the table above."""

    def __init__(self, cluster, seed: int) -> None:
        self.cluster, self.rng = cluster, random.Random(seed)
        self.start = time.monotonic()
        self.next_at = self.start + self.rng.uniform(*GAP_S)
        # Every role hit by both kinds first (in a seeded order), then random ones.
        plan = [(role, kind) for role in ROLE_ORDER for kind in ("kill", "stop")]
        self.rng.shuffle(plan)
        plan += [(self.rng.choice(ROLE_ORDER), self.rng.choice(("kill", "stop"))) for _ in range(12)]
        self.plan = deque(plan)
        self.active: dict[str, Disturbance] = {}
        self.log: list[Disturbance] = []

    @property
    def covered(self) -> bool:
        """Every role was hit by both kinds (the plan's first part is done)."""
        hit = {(role, d.kind) for d in self.log for role in self.cluster.router.instances[d.name].spec.roles}
        return hit >= {(role, kind) for role in ROLE_ORDER for kind in ("kill", "stop")}

    def tick(self, disturb: bool) -> None:
        for d in list(self.active.values()):
            self._follow(d)
        if disturb and time.monotonic() >= self.next_at:
            self._disturb_next()

    def _follow(self, d: Disturbance) -> None:
        handle = self.cluster.router.instances[d.name]
        if d.kind == "stop" and not d.resumed and not handle.alive:
            d.resumed = True
            signal_if_alive(d.pid, signal.SIGCONT)
        if handle.alive and handle.ready.pid != d.pid:
            d.back_after = time.monotonic() - self.start - d.at
            del self.active[d.name]

    def _disturb_next(self) -> None:
        for role, kind in list(self.plan):
            victims = self._victims(role)
            if victims:
                self.plan.remove((role, kind))
                self._disturb(self.rng.choice(victims), kind)
                self.next_at = time.monotonic() + self.rng.uniform(*GAP_S)
                return

    def _victims(self, role: Role) -> list[str]:
        """Instances of `role` that may be disturbed now: none if it is the role's last available."""
        available = [
            name
            for name, h in sorted(self.cluster.router.instances.items())
            if h.has(role) and h.alive and name not in self.active
        ]
        if len(available) < 2:
            return []
        return [n for n in available if sum(d.name == n for d in self.log) < MAX_PER_INSTANCE]

    def _disturb(self, name: str, kind: str) -> None:
        pid = self.cluster.router.instances[name].ready.pid
        d = Disturbance(round(time.monotonic() - self.start, 2), name, pid, kind)
        self.active[name] = d
        self.log.append(d)
        os.kill(pid, signal.SIGKILL if kind == "kill" else signal.SIGSTOP)

    def resume_all(self) -> None:
        """Whatever is still stopped goes on (a failing test must not leave stopped processes)."""
        for d in self.active.values():
            if d.kind == "stop":
                signal_if_alive(d.pid, signal.SIGCONT)


def signal_if_alive(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass  # the restarter killed it first


def serve_through_chaos(llm: LLM, chaos: Chaos) -> tuple[dict, dict]:
    """Send RATE requests a second (at most MAX_IN_FLIGHT running) while `chaos` acts, for CHAOS_S
    and until every role was hit both ways (CHAOS_MAX_S at most), then drain. Returns (request id
    -> its prompt and params, request id -> its final output)."""
    cluster, rng = llm.engine, random.Random(SEED)
    sent, finished = {}, {}
    end, bound = chaos.start + CHAOS_S, chaos.start + CHAOS_MAX_S
    while (now := time.monotonic()) < end or (not chaos.covered and now < bound):
        due = int((now - chaos.start) * RATE) + 1
        while len(sent) < due and len(sent) - len(finished) < MAX_IN_FLIGHT:
            i = len(sent)
            sent[str(i)] = (prompt_for(i), params_for(i, rng))
            cluster.add_request(str(i), llm.processor.process_prompt(sent[str(i)][0]), sent[str(i)][1])
        finished.update({o.request_id: o for o in cluster.step() if o.finished})
        chaos.tick(disturb=True)
    deadline = time.monotonic() + DRAIN_TIMEOUT_S
    while len(finished) < len(sent) and time.monotonic() < deadline:
        finished.update({o.request_id: o for o in cluster.step() if o.finished})
        chaos.tick(disturb=False)
    return sent, finished


def wait_until_every_instance_is_back(cluster, chaos: Chaos) -> None:
    deadline = time.monotonic() + BACK_TIMEOUT_S
    while chaos.active and time.monotonic() < deadline:
        cluster.step()
        chaos.tick(disturb=False)


def held_blocks(cluster) -> dict[str, dict[str, float]]:
    """Instances whose last report has KV blocks or pinned MM blocks in use."""
    held = {}
    for name, stats in cluster.router.instance_stats.items():
        used = {k: stats[k] for k in ("kv_cache_usage", "mm_cache_usage") if stats.get(k)}
        if used:
            held[name] = used
    return held


def wait_until_nothing_is_held(cluster) -> dict[str, dict[str, float]]:
    """Instances report every 0.25 s: wait past two reports, then until none holds anything."""
    settle, deadline = time.monotonic() + 0.6, time.monotonic() + IDLE_TIMEOUT_S
    while time.monotonic() < settle or (held_blocks(cluster) and time.monotonic() < deadline):
        cluster.step()
    return held_blocks(cluster)


def assert_the_cluster_recovered(cluster, chaos: Chaos, story: str) -> None:
    """Nothing held (ledger, KV and MM caches), every instance serving, each disturbed one restarted
    (once per disturbance at least: a busy machine may take an undisturbed one for dead too), every
    role hit both ways."""
    assert not chaos.active, f"not back after {BACK_TIMEOUT_S} s: {chaos.active}\n{story}"
    assert not cluster.router.requests
    assert cluster.router.ledger.is_empty(), cluster.router.ledger.outstanding()
    held = wait_until_nothing_is_held(cluster)
    assert not held, f"blocks held with nothing running (an MM pin for a dead P leaked so): {held}"
    assert all(h.alive for h in cluster.router.instances.values())
    restarts = cluster.restarter.restarts()
    for name in {d.name for d in chaos.log}:
        assert restarts.get(name, 0) >= sum(d.name == name for d in chaos.log), (restarts, story)
    hit = {(role, d.kind) for d in chaos.log for role in cluster.router.instances[d.name].spec.roles}
    assert hit == {(role, kind) for role in ROLE_ORDER for kind in ("kill", "stop")}, story
    assert cluster.router.stats["retries"] > 0, "the chaos hit no request: it proved nothing"


def undisturbed_tokens(model: str, sent: dict) -> dict[str, list[int]]:
    # One thread, as each instance has here (2 cores, 6 instances): the same float reductions, and
    # no OpenMP threads spinning against a busy machine's other processes (seen: 3 s -> 140 s).
    torch.set_num_threads(1)
    ids = list(sent)
    with LLM(model, layout="1EPD", max_model_len=512) as reference:
        outs = reference.generate([sent[i][0] for i in ids], [sent[i][1] for i in ids], use_tqdm=False)
    return {i: out.outputs[0].token_ids for i, out in zip(ids, outs)}


def difference(got, want: list[int]) -> str:
    """Where a request's tokens part from the undisturbed run's, and where it ran."""
    have = got.outputs[0].token_ids
    at = next((k for k, (x, y) in enumerate(zip(have, want)) if x != y), min(len(have), len(want)))
    path = [(e.event.value, e.instance) for e in got.metrics.events if e.instance]
    head = f"request {got.request_id}: {len(have)} tokens, {len(want)} expected"
    return f"{head}; from {at}: {have[at : at + 4]} instead of {want[at : at + 4]}; {path}"


def test_chaos_every_request_ends_with_the_undisturbed_tokens(checkpoints):
    model = str(checkpoints["qwen2_5_vl"])
    with LLM(model, layout=LAYOUT, max_model_len=512, instance_silence_timeout=SILENCE_TIMEOUT_S) as llm:
        cluster = llm.engine
        chaos = Chaos(cluster, SEED)
        try:
            sent, finished = serve_through_chaos(llm, chaos)
            wait_until_every_instance_is_back(cluster, chaos)
        finally:
            chaos.resume_all()
        story = "\n".join(map(str, chaos.log))
        assert len(finished) == len(sent), f"{len(sent) - len(finished)} requests hung:\n{story}"
        errors = {rid: o.error for rid, o in finished.items() if o.error is not None}
        assert not errors, f"{errors}\n{story}"
        assert_the_cluster_recovered(cluster, chaos, story)
        router = cluster.router
        summary = f"{len(sent)} requests, {len(chaos.log)} disturbances, {router.stats['retries']} retries, "
        summary += f"restarts {cluster.restarter.restarts()}, recoveries {router.core.recoveries}"
    expected = undisturbed_tokens(model, sent)
    wrong = [i for i in sent if finished[i].outputs[0].token_ids != expected[i]]
    details = "\n".join(difference(finished[i], expected[i]) for i in wrong[:5])
    assert not wrong, f"{len(wrong)} of {len(sent)} differ from the undisturbed run:\n{details}\n{story}"
    print(f"\n{summary}\n{story}")

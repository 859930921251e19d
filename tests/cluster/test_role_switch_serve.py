"""Switches between real processes: `epd serve --switchable-roles` (instance processes, ZMQ, shm,
real HTTP on loopback) turns an encoder into a decoder under a closed loop of chat requests, the
decoder into a prefill instance while a long stream decodes on it (the stream moves with its KV to
the other decoder), and that back into an encoder under load again. Nothing is lost or duplicated,
tokens and streamed text are those of a run without any switch, and every phase (weights and memory
included) is in the switch replies and in /metrics. Every wait is for a state, bounded."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import httpx
import pytest
from server.chat_load import ChatLoad
from server.helpers import ServerProcess, image_message, metrics, wait_until_idle

from epd import LLM, SamplingParams

KEY = "sk-switch"
MAX_TOKENS = 16
LONG = 600  # tokens of the streams that decode while their instance switches
PROMPTS = [image_message(f"picture {k}", k) for k in range(2)]
PROMPTS += [[{"role": "user", "content": f"text only {k}"}] for k in range(2)]
WAIT_S = 120.0  # a bound on waiting for a state, never a guess at how long it takes
LAYOUT = ["--layout", "2E+1P+1D", "--switchable-roles", "--num-kv-blocks", "256", "--max-model-len", "1024"]


@pytest.fixture(scope="module")
def model(checkpoints) -> str:
    return str(checkpoints["qwen2_5_vl"])


@pytest.fixture(scope="module")
def reference(model: str) -> tuple[list[list[int]], list[str]]:
    """From the in-process engine (token-exact against transformers elsewhere): each prompt's tokens,
    and the long streams' texts."""
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    long = SamplingParams(temperature=0, max_tokens=LONG, ignore_eos=True)
    with LLM(model) as llm:
        tokens = [out.outputs[0].token_ids for out in llm.chat(PROMPTS, params, use_tqdm=False)]
        texts = [out.outputs[0].text for out in llm.chat(PROMPTS[2:], long, use_tqdm=False)]
    return tokens, texts


def switch(url: str, instance: str, roles: str) -> dict:
    headers = {"Authorization": f"Bearer {KEY}"}
    url = f"{url}/admin/instances/{instance}/roles"
    resp = httpx.post(url, json={"roles": roles}, headers=headers, timeout=WAIT_S)
    assert resp.status_code == 200, resp.text
    return resp.json()


class Stream:
    """A streamed chat request, read in a thread of its own: its text as it grows."""

    def __init__(self, url: str, messages: list[dict]) -> None:
        body = {"model": "m", "messages": messages, "max_tokens": LONG, "temperature": 0}
        self.body = body | {"ignore_eos": True, "stream": True}
        self.url, self.text, self.lines = url, "", []
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        headers = {"Authorization": f"Bearer {KEY}"}
        with httpx.stream("POST", self.url + "/v1/chat/completions", json=self.body, headers=headers) as r:
            for line in r.iter_lines():
                self.lines.append(line)
                if line.startswith("data: {"):
                    self.text += json.loads(line[6:])["choices"][0]["delta"].get("content") or ""

    def wait_for_text(self) -> None:
        deadline = time.monotonic() + WAIT_S
        while not self.text:
            assert time.monotonic() < deadline and self.thread.is_alive(), "no text streamed"
            time.sleep(0.01)


def run_load(url: str, instance: str, roles: str, reference: list[list[int]]) -> dict:
    """Switch `instance` to `roles` while requests flow; check every answer."""
    with ChatLoad(url, KEY, PROMPTS, MAX_TOKENS, WAIT_S) as load:
        load.wait_for(3)  # requests in flight as it starts
        record = switch(url, instance, roles)
        load.wait_for(len(load.results) + 3)  # and requests still flow after it
    load.check(reference)
    return record


def test_weights_and_running_decodes_move_between_processes(model: str, reference, tmp_path: Path):
    tokens, texts = reference
    args = ["--model", model, "--served-model-name", "m", *LAYOUT]
    srv = ServerProcess(args, tmp_path / "serve.log", api_key=KEY).start()
    try:
        records = [run_load(srv.url, "E1", "D", tokens)]
        wait_until_idle(srv.url)
        streams = [Stream(srv.url, messages) for messages in PROMPTS[2:]]  # one on E1, one on D0
        for stream in streams:
            stream.wait_for_text()
        records.append(switch(srv.url, "E1", "P"))  # while its stream decodes
        for stream in streams:
            stream.thread.join(WAIT_S)
        assert [s.text for s in streams] == texts, "a moved stream changed, skipped or repeated text"
        assert all([line for line in s.lines if line][-1] == "data: [DONE]" for s in streams)
        records.append(run_load(srv.url, "E1", "E", tokens))

        assert [(r["from"], r["to"], r["state"], r["error"]) for r in records] == [
            ("E", "D", "done", None),
            ("D", "P", "done", None),
            ("P", "E", "done", None),
        ]
        assert [r["migrated"] for r in records][1] == 1, "E1's running stream moved to D0"
        for r in (records[0], records[2]):  # E moves: a part built from the host copy, caches re-carved
            assert r["timings"]["weights"] > 0 and r["timings"]["memory"] > 0, r
        assert records[1]["timings"]["weights"] == 0, "P <-> D keeps the weights"
        m = wait_until_idle(srv.url)
        for phase in ("drain", "weights", "memory", "rejoin"):
            assert m["epd_role_switch_phase_seconds_count"][(("phase", phase),)] == 3
        done = (("from_roles", "D"), ("outcome", "done"), ("to_roles", "P"))
        assert m["epd_role_switches_total"][done] == 1
        listed = httpx.get(srv.url + "/admin/instances", headers={"Authorization": f"Bearer {KEY}"}).json()
        assert [(i["id"], i["roles"], i["state"]) for i in listed["data"]] == [
            ("E0", "E", "up"),
            ("E1", "E", "up"),
            ("P0", "P", "up"),
            ("D0", "D", "up"),
        ]
        assert metrics(srv.url)["epd_instance_requests_migrated_total"][(("instance", "E1"),)] == 1
    finally:
        assert srv.stop() == 0, srv.log()[-3000:]

"""Switching instances between P and D while `epd serve` runs (real processes, real HTTP on
loopback): nothing lost or duplicated, tokens as without the switch, no block left behind, the
admin endpoints' answers, and the switches in /metrics. Every wait is for a state, bounded."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from epd import LLM, SamplingParams

from .chat_load import ChatLoad
from .helpers import ServerProcess, gauge, image_message, metrics, wait_until_idle

KEY = "sk-switch"
LAYOUT = ["--layout", "1E+2P+1D", "--max-model-len", "1024", "--num-kv-blocks", "512"]
MAX_TOKENS = 12
PROMPTS = [image_message(f"picture {k} please", k) for k in range(3)]
PROMPTS += [[{"role": "user", "content": f"text only {k}"}] for k in range(3)]
WAIT_S = 60.0  # a bound on waiting for a state, never a guess at how long it takes


@pytest.fixture(scope="module")
def srv(model: str, tmp_path_factory: pytest.TempPathFactory):
    log = tmp_path_factory.mktemp("logs") / "role_switching.log"
    srv = ServerProcess(["--model", model, "--served-model-name", "m", *LAYOUT], log, api_key=KEY).start()
    yield srv
    assert srv.stop() == 0, srv.log()[-3000:]


@pytest.fixture(scope="module")
def reference(model: str) -> list[list[int]]:
    """Each prompt's tokens from the in-process engine: a run without any switch."""
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    with LLM(model) as llm:
        return [out.outputs[0].token_ids for out in llm.chat(PROMPTS, params, use_tqdm=False)]


def admin(srv: ServerProcess, method: str, path: str, key: str | None = KEY, **kwargs) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.request(method, srv.url + path, headers=headers, timeout=WAIT_S * 2, **kwargs)


def roles_now(srv: ServerProcess) -> dict[str, tuple[str, str]]:
    resp = admin(srv, "GET", "/admin/instances")
    assert resp.status_code == 200, resp.text
    return {i["id"]: (i["roles"], i["state"]) for i in resp.json()["data"]}


def switch(srv: ServerProcess, instance: str, roles: str) -> dict:
    resp = admin(srv, "POST", f"/admin/instances/{instance}/roles", json={"roles": roles})
    assert resp.status_code == 200, resp.text
    record = resp.json()
    assert record["state"] == "done" and record["to"] == roles and record["error"] is None
    return record


def arrange(srv: ServerProcess, wanted: dict[str, str]) -> None:
    """Bring instances to these roles (those that differ), in the order given."""
    for instance, roles in wanted.items():
        if roles_now(srv)[instance][0] != roles:
            switch(srv, instance, roles)


def chat_load(srv: ServerProcess, workers: int = 4) -> ChatLoad:
    """A closed loop of this module's prompts against `srv`."""
    return ChatLoad(srv.url, KEY, PROMPTS, MAX_TOKENS, WAIT_S, workers)


def test_p_to_d_and_back_under_load_lose_nothing_and_change_no_token(srv, reference):
    arrange(srv, {"P1": "P", "D0": "D"})
    records = []
    with chat_load(srv) as load:
        for instance, roles in (("P1", "D"), ("D0", "P"), ("D0", "D"), ("P1", "P")):
            load.wait_for(len(load.results) + 4)  # this switch starts with requests in flight
            records.append(switch(srv, instance, roles))
        load.wait_for(len(load.results) + 4)  # and requests still flow after the last one
    load.check(reference)
    assert [(r["id"], r["from"], r["to"]) for r in records] == [
        ("P1", "P", "D"),
        ("D0", "D", "P"),
        ("D0", "P", "D"),
        ("P1", "D", "P"),
    ]
    for r in records:
        t = r["timings"]
        assert all(t[phase] >= 0 for phase in ("drain", "reconfigure", "rejoin"))
        assert t["total"] == pytest.approx(t["drain"] + t["reconfigure"] + t["rejoin"])
    assert roles_now(srv) == {"E0": ("E", "up"), "P0": ("P", "up"), "P1": ("P", "up"), "D0": ("D", "up")}


def test_twenty_switches_back_and_forth_leave_no_block_behind(srv, reference):
    arrange(srv, {"P1": "P", "D0": "D"})
    before = metrics(srv.url)
    with chat_load(srv, workers=2) as load:
        for i in range(20):
            switch(srv, "P1", "D" if i % 2 == 0 else "P")
            load.wait_for(len(load.results) + 1)
    load.check(reference)
    m = wait_until_idle(srv.url)  # KV and pinned MM blocks 0 on every instance, nothing admitted
    for instance in ("P0", "P1", "D0"):
        assert gauge(m, "epd_instance_kv_cache_usage", instance=instance) == 0
        assert gauge(m, "epd_instance_running_requests", instance=instance) == 0
    counted = {
        (to, k): gauge(m, "epd_role_switches_total", from_roles=fr, to_roles=to, outcome="done")
        - gauge(before, "epd_role_switches_total", from_roles=fr, to_roles=to, outcome="done")
        for fr, to, k in (("P", "D", 0), ("D", "P", 1))
    }
    assert counted == {("D", 0): 10, ("P", 1): 10}
    for phase in ("drain", "reconfigure", "rejoin", "total"):
        count = m["epd_role_switch_phase_seconds_count"][(("phase", phase),)]
        assert count - before["epd_role_switch_phase_seconds_count"][(("phase", phase),)] == 20


def stream(srv: ServerProcess, max_tokens: int):
    """A streamed chat request, opened: the caller reads its lines."""
    body = {"model": "m", "messages": PROMPTS[3], "max_tokens": max_tokens, "temperature": 0}
    body |= {"ignore_eos": True, "stream": True}
    client = httpx.Client(timeout=WAIT_S, headers={"Authorization": f"Bearer {KEY}"})
    return client, client.stream("POST", srv.url + "/v1/chat/completions", json=body)


def first_text(lines) -> None:
    """Read up to the first chunk with text: the request decodes now."""
    for line in lines:
        if line.startswith("data: {") and any(
            c["delta"].get("content") for c in json.loads(line[6:])["choices"]
        ):
            return
    raise AssertionError("the stream ended before any text")


def test_a_switch_moves_the_stream_it_held_and_one_leaving_no_decoder_is_refused(srv):
    arrange(srv, {"P1": "D", "D0": "D"})
    wait_until_idle(srv.url)
    opened = [stream(srv, 600) for _ in range(2)]  # one decodes on P1, the other on D0 (least loaded)
    responses = [cm.__enter__() for _, cm in opened]
    lines = [r.iter_lines() for r in responses]
    for it in lines:
        first_text(it)
    # D0's stream moves to P1 with its KV (issue 16): the drain no longer waits for it, so a second
    # switch can no longer be caught mid-drain here (tests/cluster/test_role_switch_pairs.py does).
    first = switch(srv, "D0", "P")
    assert first["migrated"] == 1 and roles_now(srv)["D0"] == ("P", "up")
    other = admin(srv, "POST", "/admin/instances/P1/roles", json={"roles": "P"})
    assert other.status_code == 409 and other.json()["error"]["code"] == "switch_refused"
    assert "no other live instance takes D while it drains" in other.json()["error"]["message"]

    for it, r in zip(lines, responses):
        assert [line for line in it if line][-1] == "data: [DONE]"
        r.close()
    for client, _ in opened:
        client.close()
    arrange(srv, {"D0": "D", "P1": "P"})


@pytest.mark.parametrize(
    ("method", "path", "body", "key", "status", "code"),
    [
        ("GET", "/admin/instances", None, None, 401, "invalid_api_key"),
        ("GET", "/admin/instances", None, "wrong", 401, "invalid_api_key"),
        ("POST", "/admin/instances/P1/roles", {"roles": "D"}, None, 401, "invalid_api_key"),
        ("POST", "/admin/instances/Q7/roles", {"roles": "D"}, KEY, 404, "instance_not_found"),
        ("POST", "/admin/instances/P1/roles", {"roles": "DX"}, KEY, 400, "invalid_roles"),
        ("POST", "/admin/instances/P1/roles", {"roles": ""}, KEY, 400, "invalid_roles"),
        ("POST", "/admin/instances/P1/roles", {"role": "D"}, KEY, 400, None),
        ("POST", "/admin/instances/P1/roles", {"roles": 3}, KEY, 400, None),
        ("POST", "/admin/instances/E0/roles", {"roles": "P"}, KEY, 409, "switch_refused"),
        ("POST", "/admin/instances/P0/roles", {"roles": "EP"}, KEY, 409, "switch_refused"),
        ("POST", "/admin/instances/D0/roles", {"roles": "P"}, KEY, 409, "switch_refused"),
    ],
)
def test_admin_answers(srv, method, path, body, key, status, code):
    arrange(srv, {"P1": "P", "D0": "D"})
    resp = admin(srv, method, path, key=key, json=body)
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert error["message"] and (code is None or error["code"] == code)
    assert roles_now(srv) == {"E0": ("E", "up"), "P0": ("P", "up"), "P1": ("P", "up"), "D0": ("D", "up")}


def test_without_an_api_key_admin_is_as_open_as_v1(model: str, tmp_path: Path):
    """The in-process engine (1EPD): one instance with every role, which cannot switch."""
    args = ["--model", model, "--layout", "1EPD", "--served-model-name", "m", "--num-kv-blocks", "256"]
    srv = ServerProcess(args, tmp_path / "open.log").start()
    try:
        assert httpx.get(srv.url + "/v1/models", timeout=10).status_code == 200
        listed = httpx.get(srv.url + "/admin/instances", timeout=10)
        assert listed.status_code == 200
        assert listed.json()["data"] == [{"id": "EPD0", "roles": "EPD", "device": "cpu", "state": "up"}]
        url = srv.url + "/admin/instances/EPD0/roles"
        refused = httpx.post(url, json={"roles": "PD"}, timeout=10)
        assert refused.status_code == 409 and "local connector" in refused.json()["error"]["message"]
        same = httpx.post(url, json={"roles": "DPE"}, timeout=10)
        assert same.status_code == 200 and same.json()["timings"]["total"] == 0
    finally:
        assert srv.stop() == 0, srv.log()[-3000:]

"""/metrics: valid Prometheus text whose counters move as requests are served."""

from __future__ import annotations

import os
import time

import httpx
from prometheus_client.parser import text_string_to_metric_families

from .conftest import MODEL_NAME
from .helpers import ServerProcess, image_message, metrics, wait_until_idle

INSTANCE_GAUGES = ("waiting_requests", "running_requests", "kv_cache_usage", "mm_cache_usage")
INSTANCE_COUNTERS = ("mm_cache_hits", "mm_cache_misses", "transfer_bytes", "transfer_seconds", "steps")


def families(url: str) -> dict[str, str]:
    text = httpx.get(url + "/metrics", timeout=10).text
    return {f.name: f.type for f in text_string_to_metric_families(text)}


def chat(server: ServerProcess, seed: int) -> dict:
    body = {"model": MODEL_NAME, "messages": image_message("hello", seed), "max_tokens": 4, "temperature": 0}
    resp = httpx.post(server.url + "/v1/chat/completions", json=body, headers=server.headers(), timeout=60)
    assert resp.status_code == 200, resp.text
    return resp.json()


def total(m: dict, name: str, **labels: str) -> float:
    """Sum of a sample over the series whose labels include `labels`."""
    return sum(v for k, v in m.get(name, {}).items() if set(labels.items()) <= set(k))


def test_metrics_parse_with_the_expected_families(server: ServerProcess):
    chat(server, seed=500)
    time.sleep(0.6)  # instance stats arrive every 250 ms
    kinds = families(server.url)
    for name in INSTANCE_GAUGES:
        assert kinds[f"epd_instance_{name}"] == "gauge"
    for name in INSTANCE_COUNTERS:
        assert kinds[f"epd_instance_{name}"] == "counter"
    assert kinds["epd_instance_up"] == "gauge"
    assert kinds["epd_http_requests"] == "counter"
    for name in ("time_to_first_token", "time_per_output_token", "e2e_request_latency", "request_stage"):
        assert kinds[f"epd_{name}_seconds"] == "histogram"
    up = metrics(server.url)["epd_instance_up"]
    assert up == {(("instance", name),): 1.0 for name in ("E0", "P0", "D0")}


def test_counters_move_as_requests_are_served(server: ServerProcess):
    before = wait_until_idle(server.url)
    out = chat(server, seed=501)  # a new image: encoded on E0, sent to P0, KV sent to D0
    chat(server, seed=501)  # the same image again: an MM cache hit
    after = wait_until_idle(server.url)

    def moved(name: str, **labels: str) -> float:
        return total(after, name, **labels) - total(before, name, **labels)

    assert moved("epd_http_requests_total", endpoint="/v1/chat/completions", status="200") == 2
    assert moved("epd_time_to_first_token_seconds_count") == 2
    assert moved("epd_e2e_request_latency_seconds_count") == 2
    assert moved("epd_request_stage_seconds_count", stage="encode") == 1
    assert moved("epd_request_stage_seconds_count", stage="kv_transfer") == 2
    assert moved("epd_prompt_tokens_total") == 2 * out["usage"]["prompt_tokens"]
    assert moved("epd_generation_tokens_total") == 2 * out["usage"]["completion_tokens"]
    assert moved("epd_instance_images_encoded_total", instance="E0") == 1
    assert moved("epd_instance_mm_cache_misses_total") >= 1
    assert moved("epd_instance_mm_cache_hits_total") >= 1
    assert moved("epd_instance_transfer_bytes_total", instance="E0") > 0  # embeddings to P0
    assert moved("epd_instance_transfer_bytes_total", instance="P0") > 0  # KV to D0
    assert moved("epd_instance_steps_total", instance="D0") >= 3


def test_cpu_by_thread_names_the_servers_threads_and_stays_within_the_process(server: ServerProcess):
    chat(server, seed=502)  # an image: the input pool has run
    by_thread = metrics(server.url)["epd_api_thread_cpu_seconds"]
    names = {dict(labels)["thread"]: seconds for labels, seconds in by_thread.items()}
    assert {"MainThread", "epd-engine", "epd-input-images"} <= set(names), names
    assert not [n for n in names if n[-1].isdigit()], names  # a pool is one series, not one per thread
    assert all(seconds >= 0 for seconds in names.values())
    fields = open(f"/proc/{server.proc.pid}/stat").read().rsplit(")", 1)[1].split()
    process_s = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    # Read before /proc: the threads' sum can only have grown since. Every thread counted once:
    # their sum is at most the process's (which also holds the threads that have ended).
    assert 0 < sum(names.values()) <= process_s + 1e-9

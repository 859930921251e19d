"""Gauges and counters an instance reports about itself, for /metrics and the planner.

One flat dict of floats per instance: cheap to send, easy to export. Counters are
cumulative since the instance started; gauges are the value now.
"""

from __future__ import annotations

from epd.engine.mm_cache import MMCache

# name -> help text; "_total" names are counters, the rest gauges.
STAT_HELP = {
    "waiting_requests": "requests queued for the instance's scheduler",
    "running_requests": "requests in the running batch",
    "last_batch_tokens": "tokens computed in the instance's last step",
    "kv_cache_usage": "share of KV blocks held by live requests",
    "kv_cache_blocks": "KV blocks this instance's cache holds (its capacity)",
    "mm_cache_usage": "share of MM cache blocks pinned by requests or transfers",
    "mm_cache_cached_usage": "share of MM cache blocks holding reusable embeddings",
    "encode_queue_images": "images waiting to be encoded",
    "prefix_cache_hit_tokens_total": "prompt tokens served from the prefix cache",
    "prefix_cache_query_tokens_total": "prompt tokens looked up in the prefix cache",
    "mm_cache_hits_total": "images found in the MM cache",
    "mm_cache_misses_total": "images not found in the MM cache",
    "images_encoded_total": "images encoded",
    "steps_total": "engine steps run",
    "overlapped_steps_total": "decode steps launched before the last one's tokens were read (async)",
    "step_seconds_total": "seconds spent in engine steps",
    "transfer_bytes_total": "bytes sent through the connector",
    "transfer_seconds_total": "seconds from send to completion, summed over transfers",
    "transfer_retries_total": "failed sends sent again on the same pair (--transfer-retries each at most)",
    "transfer_gave_up_total": "sends still failing after their last retry, reported to the router",
    "preemptions_total": "requests preempted for lack of KV blocks",
    "late_requests_total": "requests found unable to meet their TTFT deadline (best-effort or refused)",
    "rejected_late_total": "late requests refused (--reject-late: a 429)",
    "kv_parts_buffered": "streamed KV layers held on a decode instance until their request's hand-off",
    "kv_parts_received_total": "streamed KV layers received by a decode instance",
    "kv_handoffs_received_total": "KV hand-offs (and discard notices) received by a decode instance",
    "kv_handoffs_awaiting_layers": "KV hand-offs held on a decode instance until their retried layers arrive",
    "kv_late_requests_remembered": "requests whose late KV a decode instance will drop (aborted, discarded)",
    "kv_late_handoffs_dropped_total": "KV hand-offs dropped by a decode instance: their request was aborted",
    "kv_late_parts_dropped_total": "streamed KV layers dropped by a decode instance: no hand-off needs them",
    "requests_migrated_total": "running decodes sent with their KV to another decode instance (a switch)",
    # Kept by the router and the cluster, about an instance that died (epd.cluster.router.recovery):
    "requests_release_images_total": "requests whose images it was encoding when it died: encoded elsewhere",
    "requests_start_over_total": "requests without a token that started over on live instances",
    "requests_continue_total": "requests that went on from their tokens on live instances",
    "requests_fail_total": "requests failed when the instance died (no instance left, or attempts used)",
    "restarts_total": "times the instance was started again after it died",
}


def mm_cache_stats(cache: MMCache | None) -> dict[str, float]:
    if cache is None:
        return {}
    blocks = cache.num_blocks
    return {
        "mm_cache_usage": (cache.used_blocks - cache.evictable_blocks) / blocks,
        "mm_cache_cached_usage": cache.evictable_blocks / blocks,
        "mm_cache_hits_total": cache.hits,
        "mm_cache_misses_total": cache.misses,
    }

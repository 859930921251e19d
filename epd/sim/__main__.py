"""`python -m epd.sim --model DIR --layout 1E+1P+1D [--layout ...]`: run the harness, print JSON.

One line per layout: the event log's digest, a digest of every request's output tokens, and a few
figures. Tests run it in processes with different PYTHONHASHSEED to show that nothing in a run
depends on string hashing (the order sets of strings iterate in).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time

from epd.outputs import RequestOutput
from epd.sim.cluster import KV_BLOCKS, ClusterSpec, SimCluster, engine_config
from epd.sim.harness import SimResult, simulate
from epd.sim.workload import Workload, make_requests


def outputs_digest(outputs: dict[str, RequestOutput]) -> str:
    """A digest of every request's output tokens, by request id."""
    tokens = {rid: outputs[rid].outputs[0].token_ids for rid in sorted(outputs)}
    return hashlib.sha256(json.dumps(tokens).encode()).hexdigest()


def summary(layout: str, result: SimResult, wall_s: float) -> dict:
    return {
        "layout": layout,
        "digest": result.log.digest(),
        "outputs_digest": outputs_digest(result.outputs),
        "finished": len(result.outputs),
        "log_entries": len(result.log),
        "virtual_s": result.end_time,
        "leftovers": result.leftovers,
        "wall_s": round(wall_s, 3),
        "string_hash": hash("epd"),  # differs between processes unless PYTHONHASHSEED is fixed
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="checkpoint directory (config, tokenizer, processor)")
    parser.add_argument("--layout", action="append", required=True)
    parser.add_argument("--requests", type=int, default=Workload.num_requests)
    parser.add_argument("--seed", type=int, default=Workload.seed)
    parser.add_argument("--rate", type=float, default=Workload.rate_per_s, help="arrivals per second")
    parser.add_argument("--image-pool", type=int, default=Workload.image_pool)
    parser.add_argument("--kv-blocks", type=int, default=KV_BLOCKS, help="KV blocks per engine")
    parser.add_argument("--mm-cache-bytes", type=int, default=ClusterSpec.mm_cache_bytes)
    args = parser.parse_args()
    engine = engine_config(args.model, num_kv_blocks=args.kv_blocks)
    workload = Workload(args.requests, args.rate, args.seed, args.image_pool)
    requests = make_requests(workload, engine.model)
    for layout in args.layout:
        started = time.perf_counter()
        spec = ClusterSpec(layout, engine, mm_cache_bytes=args.mm_cache_bytes)
        result = simulate(SimCluster(spec), requests)
        print(json.dumps(summary(layout, result, time.perf_counter() - started)), flush=True)


if __name__ == "__main__":
    main()

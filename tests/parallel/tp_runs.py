"""What the tensor-parallel tests run on each rank (spawned processes import it by name)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch

from epd.cluster.kv_handoff import KVParts, KVSender
from epd.engine.cuda_graphs import DecodeGraphs
from epd.engine.llm_engine import LLMEngine
from epd.entrypoints.options import EngineArgs
from epd.inputs.processor import InputProcessor
from epd.parallel.group import TensorParallelGroup, is_parallel
from epd.parallel.parts import instance_parts, rank_model_parts
from epd.parallel.worker import build_worker
from epd.sampling_params import SamplingParams
from epd.transfer.base import create_connector

# (token ids, {token: logprob} per position) of each request, by request id.
Generated = dict[str, tuple[list[int], list[dict[int, float]]]]


@dataclass
class RankRun:
    generated: Generated
    kv_cache_shape: tuple[int, ...]  # [layers, 2, blocks, block_size, kv heads, head size]


def generate(group: TensorParallelGroup | None, model_dir: str, prompts: list, max_tokens: int) -> RankRun:
    """Greedy generation of `prompts` (batched) by one engine on this rank (or on one device when
    `group` is None), through the engine's scheduler, runner and sampler."""
    torch.set_num_threads(1)  # the ranks share two cores
    processor = InputProcessor.from_pretrained(model_dir)
    config = EngineArgs(model=model_dir, block_size=4, num_kv_blocks=64).engine_config()
    engine = LLMEngine(config, processor.tokenizer, model_parts=rank_model_parts(group))
    params = SamplingParams(temperature=0, max_tokens=max_tokens, logprobs=3, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), processor.process_prompt(prompt), params)
    done: Generated = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                got = out.outputs[0]
                logprobs = [{t: lp.logprob for t, lp in pos.items()} for pos in got.logprobs]
                done[out.request_id] = (got.token_ids, logprobs)
    return RankRun(done, tuple(engine.runner.kv_cache.shape))


@dataclass
class HandoffRun:
    """What an engine handed off after prefilling each prompt, and what it decoded from KV handed
    to it: per request id, (first token, the KV of every kv head [layers, 2, tokens, heads, d])
    and (tokens, logprobs) of the continuation."""

    handed_off: dict[str, tuple[int, torch.Tensor]]
    continued: Generated
    commands_run: list[int]  # per worker: the commands it ran (its rank 0 drove it)


def hand_off_and_continue(
    group: TensorParallelGroup | None, model_dir: str, prompts: list, max_tokens: int, given: dict | None
) -> HandoffRun | None:
    """One instance, rank 0's engine over its workers (on one device when `group` is None):
    prefill each prompt and hand its KV off (gathered from every rank); then, rewired to decode,
    continue each prompt from the KV in `given` (a hand-off made elsewhere, scattered to the
    ranks by kv heads; default: its own)."""
    torch.set_num_threads(1)  # the ranks share two cores
    if is_parallel(group) and group.rank > 0:
        worker = build_worker(group, "cpu")
        worker.serve()
        return HandoffRun({}, {}, [worker.commands_run])
    processor = InputProcessor.from_pretrained(model_dir)
    # No prefix cache: the continuation's KV must come from the hand-off, not from the first pass.
    args = EngineArgs(model=model_dir, block_size=4, num_kv_blocks=64, enable_prefix_caching=False)
    handed: dict[str, tuple[int, torch.Tensor]] = {}
    engine = LLMEngine(
        args.engine_config(),
        processor.tokenizer,
        model_parts=instance_parts(group),
        handoff=lambda req, kv: handed.__setitem__(req.request_id, (req.output_token_ids[-1], kv.clone())),
    )
    params = SamplingParams(temperature=0, max_tokens=max_tokens, logprobs=3, ignore_eos=True)
    processed = [processor.process_prompt(p) for p in prompts]
    for i, prompt in enumerate(processed):
        engine.add_request(str(i), prompt, params)
    _drain(engine)
    engine.rewire(None, None, None)  # decodes from now on
    for rid, (first_token, kv) in (given or handed).items():
        engine.add_handoff(rid, processed[int(rid)], params, first_token, None, kv)
    continued = _drain(engine)
    if is_parallel(group):
        engine.runner.stop_workers()
    return HandoffRun(handed, continued, [])


@dataclass
class RankSendsRun:
    """What a decode side received from a P whose ranks send their own heads: per request id, the
    KV assembled from the pieces; and the sends that failed (their keys), as rank 0 heard."""

    assembled: dict[str, torch.Tensor]
    parts_received: int
    failed: list[str]


def hand_off_by_ranks(
    group: TensorParallelGroup, model_dir: str, prompts: list, kv_streaming: str, dead_request: str
) -> RankSendsRun | None:
    """A P instance of `group`'s degree whose ranks each send their heads of every hand-off
    (`sends_by_rank`) over shm connectors of their own, to a decode side played by rank 0's
    receiving connector; `dead_request` is routed to an address nobody listens at (its sends fail,
    and rank 0 must hear of its workers' failures too)."""
    torch.set_num_threads(1)  # the ranks share two cores
    if group.rank > 0:
        worker = build_worker(group, "cpu", create_connector("shm", retries=0, send_timeout_s=1.0))
        worker.serve()
        return None
    receiver = create_connector("shm", retries=0)
    nobody = create_connector("shm", retries=0)
    dead_address = nobody.address
    nobody.close()
    sender = KVSender(create_connector("shm", retries=0, send_timeout_s=1.0))
    processor = InputProcessor.from_pretrained(model_dir)
    args = EngineArgs(model=model_dir, block_size=4, num_kv_blocks=64, enable_prefix_caching=False)
    streams = kv_streaming == "layer"
    engine = LLMEngine(
        args.engine_config(),
        processor.tokenizer,
        model_parts=instance_parts(group, sends_by_rank=True),
        handoff=sender.handoff,
        layer_sink=sender if streams else None,
    )
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        rid = str(i)
        sender.route(rid, dead_address if rid == dead_request else receiver.address)
        engine.add_request(rid, processor.process_prompt(prompt), params)
    _drain(engine)
    live = len(prompts) - 1
    parts, handoffs, failed, results = KVParts(), {}, [], 0
    expected_results = _sends_per_handoff(engine, streams) * len(prompts)
    while len(handoffs) < live or results < expected_results:  # every send reports, failed or not
        for received in receiver.poll_received():
            if received.key.startswith("kvl:"):
                parts.add(received)
            else:
                handoffs[received.meta["request_id"]] = received
        for result in [*sender.connector.poll_sent(), *engine.runner.poll_worker_sends()]:
            results += 1
            if not result.ok:
                failed.append(result.key)
    engine.runner.stop_workers()
    received_total = parts.received_total
    assembled = {rid: parts.complete(handoff) for rid, handoff in handoffs.items()}
    sender.connector.close()
    receiver.close()
    return RankSendsRun(assembled, received_total, failed)


def _sends_per_handoff(engine: LLMEngine, streams: bool) -> int:
    """The messages a hand-off takes: one part per kv piece (per layer when streaming) and the
    `kv:` message."""
    pieces = engine.runner.heads.kv_pieces
    layers = engine.runner.local.kv_cache.shape[0] if streams else 1
    return layers * pieces + 1


@dataclass
class DecodeRun:
    """What an instance decoded, batch by batch, and the decode graphs each rank replayed."""

    generated: dict[int, Generated]  # by batch size: its requests' tokens and logprobs
    replays: Counter  # this rank's graph replays by padded batch size (empty: eager steps only)


def decode_in_batches(
    group: TensorParallelGroup | None, model_dir: str, cuda_graphs: bool, batches: list[int], max_tokens: int
) -> DecodeRun:
    """One instance on cuda:rank (rank 0's engine over its workers; one GPU when `group` is None or
    of one), greedy, fp32: for each size in `batches`, that many prompts prefilled, then decoded
    together. Each rank counts the graphs it replays (the workers theirs, rank 0 its own)."""
    device = f"cuda:{group.rank if group else 0}"
    if is_parallel(group) and group.rank > 0:
        worker = build_worker(group, device)
        replays = count_replays(worker.runner.graphs)
        worker.serve()
        return DecodeRun({}, replays)
    processor = InputProcessor.from_pretrained(model_dir)
    args = EngineArgs(model=model_dir, device=device, attention_backend="auto", cuda_graphs=cuda_graphs)
    engine = LLMEngine(args.engine_config(), processor.tokenizer, model_parts=instance_parts(group))
    replays = count_replays(engine.runner.graphs)
    params = SamplingParams(temperature=0, max_tokens=max_tokens, logprobs=3, ignore_eos=True)
    generated = {}
    for size in batches:
        for i in range(size):  # prompts of different lengths: sequences at different positions
            prompt = {"prompt_token_ids": list(range(10 + 7 * i, 15 + 10 * i))}
            engine.add_request(f"{size}-{i}", processor.process_prompt(prompt), params)
        generated[size] = _drain(engine)
    if is_parallel(group):
        engine.runner.stop_workers()
    return DecodeRun(generated, replays)


def count_replays(graphs: DecodeGraphs | None) -> Counter:
    """A counter of `graphs`' steps by padded size, kept up to date as they run (empty: no graphs)."""
    counts: Counter = Counter()
    if graphs is None:
        return counts
    run = graphs.run

    def counted(token_ids: list[int], *args: object) -> torch.Tensor:
        counts[graphs.padded_size(len(token_ids))] += 1
        return run(token_ids, *args)

    graphs.run = counted
    return counts


def _drain(engine: LLMEngine) -> Generated:
    done: Generated = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                got = out.outputs[0]
                logprobs = [{t: lp.logprob for t, lp in pos.items()} for pos in got.logprobs if pos]
                done[out.request_id] = (got.token_ids, logprobs)
    return done


def collectives(group: TensorParallelGroup) -> dict[str, object]:
    """Each collective's result on this rank."""
    rank = group.rank
    summed = group.all_reduce(torch.tensor([1.0, 2.0]) * (rank + 1))
    smallest = group.all_reduce(torch.tensor([10 - rank]), op="min")
    gathered = group.all_gather(torch.full((2, 1), float(rank)), dim=1)
    announced = group.broadcast_object({"step": 7} if rank == 0 else None)
    return {"sum": summed, "min": smallest, "gather": gathered, "broadcast": announced}


def fail_on_rank_one(group: TensorParallelGroup) -> int:
    """Rank 1 raises; rank 0 then waits in a collective rank 1 never joins."""
    if group.rank == 1:
        raise ValueError("rank one gives up")
    group.all_reduce(torch.zeros(1))
    return 0

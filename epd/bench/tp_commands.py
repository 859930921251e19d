"""What sending one command costs rank 0 of a tensor-parallel instance, old path vs new, one run.

    python -m epd.bench.tp_commands [--ranks 2] [--repeats 300] [--gap-ms 0.5] [--spin-ms 50]

old: gloo `broadcast_object_list` over the group's side group (`TensorParallelGroup.broadcast_object`,
what carried commands first); new: the command channel (`send_command` / `receive_command`, a
shared-memory ring, epd.parallel.channel). Each command is a `RunStep` as the runner sends it:
decode at batch 1 and 64 (a 1k-token context each), and an 8k-token prefill with image rows
(M-RoPE positions and the rows' index as tensors, the rows' shape and dtype).

Per command and path: `send`, how long rank 0 is held in the call (what the step pays before its
own forward starts), and `delivered`, from rank 0's call to the last worker holding the command
object (what the first all-reduce waits for, if rank 0 gets there sooner). Times are
`time.perf_counter`, CLOCK_MONOTONIC, the same clock in every process of a host. Before each
command the ranks meet at a barrier and rank 0 then works `--gap-ms` (busy) before sending, as it
samples and schedules between steps: the workers wait meanwhile, as they do between steps; a gap
longer than `--spin-ms` shows the ring's sleeping path (a wake-up through the doorbell).
Collectives carry no data here (gloo, CPU): the command path is the same whatever the backend.
"""

from __future__ import annotations

import argparse
import pickle
import statistics
import time

import torch
from torch import distributed as dist

from epd.engine.model_runner import StepInputs
from epd.parallel.channel import dumps
from epd.parallel.commands import RunStep
from epd.parallel.group import TensorParallelGroup
from epd.parallel.launch import run_on_ranks

PATHS = ("gloo", "ring")
BLOCK_SIZE = 16


def decode_step(batch: int, context: int = 1024) -> RunStep:
    """A pure decode step of `batch` requests of `context` tokens each (block tables included)."""
    blocks = context // BLOCK_SIZE + 1
    tables = [list(range(i * blocks, (i + 1) * blocks)) for i in range(batch)]
    step = StepInputs(
        token_ids=[1000 + i for i in range(batch)],
        slots=[table[-1] * BLOCK_SIZE for table in tables],
        query_starts=list(range(batch)),
        query_lens=[1] * batch,
        seq_lens=[context + 1] * batch,
        block_tables=tables,
        decode_positions=[context + 7] * batch,
    )
    return RunStep(step, None, None, False)


def prefill_step(tokens: int = 8192, image_rows: int = 6400, hidden: int = 3584) -> RunStep:
    """One request's prefill of `tokens`, `image_rows` of them image rows (which follow as a tensor)."""
    step = StepInputs(
        token_ids=[(7 * i) % 150000 for i in range(tokens)],
        slots=list(range(tokens)),
        query_starts=[0],
        query_lens=[tokens],
        seq_lens=[tokens],
        block_tables=[list(range(-(-tokens // BLOCK_SIZE)))],
        positions=torch.arange(3 * tokens).view(3, tokens),
        mm_index=torch.arange(image_rows) + 64,
    )
    return RunStep(step, (image_rows, hidden), torch.bfloat16, False)


def typical_commands() -> dict[str, RunStep]:
    return {"decode b1": decode_step(1), "decode b64": decode_step(64), "prefill 8k": prefill_step()}


def measure(group: TensorParallelGroup, repeats: int, gap_s: float, spin_s: float) -> dict:
    """On every rank: per (command, path), rank 0's (start, end) of each send; a worker's arrival
    time of each."""
    if group.rank > 0:
        group.channel.reader.spin_s = spin_s
    times: dict = {}
    for name, command in typical_commands().items():
        for path in PATHS:
            times[name, path] = [_one(group, command, path, gap_s) for _ in range(repeats)]
    return times


def _one(group: TensorParallelGroup, command: RunStep, path: str, gap_s: float) -> tuple[float, ...]:
    dist.barrier(group=group.commands)
    if group.rank == 0:
        _busy(gap_s)
        start = time.perf_counter()
        group.broadcast_object(command) if path == "gloo" else group.send_command(command)
        return start, time.perf_counter()
    got = group.broadcast_object() if path == "gloo" else group.receive_command()
    arrived = time.perf_counter()
    if got.step.token_ids[-1] != command.step.token_ids[-1]:
        raise AssertionError(f"rank {group.rank}: {path} delivered another command")
    return (arrived,)


def _busy(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def report(results: list[dict], repeats: int) -> str:
    skip = min(10, repeats // 10)  # warm-up
    lines = [
        f"{'command':<12}{'bytes old/new':>16} | {'path':<5}{'send med':>10}{'p90':>9}"
        f"{'delivered med':>15}{'p90':>9}  (us)"
    ]
    commands = typical_commands()
    for name, command in commands.items():
        size = f"{len(pickle.dumps(command))}/{len(dumps(command))}"
        for path in PATHS:
            sends = results[0][name, path][skip:]
            send = [(end - start) * 1e6 for start, end in sends]
            delivered = [
                (max(worker[name, path][skip + i][0] for worker in results[1:]) - start) * 1e6
                for i, (start, _) in enumerate(sends)
            ]
            lines.append(
                f"{name:<12}{size:>16} | {path:<5}{_median(send):>10.1f}{_p90(send):>9.1f}"
                f"{_median(delivered):>15.1f}{_p90(delivered):>9.1f}"
            )
    return "\n".join(lines)


def _median(xs: list[float]) -> float:
    return statistics.median(xs)


def _p90(xs: list[float]) -> float:
    return sorted(xs)[int(0.9 * (len(xs) - 1))]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ranks", type=int, default=2, help="rank 0 and ranks-1 workers")
    parser.add_argument("--repeats", type=int, default=300, help="sends per command and path")
    parser.add_argument("--gap-ms", type=float, default=0.5, help="rank 0's work before each send")
    parser.add_argument(
        "--spin-ms", type=float, default=50.0, help="how long a worker spins before it sleeps"
    )
    args = parser.parse_args()
    results = run_on_ranks(
        measure, args.ranks, args.repeats, args.gap_ms / 1e3, args.spin_ms / 1e3, backend="gloo"
    )
    print(f"{args.ranks} ranks, {args.repeats} sends each, gap {args.gap_ms} ms, spin {args.spin_ms} ms")
    print(report(results, args.repeats))


if __name__ == "__main__":
    main()

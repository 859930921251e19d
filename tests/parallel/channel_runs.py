"""What the command-channel tests run on each rank (spawned processes import it by name), and a
harness that starts ranks whose deaths the test itself watches (`start_ranks`: `run_on_ranks`
would end the other ranks as soon as one dies, which is what these tests look at)."""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
import random
import signal
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path

import torch

from epd.bench.tp_commands import decode_step, prefill_step
from epd.parallel.channel import ChannelClosed, dumps, open_channel
from epd.parallel.group import TensorParallelGroup
from epd.parallel.ring import RingLayout

SMALL = RingLayout(readers=2, slots=4, slot_bytes=256)  # wraps and splits messages often
MESSAGES = 400


def message(i: int) -> bytes:
    """The i-th test message: 0 bytes up to a few slots of `SMALL`, every byte value."""
    size = random.Random(i).choice([0, 1, 255, 256, 257, 700, 1024, 3000])
    return random.Random(1000 + i).randbytes(size)


def many_messages(group: TensorParallelGroup) -> list[str]:
    """Rank 0 sends `MESSAGES` messages through a small ring; every rank returns their digests in
    the order it sent or received them. Rank 1 spins between messages, rank 2 sleeps at once
    (its doorbell wakes it): both paths."""
    spin = 0.05 if group.rank == 1 else 0.0
    channel = open_channel(group.rank, group.world_size, group.broadcast_object, spin, SMALL)
    digests = []
    for i in range(MESSAGES):
        if group.rank == 0:
            channel.send(message(i))
            got = message(i)
        else:
            got = channel.receive()
        digests.append(hashlib.sha256(got).hexdigest())
    channel.close()
    return digests


def typical_commands(group: TensorParallelGroup) -> list[bytes]:
    """The runner's typical commands through the group's channel; what each rank sent or got,
    pickled again (tensors returned as such would travel back through torch's fd sharing, which
    races with the rank's exit)."""
    commands = [decode_step(1), prefill_step(tokens=8192, image_rows=6400), decode_step(64), odd_tensors()]
    if group.rank == 0:
        for command in commands:
            group.send_command(command)
    else:
        commands = [group.receive_command() for _ in commands]
    return [dumps(command) for command in commands]


def odd_tensors() -> dict[str, torch.Tensor]:
    return {
        "bf16": torch.linspace(-3, 3, 10).to(torch.bfloat16).view(2, 5),
        "empty": torch.empty(0, 4, dtype=torch.int32),
        "bool": torch.tensor([True, False, True]),
        "strided": torch.arange(12).view(3, 4).t(),
        "scalar": torch.tensor(2.5),
    }


# ---- ranks that die: started by `start_ranks`, each reporting through `report` -------------------


def rank_zero_dies(group: TensorParallelGroup, report: Connection) -> None:
    """Rank 0 sends three commands and then is killed (no clean-up, as by the OOM killer)."""
    for i in range(3):
        group.send_command({"i": i})
    report.send("sent")
    os.kill(os.getpid(), signal.SIGKILL)


def worker_until_closed(group: TensorParallelGroup, report: Connection) -> None:
    """A worker that receives until the channel says rank 0 is gone, and reports what it got."""
    got = []
    try:
        while True:
            got.append(group.receive_command())
    except ChannelClosed:
        report.send(("closed", got))


def rank_zero_outlives_worker(group: TensorParallelGroup, report: Connection) -> None:
    """Rank 0 tells its worker to die, then keeps sending: its sends must fail, not hang."""
    group.send_command("die")
    sent = 0
    try:
        while sent < 10_000:
            group.send_command({"after": sent})
            sent += 1
    except ChannelClosed as error:
        report.send(("closed", str(error)))
        return
    report.send(("never closed", sent))


def worker_that_dies(group: TensorParallelGroup, report: Connection) -> None:
    assert group.receive_command() == "die"
    report.send("dying")
    os._exit(3)


RankMain = Callable[[TensorParallelGroup, Connection], None]


def start_ranks(mains: list[RankMain], store_dir: Path) -> list[tuple[mp.process.BaseProcess, Connection]]:
    """Rank r runs `mains[r](group, report)`, its group joined over gloo; (process, the other end
    of its `report`) per rank."""
    spawn = mp.get_context("spawn")
    init_method = (store_dir / "store").as_uri()
    started = []
    for rank, main in enumerate(mains):
        receive, send = spawn.Pipe(duplex=False)
        args = (main, rank, len(mains), init_method, send)
        process = spawn.Process(target=_rank_main, args=args, daemon=True)
        process.start()
        send.close()
        started.append((process, receive))
    return started


def _rank_main(main: RankMain, rank: int, world_size: int, init_method: str, report: Connection) -> None:
    torch.set_num_threads(1)
    group = TensorParallelGroup.join(init_method, rank, world_size, "gloo")
    main(group, report)
    os._exit(0)  # not `leave`: a peer may be dead, and the test only reads the reports

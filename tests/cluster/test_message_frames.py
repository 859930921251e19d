"""Encode tasks as multipart frames (epd.cluster.messages.encode_frames): image files and patches
travel as frames of their own, not copied into the msgpack, and come back whole, over a real ZMQ
PUSH/PULL pair as the router's plane sends them and an instance's inbox reads them."""

from __future__ import annotations

import os

import pytest
import zmq

from epd.cluster.messages import (
    AbortRequest,
    EncodeItem,
    EncodeTask,
    decode_for_instance,
    encode,
    encode_frames,
)
from epd.cluster.router.control_plane import ZmqControlPlane


def _task() -> tuple[EncodeTask, list[bytes]]:
    files = [os.urandom(300_000), os.urandom(200_000)]
    items = [
        EncodeItem(0, "k0", (1, 4, 4), b"", 1176, file=files[0]),
        EncodeItem(1, "k1", (1, 4, 4), os.urandom(70_000), 1176),  # patches made already, no file
        EncodeItem(2, "k2", (1, 4, 4), b"", 1176, file=files[1]),
    ]
    return EncodeTask("r", items, "tcp://127.0.0.1:1"), files


def test_files_and_patches_are_frames_of_their_own_not_copies_in_the_message():
    task, files = _task()
    frames = encode_frames(task)
    assert len(frames) == 4 and len(frames[0]) < 4096
    # The very objects: nothing copied them on the way into the frames.
    assert frames[1] is files[0] and frames[2] is task.items[1].pixels and frames[3] is files[1]
    assert decode_for_instance(frames) == decode_for_instance(encode(task)) == task


def test_a_message_without_files_is_one_frame():
    assert encode_frames(AbortRequest("r")) == [encode(AbortRequest("r"))]
    assert decode_for_instance(encode_frames(AbortRequest("r"))) == AbortRequest("r")


def test_a_frame_named_past_the_message_is_refused():
    task, _ = _task()
    with pytest.raises(ValueError, match="names frame 3 of a message of 3"):
        decode_for_instance(encode_frames(task)[:3])


def test_the_router_plane_sends_frames_that_an_instance_inbox_reads_whole():
    ctx = zmq.Context()
    inbox, router_inbox = ctx.socket(zmq.PULL), ctx.socket(zmq.PULL)
    port = inbox.bind_to_random_port("tcp://127.0.0.1")
    router_inbox.bind_to_random_port("tcp://127.0.0.1")
    plane = ZmqControlPlane(ctx, router_inbox, {"E0": f"tcp://127.0.0.1:{port}"})
    try:
        task, _ = _task()
        plane.send("E0", task)
        plane.send("E0", AbortRequest("r"))
        assert inbox.poll(30_000)
        assert decode_for_instance(inbox.recv_multipart()) == task
        assert inbox.poll(30_000)
        assert decode_for_instance(inbox.recv_multipart()) == AbortRequest("r")
    finally:
        plane.close()
        for sock in (inbox, router_inbox, *plane._outboxes.values()):
            sock.close(linger=0)
        ctx.term()

"""Transfers between instances: one Connector interface (base.py), backends by name.

conn = create_connector("tcp", device="cpu")      # or "local", "shm", "cuda_ipc", "nccl" (GPUs),
                                                  # "gloo" (nccl's logic on CPUs), "auto" (per pair)
conn.send(peer_address, "mm:<hash>", {"embeds": t}, meta={"request_id": rid})
for result in conn.poll_sent(): ...                # producer side
for item in conn.poll_received(): ...              # consumer side; wait on conn.pollables()
"""

from epd.transfer.base import (
    Connector,
    ConnectorClosedError,
    Received,
    SendResult,
    available_connectors,
    create_connector,
    register_connector,
)

__all__ = [
    "Connector",
    "ConnectorClosedError",
    "Received",
    "SendResult",
    "available_connectors",
    "create_connector",
    "register_connector",
]

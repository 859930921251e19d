"""What one instance is started with (frozen: roles changed at run time live in the core, not here)."""

from __future__ import annotations

from dataclasses import dataclass

from epd.cluster.heartbeat import HEARTBEAT_TIMEOUT_S
from epd.cluster.layout import InstanceSpec, Role
from epd.config import EngineConfig
from epd.transfer.base import DEFAULT_RETRIES
from epd.transfer.cuda_ipc import DEFAULT_STAGING_BYTES

TRANSFER_TIMEOUT_S = 30.0  # what one attempt of a send waits for its receiver (the backends' default)


@dataclass(frozen=True)
class InstanceConfig:
    spec: InstanceSpec
    engine: EngineConfig
    router_address: str
    transfer: str = "shm"
    host: str = "127.0.0.1"  # this instance's own interface (its launcher's choice): binds, advertises
    # The router's directory of Unix sockets (epd.cluster.local_sockets): where this process sees
    # it, the instance talks to the router through it instead of TCP.
    socket_dir: str | None = None
    # The API process's shared image files (epd.cluster.shared_files), their path and token: mapped
    # where this process can.
    shared_files: tuple[str, bytes] | None = None
    mm_cache_bytes: int = 256 << 20
    mm_block_size: int = 16
    max_encode_batch_patches: int = 49152  # four 1344 px images (9216 patches each) in one batch
    num_threads: int = 1
    kv_streaming: str = "request"  # "layer": P sends each layer's KV as prefill writes it (see cluster)
    # A failed send goes out again this often on the same pair before the router hears of it
    # (epd.transfer.retry); each attempt waits this long for its receiver.
    transfer_retries: int = DEFAULT_RETRIES
    transfer_timeout_s: float = TRANSFER_TIMEOUT_S
    # What a cuda_ipc sender keeps of its GPU's memory to stage sends until they are copied.
    transfer_staging_bytes: int = DEFAULT_STAGING_BYTES
    # Exits when nothing came from the router for this long (epd.cluster.heartbeat).
    heartbeat_timeout_s: float = HEARTBEAT_TIMEOUT_S
    # Both parts of the model (vision tower, language model) stay in host memory (pinned on a GPU
    # host) from the start, so that E can be added or dropped at run time by a host-to-device copy
    # (epd.cluster.instance.host_weights); costs the host memory of the whole model.
    switchable_roles: bool = False
    # Where the ranks of a tensor-parallel instance (`spec.degree` > 1) meet: set by the launcher
    # that starts its workers (epd.cluster.launcher), None at degree 1.
    tp_init_method: str | None = None

    @property
    def name(self) -> str:
        """The instance's id: its name at start ("P0"), kept when its roles change later."""
        return self.spec.name

    @property
    def hands_off_kv(self) -> bool:
        """Whether the instance sends KV to decode instances: it prefills and decodes nothing itself
        (its ranks then send their own heads of each hand-off, epd.parallel.kv)."""
        return self.has(Role.PREFILL) and not self.has(Role.DECODE)

    def has(self, role: Role) -> bool:
        """Whether the instance was *started* with `role` (its roles now: `InstanceCore.roles`)."""
        return role in self.spec.roles

"""Moving a request's KV from the prefill instance (P) to its decode instance (D).

What P sends for one request, over one connector pair (FIFO, so D sees it in this order):

| kv_streaming | during the prefill forward       | after the first token was sampled                     |
|--------------|----------------------------------|-------------------------------------------------------|
| request      | -                                | kv:<rid> {kv}, request meta                           |
| layer        | kvl:<rid>:<i> {kv: layer i KV},  | D continues the request:                              |
|              |   i = 0 .. L-1, as each layer    |   kv:<rid> {generator_state?}, request meta plus      |
|              |   finishes                       |   streamed_layers = L                                 |
|              |                                  | it ended at its first token (EOS, stop, length):      |
|              |                                  |   kv:<rid> {}, meta {request_id, discard: True,       |
|              |                                  |   streamed_layers}                                    |

D holds the layer parts until the `kv:` message says what to do with them, so every part is
either assembled into a request's KV or dropped: P sends the `kv:` message after its parts
(both within one engine step), and an abort on D drops what has arrived so far. A part whose send
failed is sent again (epd.transfer.retry) and may then arrive after the `kv:` message: D holds
that message until its last part is in (`LayerParts.missing`). If the part never comes, P reports
the failure and the router aborts the request on D, which drops the held message with its parts.

An abort travels router -> D on the control socket, the KV P -> D through the connector: nothing
orders the two, so an abort can reach D before the KV P had already sent (the client hung up at the
first token). D remembers such requests (`DroppedKV`) and drops what arrives for them later,
instead of decoding for nobody. The same memory drops the layers still due behind a `kv:` message
that did not need them (the request was aborted while its message waited for them, or P discarded
it): a retried part can arrive after that, and nothing would claim it.

No generator state travels: a seeded request's draws depend only on its seed and how many tokens
it has (epd.engine.sampler.draw_seed), which the meta carries.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import msgspec
import torch

from epd.engine.request import Request
from epd.transfer.base import Connector, Received

KV_KEY, LAYER_KEY = "kv:", "kvl:"
# Requests whose late KV D remembers at most (an id and a few layer numbers each); see DroppedKV.
MAX_DROPPED_REMEMBERED = 4096


class KVSender:
    """P side: sends each request's KV to the decode instance the router chose for it.

    `handoff` is the engine's hand-off callback; `send_layer` and `discard` make this a
    `epd.engine.layer_stream.LayerSink` for layer-wise streaming.
    """

    def __init__(self, connector: Connector) -> None:
        self.connector = connector
        self.dest: dict[str, str] = {}  # request id -> its decode instance's data address
        self.layers_sent: dict[str, int] = {}  # request id -> layers streamed so far

    def route(self, request_id: str, dest: str) -> None:
        self.dest[request_id] = dest

    def forget(self, request_id: str) -> None:
        """The request ends on this instance without a hand-off (finished or aborted)."""
        self.dest.pop(request_id, None)
        self.layers_sent.pop(request_id, None)

    def handoff(self, request: Request, kv: torch.Tensor | None) -> None:
        """The final message: the whole KV, or (kv None) the count of the layers streamed before."""
        rid = request.request_id
        tensors = {} if kv is None else {"kv": kv}
        meta = handoff_meta(request)
        if kv is None:
            meta["streamed_layers"] = self.layers_sent.pop(rid)
        self.connector.send(self.dest.pop(rid), f"{KV_KEY}{rid}", tensors, meta)

    def send_layer(self, request: Request, layer: int, kv: torch.Tensor) -> None:
        rid = request.request_id
        meta = {"request_id": rid, "layer": layer}
        self.connector.send(self.dest[rid], f"{LAYER_KEY}{rid}:{layer}", {"kv": kv}, meta)
        self.layers_sent[rid] = self.layers_sent.get(rid, 0) + 1

    def discard(self, request: Request) -> None:
        rid = request.request_id
        # The count lets D drop the parts still due (a retried one may come after this notice).
        meta = {"request_id": rid, "discard": True, "streamed_layers": self.layers_sent.pop(rid, 0)}
        self.connector.send(self.dest.pop(rid), f"{KV_KEY}{rid}", {}, meta)


def handoff_meta(request: Request) -> dict[str, Any]:
    """Everything D needs to continue the request, besides its KV and generator state."""
    # The token P sampled is the last output; any before it came from an earlier attempt.
    first_logprobs = request.output_logprobs[-1] if request.output_logprobs else None
    return {
        "request_id": request.request_id,
        "prompt": request.prompt.prompt,
        "prompt_token_ids": request.prompt_token_ids,
        "placeholders": [(p.offset, p.length) for p in request.prompt.placeholders],
        "image_hashes": [img.content_hash for img in request.prompt.images],
        "grids": [img.grid_thw for img in request.prompt.images],
        "time_intervals": [img.time_interval for img in request.prompt.images],
        "params": msgspec.to_builtins(request.params),
        "first_token": request.output_token_ids[-1],
        "earlier_token_ids": request.output_token_ids[:-1],
        "first_logprobs": msgspec.to_builtins(first_logprobs),
        "arrival_time": request.arrival_time,
    }


def request_of_key(key: str) -> str | None:
    """The request a KV transfer key belongs to ("kv:<rid>", "kvl:<rid>:<layer>"); None for others."""
    if key.startswith(KV_KEY):
        return key[len(KV_KEY) :]
    if key.startswith(LAYER_KEY):
        return key[len(LAYER_KEY) :].rpartition(":")[0]
    return None


class LayerParts:
    """D side: streamed layers, held per request until its `kv:` message completes or drops them."""

    def __init__(self) -> None:
        self.parts: dict[str, dict[int, torch.Tensor]] = {}  # request id -> layer -> [2, tokens, ...]
        self.received_total = 0

    def add(self, received: Received) -> None:
        """A `kvl:` message: one layer of one request's KV."""
        meta = received.meta
        self.parts.setdefault(meta["request_id"], {})[meta["layer"]] = received.tensors["kv"]
        self.received_total += 1

    def missing(self, received: Received) -> list[int]:
        """The streamed layers a `kv:` message stands for that have not arrived (yet)."""
        meta = received.meta
        if meta.get("discard") or "streamed_layers" not in meta:
            return []
        parts = self.parts.get(meta["request_id"], {})
        return [i for i in range(meta["streamed_layers"]) if i not in parts]

    def complete(self, received: Received) -> torch.Tensor:
        """The full KV [layers, 2, tokens, kv_heads, head_dim] a `kv:` hand-off (not a discard notice)
        stands for: sent whole, or stacked from the streamed layers. ValueError if layers are missing.
        Either way the request's parts are freed."""
        meta = received.meta
        parts = self.parts.pop(meta["request_id"], {})
        if "streamed_layers" not in meta:
            return received.tensors["kv"]
        num_layers = meta["streamed_layers"]
        missing = [i for i in range(num_layers) if i not in parts]
        if missing or len(parts) != num_layers:
            raise ValueError(
                f"{len(parts)} of {num_layers} streamed KV layers arrived (missing {missing[:8]})"
            )
        return torch.stack([parts[i] for i in range(num_layers)])

    def drop(self, request_id: str) -> set[int]:
        """Free the request's parts; the layers that had arrived."""
        return set(self.parts.pop(request_id, {}))

    def stats(self) -> dict[str, float]:
        return {
            "kv_parts_buffered": sum(len(p) for p in self.parts.values()),
            "kv_parts_received_total": self.received_total,
        }


class DroppedKV:
    """D side: requests whose KV is dropped as it arrives, and what of it is still due.

    | remembered when                                  | still due                    |
    |--------------------------------------------------|------------------------------|
    | aborted before its `kv:` message came            | that message, and the layers |
    |                                                  | it counts that had not come  |
    | aborted while its `kv:` waited for retried parts | those parts                  |
    | P discarded it with parts not yet arrived        | those parts                  |

    Everything due is dropped on arrival and the id forgotten once the last of it came. Some never
    comes (P died or gave up on a part), so memory is bounded too: past `capacity` ids the oldest is
    forgotten. Late KV trails its abort by one P step plus a transfer (and its retries), so only the
    latest few matter; 4096 is far more than arrive in that time. A second `kv:` message for an id
    is someone else's (P sends one per attempt id): it is not dropped.
    """

    def __init__(self, capacity: int = MAX_DROPPED_REMEMBERED) -> None:
        self.capacity = capacity
        # request id -> (layers dropped so far, layers streamed: None until its `kv:` came)
        self.due: OrderedDict[str, tuple[set[int], int | None]] = OrderedDict()
        self.handoffs_dropped_total = 0
        self.parts_dropped_total = 0

    def remember(
        self, request_id: str, arrived: set[int] | None = None, handoff: Received | None = None
    ) -> None:
        """Drop the request's KV from now on. `arrived`: the layers already in (and freed);
        `handoff`: its `kv:` message, if it came (then only the layers it counts are due)."""
        layers = None if handoff is None else handoff.meta.get("streamed_layers", 0)
        self.due[request_id] = (set(arrived or ()), layers)
        self.due.move_to_end(request_id)
        self._forget_if_complete(request_id)
        while len(self.due) > self.capacity:
            self.due.popitem(last=False)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self.due

    def drop_part(self, request_id: str, layer: int) -> bool:
        """A `kvl:` part arrived: True (and counted) if it is dropped."""
        if request_id not in self.due:
            return False
        self.due[request_id][0].add(layer)
        self.parts_dropped_total += 1
        self._forget_if_complete(request_id)
        return True

    def drop_handoff(self, handoff: Received) -> bool:
        """A `kv:` message arrived: True if its request was aborted before (the message is dropped)."""
        request_id = handoff.meta["request_id"]
        if request_id not in self.due or self.due[request_id][1] is not None:
            return False
        self.due[request_id] = (self.due[request_id][0], handoff.meta.get("streamed_layers", 0))
        self.handoffs_dropped_total += 1
        self._forget_if_complete(request_id)
        return True

    def _forget_if_complete(self, request_id: str) -> None:
        arrived, layers = self.due[request_id]
        if layers is not None and len(arrived) >= layers:
            del self.due[request_id]

    def stats(self) -> dict[str, float]:
        return {
            "kv_late_requests_remembered": len(self.due),
            "kv_late_handoffs_dropped_total": self.handoffs_dropped_total,
            "kv_late_parts_dropped_total": self.parts_dropped_total,
        }

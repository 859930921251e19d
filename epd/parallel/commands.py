"""What rank 0 of a tensor-parallel instance tells its workers, one command each.

Every call of rank 0's runner that touches the model or the KV cache sends its command first,
then runs its own share; each worker, waiting for that command, runs the same share of the same
call, so the collectives inside (the decoder's all-reduces, the KV gathers and scatters) meet.

| command       | then, over the group                          | the worker                         |
|---------------|-----------------------------------------------|------------------------------------|
| `BuildRank`   | the block count all agree on (all-reduce);    | builds its share: model, KV cache, |
|               | with CUDA graphs, each size's warm-up forward | its decode graphs (the sizes and   |
|               | (its all-reduces), sizes in the same order    | order rank 0 captures)             |
| `RunStep`     | the step's image rows (broadcast), if any;    | runs the forward, without logits   |
|               | its token ids (broadcast), if still on the    |                                    |
|               | device (async scheduling);                    |                                    |
|               | the decoder's all-reduces (eager, or replayed | (replays its graph of the padded   |
|               | in a decode graph on every rank alike)        | size where rank 0 replays its own) |
| `GatherLayer` | that layer's KV at the slots, to rank 0       | sends its heads of it              |
| `LayerDone`   | -                                             | goes on to the next layer          |
| `GatherKV`    | the request's KV, to rank 0                   | sends its heads of it              |
| `InjectKV`    | the rows, scattered by kv heads               | writes its heads into its cache    |
| `SendKV`      | -                                             | sends its heads of a request's KV  |
|               |                                               | to D itself (its own connector)    |
| `SendLayer`   | -                                             | the same, one layer, in a forward  |
| `PollSends`   | each worker's finished sends, to rank 0       | reports what its connector         |
|               | (gather of objects over the side group)       | finished (failures included)       |
| `BuildVision` | -                                             | an encoder-only instance's worker: |
|               |                                               | builds its share of the split tower|
| `EncodeImages`| the batch's patches (broadcast); the tower's  | encodes the batch with rank 0      |
|               | all-reduces                                   | (epd.parallel.encoder)             |
| `Stop`        | -                                             | returns from its loop              |

`GatherLayer`, `SendLayer` and `LayerDone` come only inside a `RunStep` that streams layers: after
each layer rank 0's hook sends a `GatherLayer` or a `SendLayer` per request it streams, then
`LayerDone`. `SendKV` and `SendLayer` go only to instances that hand KV off (a prefill instance):
their workers hold a connector; a worker that does not first hold its kv piece sends nothing.

Tensors in a command are on the host (the command is pickled into the group's command channel,
epd.parallel.channel); the image rows and the KV travel as tensors over the main group (nccl on
GPUs).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from epd.config import EngineConfig, ModelConfig
from epd.engine.model_runner import StepInputs


@dataclass(frozen=True)
class BuildRank:
    config: EngineConfig  # rank 0's, device included: each worker puts its own device in
    instance: str | None


@dataclass(frozen=True)
class RunStep:
    step: StepInputs  # without its image rows (`mm_embeds` None): they follow as a tensor
    mm_shape: tuple[int, ...] | None  # the image rows' shape and dtype; None: the step has none
    mm_dtype: torch.dtype | None
    streams_layers: bool  # rank 0 gathers layers during the forward (`GatherLayer`, `LayerDone`)
    # The step's token ids follow as a tensor (a broadcast, int64): with async scheduling rank 0
    # launches a step from the ids the step before sampled, which no host has read yet.
    ids_follow: bool = False


@dataclass(frozen=True)
class GatherLayer:
    layer: int
    slots: list[int]


@dataclass(frozen=True)
class LayerDone:
    pass


@dataclass(frozen=True)
class GatherKV:
    block_table: list[int]
    num_tokens: int


@dataclass(frozen=True)
class InjectKV:
    block_table: list[int]
    start: int  # the rows are those of tokens start..start+num_tokens
    num_tokens: int


@dataclass(frozen=True)
class SendKV:
    block_table: list[int]
    num_tokens: int
    dest: str  # D's data address
    sends: dict[int, tuple[str, dict]]  # sending rank -> (key, meta) of its piece


@dataclass(frozen=True)
class SendLayer:
    layer: int
    slots: list[int]
    dest: str
    sends: dict[int, tuple[str, dict]]


@dataclass(frozen=True)
class PollSends:
    pass


@dataclass(frozen=True)
class BuildVision:
    model: ModelConfig  # rank 0's: the checkpoint, dtype and load format of the tower


@dataclass(frozen=True)
class EncodeImages:
    grids: list[tuple[int, int, int]]
    shape: tuple[int, ...]  # the patches' (they follow as a tensor)
    dtype: torch.dtype


@dataclass(frozen=True)
class Stop:
    pass


Command = (
    BuildRank | RunStep | GatherLayer | LayerDone | GatherKV | InjectKV | SendKV | SendLayer | PollSends
) | (BuildVision | EncodeImages | Stop)


def slots_tensor(slots: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(slots, dtype=torch.long, device=device)

"""One instance: a core of stage managers for its roles (core.py), run by a shell (shell.py).

Roles decide which parts exist, not how the loop runs (`receive -> schedule -> run -> report`):

| roles | encode stage  | engine (core-owned, shared)  | prefill stage         | decode | connector         |
|-------|---------------|------------------------------|-----------------------|--------|-------------------|
| E     | EncoderWorker | -                            | -                     | -      | sends embeddings  |
| P     | -             | language model, MM cache     | embeddings, hands off | -      | gets mm:, sends KV|
| EP    | -             | language + vision, in-process| hands KV off          | -      | sends KV          |
| PD    | -             | language model, MM cache     | decodes in place      | yes    | gets embeddings   |
| EPD   | -             | language + vision, in-process| decodes in place      | yes    | local: no transfer|
| D     | -             | language model               | -                     | yes    | receives KV       |
| ED    | EncoderWorker | language model               | -                     | yes    | E's and D's       |

With `kv_streaming="layer"`, P sends each layer's KV while prefill runs and D assembles it
when the hand-off arrives (message order: epd.cluster.kv_handoff). D drops the KV of a request
aborted before its KV arrived, and layers that come after their hand-off no longer needs them
(`DroppedKV`).

| module            | what                                                                       |
|-------------------|----------------------------------------------------------------------------|
| config.py         | `InstanceConfig`: what the instance starts with (frozen)                   |
| stage.py          | the stage-manager contract, the `Outbox` protocol, `ListOutbox` for tests  |
| encode_stage.py   | encode stage (E without P)                                                 |
| prefill_stage.py  | prefill stage: embeddings wait, admission, KV hand-off routing             |
| decode_stage.py   | decode stage: KV arrival, layer parts, aborts that overtook their KV       |
| engine_host.py    | the shared engine: steps it, reports diffs, rewires it on a role change    |
| roles.py          | when `SetRoles` may change the roles                                       |
| core.py           | `InstanceCore`: composes the stages, routes inputs, `SetRoles`             |
| shell.py          | `Instance`, `instance_main`: the ZMQ process loop around the core          |
"""

from epd.cluster.instance.config import InstanceConfig
from epd.cluster.instance.core import InstanceCore
from epd.cluster.instance.shell import Instance, instance_main
from epd.cluster.instance.stage import ListOutbox, Outbox

__all__ = ["Instance", "InstanceConfig", "InstanceCore", "ListOutbox", "Outbox", "instance_main"]

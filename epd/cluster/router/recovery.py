"""What the router does with a request whose instance died, by what that instance held for it.

The ledger says exactly what each instance holds (ledger.py), so the answer depends only on that
and on how far the request got:

| held on the dead instance     | the request                    | recovery                               |
|-------------------------------|--------------------------------|----------------------------------------|
| only images being encoded     | any stage                      | RELEASE_IMAGES: P is told which images |
|                               |                                | will not come (`EmbeddingsLost`) and   |
|                               |                                | asks again; another encoder takes them |
| its prefill or its decode slot| no token yet                   | START_OVER: a new attempt on live      |
|                               |                                | instances (new PrefillTask, images     |
|                               |                                | sent again where needed)               |
| its decode slot, or its       | has tokens                     | CONTINUE: a new attempt prefills the   |
| prefill (the KV had not yet   |                                | prompt and the tokens so far on a live |
| reached D: D sent no token)   |                                | P, which samples the next one; a live  |
|                               |                                | D goes on from there                   |
| prefill or decode             | `max_attempts` used            | FAIL                                   |

A transfer that failed between two live instances is first sent again on the same pair by their
connector (epd.transfer.retry). Once its retries are used up the sender reports the request's
error (its text names it: `transfer_gave_up`), and the router treats it as the loss of that pair:

| the request                   | recovery                                                         |
|-------------------------------|------------------------------------------------------------------|
| no token yet                  | START_OVER, on instances placed anew                             |
| has tokens (P's KV never      | CONTINUE: a live P prefills prompt and tokens again              |
| reached D)                    |                                                                  |
| `max_attempts` used           | FAIL, with the transfer's error                                  |

A continuation's tokens are those an undisturbed run gives, for greedy and for seeded sampling:
a seeded request's draw of its n-th token depends only on (seed, n) (epd.engine.sampler.draw_seed),
so no generator state has to survive the dead instance. Unseeded sampling draws from the
instance's shared generator, as any unseeded request does.

An attempt has its own id on the wire (`RequestRecord.wire_id`: the request id, then
`<id>~<attempt>`), so whatever an instance still says about an earlier attempt (a first token
from a prefill instance that died right after sending it, a late EncodeDone) names no live
attempt and is ignored: no double tokens, no request brought back.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable

from epd.cluster.layout import Role
from epd.cluster.router.ledger import Work
from epd.cluster.router.lifecycle import RequestRecord
from epd.transfer.retry import GAVE_UP

MAX_ATTEMPTS = 3  # a request that lost two instances before its first token has bad luck; a third,
# a cause that follows it (an input that kills instances): it fails then


class Recovery(enum.Enum):
    RELEASE_IMAGES = "release_images"
    START_OVER = "start_over"
    CONTINUE = "continue"
    FAIL = "fail"


def recovery_for(record: RequestRecord, held: Iterable[Work], max_attempts: int) -> Recovery:
    stages = {work.stage for work in held}
    if stages <= {Role.ENCODE}:
        return Recovery.RELEASE_IMAGES
    if record.attempt + 1 >= max_attempts:
        return Recovery.FAIL
    return Recovery.CONTINUE if record.has_first_token else Recovery.START_OVER


def transfer_gave_up(error: str) -> bool:
    """Whether an instance's error for a request is a transfer its connector gave up on."""
    return GAVE_UP in error


def recovery_after_transfer(record: RequestRecord, max_attempts: int) -> Recovery:
    """A transfer of the request's current attempt failed for good (second table above)."""
    if record.attempt + 1 >= max_attempts:
        return Recovery.FAIL
    return Recovery.CONTINUE if record.has_first_token else Recovery.START_OVER

"""The queue policies a plan tries per stage (--scheduling-policy), and the order it tries them in.

The paper's optimizer chooses the queue order with the layout: serving by deadline helps where a
stage's queue mixes short and long work under one TTFT budget, and costs nothing to try on the
simulator. A stage is searched only where the layout has its queue:

| stage   | the layout has its queue when it has        |
|---------|---------------------------------------------|
| encode  | an encoder-only instance (E)                |
| prefill | any instance that prefills                  |
| decode  | a decode-only instance (D)                  |

A stage the layout lacks has no queue to order: it follows the prefill stage, so that a policy for
every stage the layout has reads as one name ('slo', not 'encode=fcfs,prefill=slo,decode=slo').

Order (`policy_proposals`, deterministic): first every choice for all the layout's stages at once
(one budget across the stages: the issue's case), then the best so far with one stage changed,
then every other mix. The search takes the first few untried ones (SearchSettings.policy_trials).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence

from epd.cluster.layout import Layout, Role
from epd.engine.queue_policy import STAGES, StagePolicies

DEFAULT_CHOICES = ("fcfs", "slo")  # priority orders by a field the workload does not set


def layout_stages(layout: Layout) -> tuple[str, ...]:
    """The stages whose queue some instance of `layout` has, in pipeline order."""
    present = set()
    for _, roles in layout.groups:
        if Role.ENCODE in roles and Role.PREFILL not in roles:
            present.add("encode")
        if Role.PREFILL in roles:
            present.add("prefill")
        if Role.DECODE in roles and Role.PREFILL not in roles:
            present.add("decode")
    return tuple(stage for stage in STAGES if stage in present)


def policy_proposals(choices: Sequence[str], layout: Layout, best: str, tried: set[str]) -> Iterator[str]:
    """Untried policies (StagePolicies texts) for `layout`: uniform ones, then neighbours of
    `best`, then the rest; each once."""
    stages, base = layout_stages(layout), StagePolicies.parse(best)

    def with_(names: Sequence[str]) -> str:
        chosen = dict(zip(stages, names))
        lacking = {stage: chosen["prefill"] for stage in STAGES if stage not in chosen}
        return StagePolicies(**chosen, **lacking).text

    uniform = [with_([choice] * len(stages)) for choice in choices]
    near = [
        with_([choice if s == stage else base.of(s) for s in stages])
        for stage in stages
        for choice in choices
    ]
    rest = [with_(names) for names in itertools.product(choices, repeat=len(stages))]
    seen = set(tried)
    for text in (*uniform, *near, *rest):
        if text not in seen:
            seen.add(text)
            yield text

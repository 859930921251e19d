"""Running an engine of the tests to the end."""

from __future__ import annotations

from epd.engine.llm_engine import LLMEngine


def run_to_end(engine: LLMEngine) -> dict[str, list[int]]:
    """Step until nothing is left; each finished request's tokens by id."""
    done = {}
    while engine.has_unfinished_requests():
        done.update({o.request_id: o.outputs[0].token_ids for o in engine.step() if o.finished})
    return done

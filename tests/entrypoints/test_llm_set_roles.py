"""The offline API's role control: `LLM.instances()` and `LLM.set_roles()`, on a cluster of
instance processes and on the in-process engine (which holds every role and cannot switch)."""

from __future__ import annotations

import pytest

from epd import LLM, SamplingParams
from epd.cluster.router.role_switch import BadRoles, SwitchRefused, UnknownInstance

PARAMS = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
PROMPTS = [f"<|im_start|>user\ncount to {k}<|im_end|>\n<|im_start|>assistant\n" for k in range(4)]


@pytest.fixture(scope="module")
def model(checkpoints) -> str:
    return str(checkpoints["qwen2_5_vl"])


def test_a_cluster_switches_between_generate_calls_and_gives_the_same_tokens(model):
    with LLM(model) as llm:
        reference = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, PARAMS, use_tqdm=False)]
    with LLM(model, layout="1E+2P+1D", num_kv_blocks=256) as llm:
        assert [(i["id"], i["roles"], i["state"]) for i in llm.instances()] == [
            ("E0", "E", "up"),
            ("P0", "P", "up"),
            ("P1", "P", "up"),
            ("D0", "D", "up"),
        ]
        record = llm.set_roles("P1", "D")
        assert (record["from"], record["to"], record["state"], record["error"]) == ("P", "D", "done", None)
        assert record["timings"]["total"] >= record["timings"]["reconfigure"] > 0
        assert {i["id"]: i["roles"] for i in llm.instances()}["P1"] == "D"
        after = [o.outputs[0].token_ids for o in llm.generate(PROMPTS * 2, PARAMS, use_tqdm=False)]
        assert after == reference * 2
        assert llm.set_roles("D0", "P")["to"] == "P"
        assert [o.outputs[0].token_ids for o in llm.generate(PROMPTS, PARAMS, use_tqdm=False)] == reference
        with pytest.raises(SwitchRefused, match="no other live instance takes D"):
            llm.set_roles("P1", "P")
        with pytest.raises(UnknownInstance):
            llm.set_roles("P7", "P")
        with pytest.raises(BadRoles):
            llm.set_roles("P0", "X")
        assert [s["id"] for s in llm.engine.role_switches()] == ["P1", "D0"]


def test_the_in_process_engine_lists_one_instance_that_refuses_to_switch(model):
    with LLM(model) as llm:
        assert llm.instances() == [{"id": "EPD0", "roles": "EPD", "device": "cpu", "state": "up"}]
        with pytest.raises(SwitchRefused, match="local connector"):
            llm.set_roles("EPD0", "P")
        assert llm.set_roles("EPD0", "EPD")["timings"]["total"] == 0

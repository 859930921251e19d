"""SamplingParams: vLLM's names and defaults, normalisation, validation, greedy."""

from __future__ import annotations

import dataclasses

import pytest

from epd.sampling_params import SamplingParams


def test_defaults_match_vllm():
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k, p.min_p) == (1, 1.0, 1.0, 0, 0.0)
    assert (p.seed, p.max_tokens, p.logprobs) == (None, 16, None)
    assert (p.ignore_eos, p.include_stop_str_in_output, p.skip_special_tokens) == (False, False, True)
    assert p.stop == [] and p.stop_token_ids == []
    assert not p.greedy


@pytest.mark.parametrize(
    ("stop", "expected"),
    [(None, []), ("###", ["###"]), (["a", "b"], ["a", "b"]), (("a",), ["a"])],
)
def test_stop_is_normalised_to_a_list(stop, expected):
    assert SamplingParams(stop=stop).stop == expected


def test_stop_token_ids_are_copied_into_a_list():
    ids = [2, 3]
    p = SamplingParams(stop_token_ids=ids)
    ids.append(4)
    assert p.stop_token_ids == [2, 3]
    assert SamplingParams(stop_token_ids=(5,)).stop_token_ids == [5]


def test_replace_revalidates():
    p = dataclasses.replace(SamplingParams(stop="x"), temperature=0.0)
    assert p.stop == ["x"] and p.greedy
    with pytest.raises(ValueError):
        dataclasses.replace(p, top_p=0.0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n": 2}, "n > 1 is not supported"),
        ({"n": 0}, "n must be at least 1"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.01}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"min_p": -0.1}, "min_p"),
        ({"min_p": 1.5}, "min_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"logprobs": -1}, "logprobs"),
        ({"logprobs": 21}, "logprobs"),
        ({"stop": ["ok", ""]}, "stop"),
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
    ],
)
def test_invalid_values_raise_with_a_clear_message(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"top_k": -1},
        {"top_k": 0},
        {"top_p": 1.0},
        {"min_p": 1.0},
        {"logprobs": 0},
        {"logprobs": 20},
        {"max_tokens": None},
        {"temperature": 0.0},
        {"seed": 0},
    ],
)
def test_edge_values_are_accepted(kwargs):
    SamplingParams(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "greedy"),
    [
        ({"temperature": 0.0}, True),
        ({"temperature": 1e-6}, True),  # below 1e-5 counts as 0, as in vLLM
        ({"top_k": 1}, True),
        ({"temperature": 0.01}, False),
        ({"top_k": 2}, False),
        ({}, False),
    ],
)
def test_greedy(kwargs, greedy):
    assert SamplingParams(**kwargs).greedy is greedy

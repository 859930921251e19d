"""Engine options are declared once, as EngineArgs fields: the CLI and LLM reach each of them
with the declared default, and refuse what is not declared."""

from __future__ import annotations

import dataclasses
import inspect

import pytest

from epd import LLM
from epd.cli import build_parser, engine_args_from
from epd.entrypoints.llm import engine_args_for
from epd.entrypoints.options import OPTION, EngineArgs, engine_options
from epd.inputs.processor import InputLimits

# --max-image-pixels given: its default would be read from a real checkpoint.
SERVE = ["serve", "--model", "m", "--max-image-pixels", "4096"]
NOT_OPTIONS = {"model", "limits"}  # LLM's first argument / --model, and the input-limit flags


def cli_engine_args(*flags: str) -> EngineArgs:
    return engine_args_from(build_parser().parse_args([*SERVE, *flags]), "m")


def test_every_field_but_model_and_limits_is_a_declared_option():
    names = {f.name for f in dataclasses.fields(EngineArgs)}
    assert names - {f.name for f in engine_options()} == NOT_OPTIONS


def test_every_option_reaches_the_cli_and_llm_with_its_default():
    declared = EngineArgs("m")
    from_cli, from_llm = cli_engine_args(), engine_args_for("m")
    llm_signature = inspect.signature(LLM).parameters
    for f in engine_options():
        assert getattr(from_cli, f.name) == getattr(declared, f.name), f.name
        assert getattr(from_llm, f.name) == getattr(declared, f.name), f.name
        assert llm_signature[f.name].default == getattr(declared, f.name), f.name
        marker = object()
        assert getattr(engine_args_for("m", **{f.name: marker}), f.name) is marker, f.name
    assert from_llm == declared


def test_every_option_has_a_flag_in_serve_help(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--help"])
    help_text = capsys.readouterr().out
    for f in engine_options():
        flag = f.metadata[OPTION].flag or "--" + f.name.replace("_", "-")
        assert flag in help_text, f.name


def test_cli_flags_give_the_engine_args_they_name():
    args = cli_engine_args(
        "--layout", "1E+1P+1D", "--devices", "cuda:0,cuda:1,cuda:1", "--transfer", "shm",
        "--kv-streaming", "layer", "--dtype", "bfloat16", "--max-model-len", "2048",
        "--kv-cache-memory-bytes", "2GiB", "--gpu-memory-utilization", "0.5", "--mm-cache-bytes", "1MiB",
        "--disable-prefix-caching", "--max-num-seqs", "8", "--attention-backend", "torch_sdpa",
        "--no-cuda-graphs",
    )  # fmt: skip
    expected = EngineArgs(
        "m",
        layout="1E+1P+1D",
        devices="cuda:0,cuda:1,cuda:1",
        transfer="shm",
        kv_streaming="layer",
        dtype="bfloat16",
        max_model_len=2048,
        kv_cache_memory_bytes=2 << 30,
        gpu_memory_utilization=0.5,
        mm_cache_bytes=1 << 20,
        enable_prefix_caching=False,
        max_num_seqs=8,
        attention_backend="torch_sdpa",
        cuda_graphs=False,
    )
    assert dataclasses.replace(args, limits=expected.limits) == expected
    assert args.limits.max_image_pixels == 4096 and args.limits.max_images_per_request == 16
    assert cli_engine_args("--cuda-graphs").cuda_graphs is True


def test_unknown_llm_option_is_a_type_error_naming_it_and_close_names():
    with pytest.raises(TypeError, match=r"'block_sise'.*did you mean 'block_size'"):
        LLM("no/such/model", block_sise=4)  # refused before the model is looked for
    with pytest.raises(TypeError, match=r"'warp_drive'.*fields of EngineArgs"):
        engine_args_for("m", warp_drive=True)


def test_llm_conveniences_map_into_engine_args():
    args = engine_args_for("m", devices=["cuda:0", "cuda:1"], max_images_per_request=2)
    assert args.devices == "cuda:0,cuda:1"
    assert args.limits == InputLimits(max_images_per_request=2)
    given = InputLimits(max_image_bytes=10)
    merged = engine_args_for("m", limits=given, max_images_per_request=3).limits
    assert merged == InputLimits(max_images_per_request=3, max_image_bytes=10)

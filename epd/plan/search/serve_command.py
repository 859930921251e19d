"""The `epd serve` command line of a planned configuration: flags exactly as `epd serve` spells
and parses them (epd/cli.py builds one flag per `EngineArgs` option), only those that differ from
the defaults, so that parsing the line gives back the same `EngineArgs`.

    epd serve --model DIR --layout 2EP+2D --devices cuda:0,cuda:1,cuda:2,cuda:3 \\
        --max-num-seqs 128 --dtype bfloat16 --kv-cache-memory-bytes 40GiB
"""

from __future__ import annotations

import shlex
from dataclasses import Field

from epd.entrypoints.options import OPTION, EngineArgs, Option, engine_options

# Always written, even at their defaults: what the plan decided is worth reading in the command.
DECIDED = ("layout", "max_num_seqs")


def serve_args(engine_args: EngineArgs) -> list[str]:
    """`epd serve` arguments for `engine_args` (its input limits are not options: left out)."""
    args = ["--model", engine_args.model]
    for f in engine_options():
        value = getattr(engine_args, f.name)
        if value != f.default or f.name in DECIDED:
            args += _flag(f, value)
    return args


def serve_command(engine_args: EngineArgs) -> str:
    return shlex.join(["epd", "serve", *serve_args(engine_args)])


def _flag(f: Field, value: object) -> list[str]:
    opt: Option = f.metadata[OPTION]
    flag = opt.flag or "--" + f.name.replace("_", "-")
    if value is None:  # the engine decides: no flag says that but leaving it out
        return []
    if isinstance(value, bool):
        if f.default is True:  # an off switch (--disable-prefix-caching): only ever written for False
            return [flag]
        return [flag if value else "--no-" + flag.removeprefix("--")]
    return [flag, opt.show(value) if opt.show else str(value)]

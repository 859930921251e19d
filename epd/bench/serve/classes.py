"""`--classes`: a workload mixed of request classes, each with its own images, output length and SLO.

    --classes classes.json      (or the JSON inline)
    [{"name": "small", "share": 0.7, "images_per_request": 1, "image_size": "448x448",
      "output_tokens": 64, "slo_ttft": 0.5, "slo_tpot": 0.03},
     {"name": "large", "share": 0.3, "images_per_request": 6, "image_size": "1344x1344",
      "output_tokens": 256, "slo_ttft": 3, "slo_tpot": 0.05}]

Each request is drawn from one class (by share), carries its class's SLO to the server (the
`slo_ttft` / `slo_tpot` extension fields, which the slo scheduling policy orders by) and is judged
by it: attainment and goodput count each request against its own class's SLO, and the summary
has a line per class. Keys left out: images_per_request 1, image_size 512x512, output_tokens 128,
no SLO of its own (the command's --slo-ttft / --slo-tpot then judge it).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from epd.bench.serve.spec import SLO, RequestClass, parse_int_range, parse_sizes

KEYS = {"name", "share", "images_per_request", "image_size", "output_tokens", "slo_ttft", "slo_tpot"}


def parse_classes(text: str) -> tuple[RequestClass, ...]:
    """Inline JSON or a .json file -> the classes; ValueError saying what is wrong."""
    path = Path(text)
    raw = json.loads(path.read_text() if path.suffix == ".json" and path.exists() else text)
    if not isinstance(raw, list) or not raw:
        raise ValueError("--classes: a non-empty JSON list of classes")
    classes = tuple(_one(item, i) for i, item in enumerate(raw))
    names = [c.name for c in classes]
    if len(set(names)) != len(names):
        raise ValueError(f"--classes: class names repeat: {names}")
    return classes


def _one(item: object, index: int) -> RequestClass:
    if not isinstance(item, dict):
        raise ValueError(f"--classes[{index}]: an object, not {item!r}")
    unknown = set(item) - KEYS
    if unknown:
        raise ValueError(f"--classes[{index}]: unknown keys {sorted(unknown)} (known: {sorted(KEYS)})")
    try:
        share = float(item["share"])
        cls = RequestClass(
            name=str(item.get("name", f"class{index}")),
            share=share,
            images_per_request=parse_int_range(str(item.get("images_per_request", 1))),
            image_sizes=parse_sizes(str(item.get("image_size", "512x512"))),
            output_tokens=int(item.get("output_tokens", 128)),
            slo=SLO(_seconds(item.get("slo_ttft")), _seconds(item.get("slo_tpot"))),
        )
    except KeyError:
        raise ValueError(f"--classes[{index}]: needs a share") from None
    except (TypeError, ValueError, argparse.ArgumentTypeError) as err:  # the size and range parsers
        raise ValueError(f"--classes[{index}]: {err}") from None
    if share <= 0 or cls.output_tokens < 1:
        raise ValueError(f"--classes[{index}]: share must be > 0 and output_tokens >= 1")
    return cls


def _seconds(value: object) -> float | None:
    if value is None:
        return None
    seconds = float(value)  # type: ignore[arg-type]
    if seconds <= 0:
        raise ValueError(f"an SLO must be a positive number of seconds, not {value!r}")
    return seconds

"""Write a loadable model directory of a full-size config (no weights) for `--load-format dummy`.

    python -m epd.bench.model_dir --out /tmp/qwen2_5_vl_7b [--config-dir DIR] [--config NAME.json]
    python -m epd.bench.model_dir --out /tmp/q3 --config-dir epd/bench/configs --config qwen3_vl_8b.json

The config from shared/model-configs (or --config-dir: epd/bench/configs holds Qwen2.5-VL-72B, Qwen3-VL-8B,
InternVL3-8B and the InternVL2-26B-like shape), the tiny test tokenizer with its special-token
ids written into the config, the preprocessor config and a generation config: what `epd serve --model
DIR --load-format dummy` and `epd bench sweep --model DIR` need to serve the real shapes.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from epd.bench.roofline_setup import SHARED_CONFIGS, build_model_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--config-dir", type=Path, default=SHARED_CONFIGS)
    parser.add_argument("--config", default="qwen2_5_vl_7b.json")
    args = parser.parse_args()
    print(build_model_dir(args.out, args.config_dir, args.config))


if __name__ == "__main__":
    main()

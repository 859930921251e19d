"""The built-in demo model: a small Qwen2.5-VL, trained from scratch to name coloured shapes.

`DEMO_MODEL_DIR` is a complete checkpoint directory that both epd and transformers load:

    from epd import LLM, SamplingParams
    from epd.demo import DEMO_MODEL_DIR
    from epd.demo.shapes import chat_messages, single_image_sample

    sample = single_image_sample(0)
    with LLM(str(DEMO_MODEL_DIR)) as llm:
        [out] = llm.chat(chat_messages(sample), SamplingParams(temperature=0, max_tokens=64))
    print(out.outputs[0].text, "| expected:", sample.answer)

The task is in `epd.demo.shapes`; `python -m epd.demo.train` rebuilds the checkpoint and
`python -m epd.demo.evaluate` scores one. `SAMPLES_DIR` holds a few PNGs with their answers
(`answers.json`) for trying a request by hand.
"""

from __future__ import annotations

from pathlib import Path

DEMO_MODEL_DIR = Path(__file__).resolve().parent / "model"
SAMPLES_DIR = Path(__file__).resolve().parent / "samples"

__all__ = ["DEMO_MODEL_DIR", "SAMPLES_DIR"]

"""Ask a running `epd serve` (demo model) about a shipped sample image.

    python examples/ask_demo.py [--url http://127.0.0.1:8000] [--image epd/demo/samples/shapes_2.png]

Standard library only: one POST to /v1/chat/completions with the image as a data: URL.
"""

from __future__ import annotations

import argparse
import base64
import json
import urllib.request

from epd.demo import SAMPLES_DIR


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--image", default=str(SAMPLES_DIR / "shapes_2.png"))
    args = parser.parse_args()
    with open(args.image, "rb") as f:
        image = "data:image/png;base64," + base64.b64encode(f.read()).decode()
    body = {
        "model": json.load(urllib.request.urlopen(f"{args.url}/v1/models"))["data"][0]["id"],
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": image}},
                    {"type": "text", "text": "What shapes are in this image?"},
                ],
            }
        ],
        "max_tokens": 64,
        "temperature": 0,
    }
    request = urllib.request.Request(
        f"{args.url}/v1/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    answer = json.load(urllib.request.urlopen(request))
    print(answer["choices"][0]["message"]["content"])


if __name__ == "__main__":
    main()

"""The OpenAI-compatible HTTP server (`epd serve`).

| module        | concern                                                        |
|---------------|----------------------------------------------------------------|
| launch        | lifecycle: engine start, uvicorn, signals, drain, shutdown     |
| app           | the FastAPI app, /v1/models, /health, /metrics                 |
| chat          | /v1/chat/completions                                           |
| completions   | /v1/completions                                                |
| serving       | one generation end to end: body, admission, stream, disconnect |
| connections   | the HTTP protocol with a header read timeout (408)             |
| direct_body   | a large body read from the socket into one buffer, unjoined    |
| body          | bounded body reading: per-request and all-connection limits    |
| shape         | cheap JSON shape limits before pydantic (messages, parts...)   |
| text_bound    | prompt text that can never fit, refused before tokenizing      |
| preprocess    | input processing in worker pools, cancelled with its client    |
| protocol      | request bodies (pydantic, strict)                              |
| sampling      | request -> SamplingParams, context checks                      |
| formatting    | response pieces shared by both endpoints                       |
| media         | which image URLs a request may use                             |
| fetch         | http(s) image fetching without SSRF                            |
| metrics       | Prometheus metrics                                             |
| errors        | OpenAI error bodies and handlers                               |
| state, config | shared state, admission, API key; ServerConfig                 |
"""

from epd.server.app import build_app
from epd.server.config import ServerConfig

__all__ = ["ServerConfig", "build_app"]

"""What the HTTP server itself is configured with (the engine has `EngineArgs`)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ServerConfig:
    """Listening address, API identity and the limits applied before a request reaches the engine.

    `max_queued_requests` bounds admitted requests: counted from admission (after the body
    parsed) to the end of generation, input processing included; None = no bound.
    `allowed_local_media_path` None refuses local files (unlike the offline API, where it
    allows them anywhere); `allow_remote_media` enables http(s) image URLs.
    """

    served_model_name: str
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    max_request_bytes: int = 32 << 20
    max_queued_requests: int | None = 1024
    allowed_local_media_path: str | None = None
    allow_remote_media: bool = False
    remote_media_timeout_s: float = 10.0
    shutdown_grace_s: float = 30.0
    log_level: str = "info"
    retry_after_s: int = 1  # the Retry-After we send with 429 and 503

    def __post_init__(self) -> None:
        if self.max_request_bytes < 1:
            raise ValueError("max_request_bytes must be >= 1")
        if self.max_queued_requests is not None and self.max_queued_requests < 1:
            raise ValueError("max_queued_requests must be >= 1")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")

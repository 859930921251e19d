"""What the HTTP server itself is configured with (the engine has `EngineArgs`), and the
defaults of input limits that depend on the model."""

from __future__ import annotations

from dataclasses import dataclass

# --max-image-pixels when not given: IMAGE_PIXELS_PER_MAX_PIXELS x the model's max_pixels, at
# least MIN_DEFAULT_IMAGE_PIXELS (see default_max_image_pixels).
IMAGE_PIXELS_PER_MAX_PIXELS = 4
MIN_DEFAULT_IMAGE_PIXELS = 4 << 20
BUFFERED_BODIES_PER_MAX_BODY = 4  # --max-buffered-request-bytes when not given, in bodies


@dataclass(frozen=True)
class ServerConfig:
    """Listening address, API identity and the limits applied before a request reaches the engine.

    `max_queued_requests` bounds admitted requests: counted from admission (after the body
    parsed) to the end of generation, input processing included; None = no bound.
    `max_buffered_request_bytes` bounds the bodies being received, all connections together
    (None: BUFFERED_BODIES_PER_MAX_BODY x `max_request_bytes`); see epd.server.body.
    `header_read_timeout_s` / `body_read_timeout_s`: a request's headers must be complete,
    and its body must not stall, for longer than that (else 408).
    `allowed_local_media_path` None refuses local files (unlike the offline API, where it
    allows them anywhere); `allow_remote_media` enables http(s) image URLs.
    `shutdown_grace_s`: what in-flight requests get to finish on SIGINT/SIGTERM; then open
    streams end with an error event (epd.server.launch).
    """

    served_model_name: str
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    max_request_bytes: int = 32 << 20
    max_buffered_request_bytes: int | None = None
    max_queued_requests: int | None = 1024
    header_read_timeout_s: float = 30.0
    body_read_timeout_s: float = 30.0
    allowed_local_media_path: str | None = None
    allow_remote_media: bool = False
    remote_media_timeout_s: float = 10.0
    shutdown_grace_s: float = 30.0
    log_level: str = "info"
    retry_after_s: int = 1  # the Retry-After we send with 429 and 503

    def __post_init__(self) -> None:
        if self.max_request_bytes < 1:
            raise ValueError("max_request_bytes must be >= 1")
        if self.body_buffer_limit < self.max_request_bytes:
            raise ValueError(
                f"max_buffered_request_bytes ({self.body_buffer_limit}) must be at least "
                f"max_request_bytes ({self.max_request_bytes}), or no largest request could be received"
            )
        if self.max_queued_requests is not None and self.max_queued_requests < 1:
            raise ValueError("max_queued_requests must be >= 1")
        if not (self.header_read_timeout_s > 0 and self.body_read_timeout_s > 0):
            raise ValueError("header and body read timeouts must be > 0 seconds")
        if not self.shutdown_grace_s >= 0:
            raise ValueError("the shutdown grace period must be >= 0 seconds")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")

    @property
    def body_buffer_limit(self) -> int:
        """Bytes of request bodies that may be held at once while being received."""
        if self.max_buffered_request_bytes is not None:
            return self.max_buffered_request_bytes
        return BUFFERED_BODIES_PER_MAX_BODY * self.max_request_bytes


def default_max_image_pixels(model_max_pixels: int) -> int:
    """--max-image-pixels when not given, from what the model's processor resizes images to.

    A larger image is shrunk to `model_max_pixels` anyway, so decoding more than a few times
    that buys nothing and costs seconds and gigabytes per image (a 5792x5792 PNG of 2.8 MB
    decodes to 100 MB). 4x leaves room for photos sent as taken; 4 Mpx is the floor for
    models with a small max_pixels (the demo model's 0.2 Mpx would otherwise refuse ordinary
    screenshots).
    """
    return max(MIN_DEFAULT_IMAGE_PIXELS, IMAGE_PIXELS_PER_MAX_PIXELS * model_max_pixels)

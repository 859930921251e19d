"""`epd serve`'s lifecycle: start the engine, serve HTTP, drain on a signal, stop every process.

    start engine (instances ready) -> bind, log "ready" -> serve ...
    SIGINT/SIGTERM -> stop accepting -> in-flight requests finish within the grace period
      -> past it, whatever still runs ends with a 503 (a stream: an SSE error event, then
         `data: [DONE]`; aborted in the engine); one log line counts them
      -> what has still not ended END_MARGIN_S later is cancelled by uvicorn
      -> engine.shutdown() -> exit 0

uvicorn handles the signals while it serves and, once done, re-raises them into the
handlers that were installed before it started; ours only log, so a drained server exits 0
instead of dying of the signal it already honoured.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import socket
import time
from types import FrameType

import uvicorn
from fastapi import FastAPI

from epd.entrypoints.async_engine import AsyncEngine, EngineArgs
from epd.server.app import build_app
from epd.server.config import ServerConfig
from epd.server.connections import header_timeout_protocol
from epd.server.malloc_tuning import reuse_large_blocks
from epd.server.state import ServerState

logger = logging.getLogger("epd.server")
END_MARGIN_S = 5.0  # after the grace period: time for ended streams to send their last events


class _StopDuringStartup(BaseException):
    """SIGTERM while instances start: unwinds the start-up so instance processes are stopped."""


def serve(engine_args: EngineArgs, config: ServerConfig) -> int:
    """Run until SIGINT/SIGTERM. Returns the exit code: 0 after a clean stop, 1 if serving failed."""
    started = time.monotonic()
    logger.info(
        "starting engine: model %s, layout %s, device(s) %s, transfer %s",
        engine_args.model,
        engine_args.layout,
        engine_args.devices or engine_args.device,
        engine_args.transfer,
    )
    # Before the engine starts its threads: they keep the malloc arena they first allocate in.
    reuse_large_blocks(config.max_request_bytes, config.body_buffer_limit)  # epd.server.malloc_tuning
    previous = signal.signal(signal.SIGTERM, _raise_stop)
    try:
        engine = AsyncEngine(engine_args)
    except (KeyboardInterrupt, _StopDuringStartup):
        logger.info("interrupted during start-up; instances stopped")
        return 0
    except (ValueError, FileNotFoundError) as e:  # bad options: the message says it all
        logger.error("cannot start: %s", e)
        return 2
    except Exception:
        logger.exception("the engine failed to start")
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)
    logger.info(
        "engine ready in %.1f s: instances %s, max_model_len %d",
        time.monotonic() - started,
        ", ".join(engine.instances_up()),
        engine.max_model_len,
    )
    server = None
    try:
        server = _build_server(engine, config)
        server.run()
    except SystemExit as e:  # uvicorn exits this way when it cannot bind
        logger.error("the HTTP server failed to start (exit %s)", e.code)
    finally:
        if server is not None:
            server.state.preprocessing.close()
        logger.info("stopping engine instances")
        engine.shutdown()
        logger.info("stopped")
    return 0 if server is not None and server.started else 1


def _build_server(engine: AsyncEngine, config: ServerConfig) -> _Server:
    app = build_app(engine, config)
    state: ServerState = app.state.epd
    _log_limits(engine, state)
    server = _Server(_uvicorn_config(app, state), state)
    _install_quiet_handlers(server)
    return server


def _uvicorn_config(app: FastAPI, state: ServerState) -> uvicorn.Config:
    config = state.config
    header_408s = state.metrics.http_requests.labels("other", "408")
    return uvicorn.Config(
        app,
        host=config.host,
        port=config.port,
        http=header_timeout_protocol(
            config.header_read_timeout_s, header_408s.inc, config.max_request_bytes, config.body_buffer_limit
        ),
        log_config=None,  # our logging setup (epd.cli) covers uvicorn's loggers too
        log_level=config.log_level,
        lifespan="off",
        timeout_graceful_shutdown=config.shutdown_grace_s + END_MARGIN_S,  # see _Server.shutdown
    )


def _log_limits(engine: AsyncEngine, state: ServerState) -> None:
    config, limits = state.config, engine.args.limits
    max_chars = state.text_bound.max_chars
    logger.info(
        "limits: bodies %d bytes each, %d being received at once; headers due in %g s, body "
        "stalls %g s; images %s pixels; prompt text %s characters",
        config.max_request_bytes,
        config.body_buffer_limit,
        config.header_read_timeout_s,
        config.body_read_timeout_s,
        limits.max_image_pixels if limits.max_image_pixels is not None else "any",
        max_chars if max_chars is not None else "any (no bound for this tokenizer)",
    )


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, state: ServerState) -> None:
        super().__init__(config)
        self.state = state
        self.drain, self.grace_s = state.drain, state.config.shutdown_grace_s

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        """uvicorn's shutdown, with the drain's end at the grace deadline: open streams then end
        with an error event and [DONE] on their own, before uvicorn would cancel them (which
        cuts them mid-stream and logs a traceback each)."""
        deadline = asyncio.get_running_loop().call_later(self.grace_s, self.drain.end_all)
        try:
            await super().shutdown(sockets)
        finally:
            deadline.cancel()
        if self.drain.over:
            logger.info(
                "shutdown: ended %d open streams and %d other requests after the %g s grace period",
                self.drain.ended_streams,
                self.drain.ended_requests,
                self.grace_s,
            )

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            # What start-up built (torch, transformers, the engine, the app) lives as long as the
            # process. Left to the collector, every full collection that request parsing triggers
            # walks all of it: 13% of the API process's CPU on image requests in one profile.
            gc.collect()  # what start-up left unreachable goes now: frozen, it would stay for good
            gc.freeze()
            host, port = _bound_address(self)
            logger.info("ready: OpenAI API at http://%s:%d/v1 (health /health, metrics /metrics)", host, port)


def _bound_address(server: uvicorn.Server) -> tuple[str, int]:
    """The address actually bound (port 0 picks a free one)."""
    for srv in getattr(server, "servers", []):
        for sock in srv.sockets:
            host, port = sock.getsockname()[:2]
            return host, port
    return server.config.host, server.config.port


def _install_quiet_handlers(server: uvicorn.Server) -> None:
    def handler(sig: int, frame: FrameType | None) -> None:
        # Before uvicorn took over: stop before serving. After it is done (it re-raises the
        # signal it handled): already stopping.
        if not server.should_exit:
            logger.info("received %s; stopping", signal.Signals(sig).name)
        server.should_exit = True

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


def _raise_stop(sig: int, frame: FrameType | None) -> None:
    raise _StopDuringStartup()

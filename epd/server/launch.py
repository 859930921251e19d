"""`epd serve`'s lifecycle: start the engine, serve HTTP, drain on a signal, stop every process.

    start engine (instances ready) -> bind, log "ready" -> serve ...
    SIGINT/SIGTERM -> stop accepting -> in-flight requests finish, or are cancelled (and so
    aborted in the engine) after the grace period -> engine.shutdown() -> exit 0

uvicorn handles the signals while it serves and, once done, re-raises them into the
handlers that were installed before it started; ours only log, so a drained server exits 0
instead of dying of the signal it already honoured.
"""

from __future__ import annotations

import logging
import signal
import socket
import time
from types import FrameType

import uvicorn

from epd.entrypoints.async_engine import AsyncEngine, EngineArgs
from epd.server.app import build_app
from epd.server.config import ServerConfig

logger = logging.getLogger("epd.server")


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
    server = _Server(_uvicorn_config(engine, config))
    _install_quiet_handlers(server)
    try:
        server.run()
    except SystemExit as e:  # uvicorn exits this way when it cannot bind
        logger.error("the HTTP server failed to start (exit %s)", e.code)
    finally:
        logger.info("stopping engine instances")
        engine.shutdown()
        logger.info("stopped")
    return 0 if server.started else 1


def _uvicorn_config(engine: AsyncEngine, config: ServerConfig) -> uvicorn.Config:
    return uvicorn.Config(
        build_app(engine, config),
        host=config.host,
        port=config.port,
        log_config=None,  # our logging setup (epd.cli) covers uvicorn's loggers too
        log_level=config.log_level,
        lifespan="off",
        timeout_graceful_shutdown=config.shutdown_grace_s,
    )


class _Server(uvicorn.Server):
    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
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

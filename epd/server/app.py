"""The FastAPI application: routes, shared state, error handlers, request counting.

| route                      | auth    | answer                                                   |
|----------------------------|---------|----------------------------------------------------------|
| POST /v1/chat/completions  | API key | epd.server.chat                                          |
| POST /v1/completions       | API key | epd.server.completions                                   |
| GET  /v1/models            | API key | the served model                                         |
| GET  /health               | none    | 200 when every role is served (JSON "degraded" and the   |
|                            |         | instances down if some are), else 503                    |
| GET  /metrics              | none    | Prometheus text (epd.server.metrics, plus the gauges of  |
|                            |         | epd.server.body and epd.server.preprocess)               |
| GET  /admin/instances      | API key | epd.server.admin: every instance, its roles and state    |
| POST /admin/instances/{id}/| API key | epd.server.admin: switch its roles, answered once it has |
|      roles                 |         | rejoined, with the seconds of each phase                 |

/health and /metrics stay open so that orchestrators and scrapers need no secret, as in vLLM.
"""

from __future__ import annotations

import time

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from epd.entrypoints.async_engine import AsyncEngine
from epd.server import admin, chat, completions
from epd.server.body import BodyBudget
from epd.server.config import ServerConfig
from epd.server.errors import APIError, install_handlers
from epd.server.media import MediaPolicy
from epd.server.metrics import ServerMetrics, StatusCounter
from epd.server.preprocess import Preprocessing
from epd.server.state import Admission, Drain, ServerState, engine_healthy, get_state, require_api_key
from epd.server.text_bound import TextBound

models_router = APIRouter(dependencies=[Depends(require_api_key)])
ops_router = APIRouter()


def build_app(engine: AsyncEngine, config: ServerConfig) -> FastAPI:
    """An app serving `engine`. The engine's lifetime is the caller's: the app never stops it."""
    app = FastAPI(title="epd", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.epd = _state(engine, config)
    app.state.started = time.time()
    install_handlers(app)
    for router in (chat.router, completions.router, models_router, admin.router, ops_router):
        app.include_router(router)
    app.add_middleware(StatusCounter, metrics=app.state.epd.metrics)
    return app


def _state(engine: AsyncEngine, config: ServerConfig) -> ServerState:
    admission = Admission(config.max_queued_requests, config.retry_after_s, lambda: engine_healthy(engine))
    metrics = ServerMetrics(
        engine.instance_stats,
        engine.instances_up,
        lambda: admission.count,
        engine.role_switches,
        getattr(engine.engine, "shared_files", None),  # a cluster's; the in-process engine has none
    )
    return ServerState(
        engine=engine,
        config=config,
        metrics=metrics,
        admission=admission,
        media=MediaPolicy(
            allow_local=config.allowed_local_media_path is not None, allow_remote=config.allow_remote_media
        ),
        body_budget=BodyBudget(config.body_buffer_limit, config.retry_after_s, metrics.registry),
        preprocessing=Preprocessing(metrics.registry),
        text_bound=TextBound.from_model_dir(engine.args.model, engine.max_model_len),
        drain=Drain(),
    )


@models_router.get("/v1/models")
async def list_models(request: Request) -> JSONResponse:
    state = get_state(request)
    name = state.config.served_model_name
    model = {
        "id": name,
        "object": "model",
        "created": int(request.app.state.started),
        "owned_by": "epd",
        "root": state.engine.args.model,
        "max_model_len": state.engine.max_model_len,
    }
    return JSONResponse({"object": "list", "data": [model]})


@ops_router.get("/health")
async def health(request: Request) -> Response:
    state = get_state(request)
    down = sorted(name for name, up in state.engine.instances_up().items() if not up)
    if state.healthy():
        if not down:
            return Response(status_code=200)
        # Every request is still served (other instances hold each role); restarts are under way.
        return JSONResponse({"status": "degraded", "instances_down": down})
    if not state.engine.is_running():
        detail = "the engine is not running"
    else:
        missing = ", ".join(state.engine.missing_roles())
        detail = f"no live instance holds {missing}; instances down: {', '.join(down)}"
    raise APIError(503, f"unhealthy: {detail}", code="service_unavailable")


@ops_router.get("/metrics")
async def prometheus_metrics(request: Request) -> Response:
    return Response(get_state(request).metrics.render(), media_type=CONTENT_TYPE_LATEST)

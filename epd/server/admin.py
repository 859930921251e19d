"""Admin routes, behind the API key like /v1: the instances and their roles.

| route                              | answer                                                           |
|------------------------------------|------------------------------------------------------------------|
| GET  /admin/instances              | {"object": "list", "data": [{"id", "roles", "device", "state"}]} |
|                                    | roles as letters ("PD"); state up, draining, switching or down   |
| POST /admin/instances/{id}/roles   | body {"roles": "P"}: switches the instance (drain, reconfigure,  |
|                                    | rejoin: epd.cluster.router.role_switch) and answers once it has  |
|                                    | rejoined: {"id", "from", "to", "state", "attempts", "migrated",  |
|                                    | "timings": {"drain", "reconfigure", "weights", "memory",         |
|                                    | "rejoin", "total"} in seconds}; "migrated": running requests     |
|                                    | moved (with their KV) to other decode instances while it drained|

Any pair of roles may be asked for; E moves (its weights come from host memory) only on instances
started with --switchable-roles, P and D on any instance that holds the language model.

| status | code                | when                                                          |
|--------|---------------------|---------------------------------------------------------------|
| 400    | invalid_roles       | the roles name no role, or a letter that is not E, P or D     |
| 404    | instance_not_found  | no instance has that id                                       |
| 409    | switch_in_progress  | the instance is switching already                             |
| 409    | switch_refused      | the switch cannot be done (E on an instance started without   |
|        |                     | --switchable-roles; no other instance would take P, D or E    |
|        |                     | while it drains; it is down; a local connector: 1EPD)         |
| 503    | switch_failed       | it started but did not finish (the instance died, its drain   |
|        |                     | timed out): the instance kept its roles                       |
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from epd.cluster.router.role_switch import (
    BadRoles,
    SwitchError,
    SwitchInProgress,
    SwitchRefused,
    UnknownInstance,
)
from epd.server.body import read_json
from epd.server.errors import APIError
from epd.server.protocol import StrictModel
from epd.server.shape import ObjectShape
from epd.server.state import get_state, require_api_key

router = APIRouter(dependencies=[Depends(require_api_key)])


class RolesRequest(StrictModel):
    roles: str


ROLES_BODY = ObjectShape(frozenset(RolesRequest.model_fields))


@router.get("/admin/instances")
async def list_instances(request: Request) -> JSONResponse:
    return JSONResponse({"object": "list", "data": get_state(request).engine.instances()})


@router.post("/admin/instances/{instance_id}/roles")
async def set_roles(request: Request, instance_id: str) -> JSONResponse:
    state = get_state(request)
    body = await read_json(request, RolesRequest, ROLES_BODY, state)
    try:
        record = await state.engine.set_roles(instance_id, body.roles)
    except SwitchError as err:
        raise _refusal(err) from None
    except RuntimeError as err:  # the engine is not running (or stopped meanwhile)
        raise APIError(503, str(err), code="service_unavailable") from None
    if record["error"] is not None:
        message = (
            f"the switch of {instance_id} from {record['from']} to {record['to']} failed: {record['error']}"
        )
        raise APIError(503, message, code="switch_failed")
    return JSONResponse(record)


def _refusal(err: SwitchError) -> APIError:
    if isinstance(err, UnknownInstance):
        return APIError(404, str(err), code="instance_not_found")
    if isinstance(err, BadRoles):
        return APIError(400, str(err), param="roles", code="invalid_roles")
    if isinstance(err, SwitchInProgress):
        return APIError(409, str(err), code="switch_in_progress")
    if isinstance(err, SwitchRefused):
        return APIError(409, str(err), code="switch_refused")
    return APIError(409, str(err), code="switch_refused")

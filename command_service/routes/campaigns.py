"""``/v1/admin/campaigns``: campaigns created, changed and stopped by an admin, and read back.

The writes build their command (``command_service/campaigns.py``) and hand it over to be
decided and recorded (``command_service/handlers.py``), exactly like a registration: each
needs an Idempotency-Key, a replay is the original answer, and a refusal writes nothing.

The bodies of a creation and of a change are read as raw JSON objects and parsed by
``kessai.campaigns.parse_rules`` and ``parse_change``, so that an invalid campaign is ``422
invalid_campaign`` naming each field, the one answer the rules give wherever they are parsed.
FastAPI therefore does not see these bodies: the document declares them here
(``RULES_BODY``, ``CHANGE_BODY``), from the same models.
"""

from __future__ import annotations

import copy
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Body, Depends, Path, Request
from pydantic import TypeAdapter
from starlette.responses import Response

from command_service.campaigns import (
    CampaignList,
    CampaignOut,
    CampaignRecordedOut,
    StopCampaign,
    campaign_not_found,
    change_command,
    create_command,
    read_campaigns,
    stop_command,
)
from command_service.routes.dependencies import (
    IDEMPOTENCY_KEY_DOC,
    WRITE_ERRORS,
    ResourcesDep,
    parse_idempotency_key,
    record,
    write_policy,
)
from command_service.schemas import CURRENCY_CODES
from kessai.auth import ADMIN, Principal, needs
from kessai.campaigns import (
    CampaignChange,
    CampaignId,
    CampaignRules,
    invalid_campaign,
    parse_change,
    parse_rules,
)
from kessai.clock import utcnow
from kessai.errors import ApiError, ErrorOut
from kessai.http import JSONResponse

router = APIRouter()
AdminDep = Annotated[Principal, Depends(needs(ADMIN))]
CampaignIdPath = Annotated[CampaignId, Path(description="The campaign's id.")]


def _inlined(schema: dict[str, Any]) -> dict[str, Any]:
    """``schema`` with its ``$defs`` written in place of their references: a request body the
    document declares itself cannot refer to definitions FastAPI never collected."""
    defs = schema.pop("$defs", {})

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return walk(copy.deepcopy(defs[ref.removeprefix("#/$defs/")]))
            return {k: walk(v) for k, v in node.items() if k != "discriminator"}
        if isinstance(node, list):
            return [walk(item) for item in node]
        return node

    inlined: dict[str, Any] = walk(schema)
    return inlined


def _rules_schema() -> dict[str, Any]:
    """The rules as ``parse_rules`` takes them, said as exactly as a schema can: ``kind`` is
    required (it picks the rules), currencies are the known ones, lists hold distinct items.
    What no schema says: ``ends_at`` after ``starts_at``, a ``time_zone`` of the IANA database,
    a ``name`` of printable characters that is not only spaces."""
    schema = _inlined(TypeAdapter(CampaignRules).json_schema())
    for variant in schema["oneOf"]:
        variant["required"] = ["kind", *variant["required"]]
        properties = variant["properties"]
        properties["currency"] = {**properties["currency"], "enum": CURRENCY_CODES}
        for name in ("methods", "merchants"):
            if name in properties:
                for option in properties[name].get("anyOf", [properties[name]]):
                    if option.get("type") == "array":
                        option["uniqueItems"] = True
    return schema


def _body(schema: dict[str, Any]) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": schema}}}


RULES_BODY = _body(_rules_schema())
CHANGE_BODY = _body({**CampaignChange.model_json_schema(), "minProperties": 1})

_ADMIN_ERRORS: dict[int | str, dict[str, object]] = {
    401: WRITE_ERRORS[401],
    403: {"model": ErrorOut, "description": "`forbidden`: the key lacks `admin`."},
}
_NOT_FOUND: dict[int | str, dict[str, object]] = {
    404: {"model": ErrorOut, "description": "`campaign_not_found`."},
}
_INVALID: dict[int | str, dict[str, object]] = {
    422: {
        "model": ErrorOut,
        "description": "`invalid_campaign`: `details.errors[]` names each field that is wrong "
        "or cannot change; `budget_below_granted`: `details` {`budget`, `granted`}; "
        "`idempotency_key_reused`.",
    },
}


async def _json_object(request: Request) -> dict[str, Any]:
    """The body as a JSON object; 400 ``malformed_json``, or 422 ``invalid_campaign`` naming
    ``body`` for JSON that is not an object."""
    try:
        data = orjson.loads(await request.body())
    except orjson.JSONDecodeError:
        raise ApiError(400, "malformed_json", "The request body is not valid JSON.") from None
    if not isinstance(data, dict):
        error = {"field": "body", "message": "must be a JSON object", "type": "dict_type"}
        raise invalid_campaign([error])
    return data


@router.post(
    "/v1/admin/campaigns",
    status_code=201,
    response_model=CampaignRecordedOut,
    responses={
        **WRITE_ERRORS,
        **_ADMIN_ERRORS,
        409: {
            "model": ErrorOut,
            "description": "`campaign_exists`: the id is taken (`details.created_at`). Or the "
            "Idempotency-Key is in flight.",
        },
        **_INVALID,
    },
    operation_id="create_campaign",
    summary="Create a campaign",
    openapi_extra={"parameters": [IDEMPOTENCY_KEY_DOC], "requestBody": RULES_BODY},
)
async def create_campaign(request: Request, admin: AdminDep, resources: ResourcesDep) -> Response:
    """Create a `cashback` or `welcome_bonus` campaign (appends `CampaignCreated`, by the
    admin's key). Repeating the request with the same Idempotency-Key and body returns the
    original response with `Idempotent-Replayed: true`."""
    key = parse_idempotency_key(request.headers.get("idempotency-key"))
    rules = parse_rules(await _json_object(request))
    policy = write_policy(request, resources, key)
    return await record(resources, create_command(policy, rules, actor=admin.key_id))


@router.patch(
    "/v1/admin/campaigns/{campaign_id}",
    response_model=CampaignRecordedOut,
    responses={**WRITE_ERRORS, **_ADMIN_ERRORS, **_NOT_FOUND, **_INVALID},
    operation_id="change_campaign",
    summary="Move a campaign's end later, or raise its budget",
    openapi_extra={"parameters": [IDEMPOTENCY_KEY_DOC], "requestBody": CHANGE_BODY},
)
async def change_campaign(
    request: Request, campaign_id: CampaignIdPath, admin: AdminDep, resources: ResourcesDep
) -> Response:
    """Set a later `ends_at`, a higher `budget`, or both (appends `CampaignChanged`). Nothing
    else can change, and a stopped, ended or exhausted campaign cannot; the budget never goes
    below what the campaign has granted."""
    key = parse_idempotency_key(request.headers.get("idempotency-key"))
    change = parse_change(await _json_object(request))
    policy = write_policy(request, resources, key)
    command = change_command(policy, campaign_id, change, actor=admin.key_id)
    return await record(resources, command)


@router.post(
    "/v1/admin/campaigns/{campaign_id}/stop",
    response_model=CampaignRecordedOut,
    responses={
        **WRITE_ERRORS,
        **_ADMIN_ERRORS,
        **_NOT_FOUND,
        409: {
            "model": ErrorOut,
            "description": "`campaign_not_active`: stopped, ended or exhausted already "
            "(`details.status`). Or the Idempotency-Key is in flight.",
        },
    },
    operation_id="stop_campaign",
    summary="Stop a campaign now",
    openapi_extra={"parameters": [IDEMPOTENCY_KEY_DOC]},
)
async def stop_campaign(
    request: Request,
    campaign_id: CampaignIdPath,
    admin: AdminDep,
    resources: ResourcesDep,
    body: Annotated[StopCampaign | None, Body()] = None,
) -> Response:
    """Stop the campaign from now on (appends `CampaignStopped`, with the optional `reason`):
    nothing is granted for payments or registrations at or after it."""
    key = parse_idempotency_key(request.headers.get("idempotency-key"))
    policy = write_policy(request, resources, key)
    stop = body or StopCampaign()
    return await record(resources, stop_command(policy, campaign_id, stop, actor=admin.key_id))


@router.get(
    "/v1/admin/campaigns",
    response_model=CampaignList,
    responses=_ADMIN_ERRORS,
    operation_id="list_campaigns",
    summary="Every campaign, as the write store holds it",
    dependencies=[Depends(needs(ADMIN))],
)
async def list_campaigns(resources: ResourcesDep) -> Response:
    """Every campaign in id order: rules, status now, version, and what it has granted."""
    engine = resources.engine
    found = await resources.run(lambda: read_campaigns(engine, None, utcnow()))
    return JSONResponse({"campaigns": found})


@router.get(
    "/v1/admin/campaigns/{campaign_id}",
    response_model=CampaignOut,
    responses={**_ADMIN_ERRORS, **_NOT_FOUND},
    operation_id="get_campaign",
    summary="One campaign, as the write store holds it",
    dependencies=[Depends(needs(ADMIN))],
)
async def get_campaign(campaign_id: CampaignIdPath, resources: ResourcesDep) -> Response:
    """The campaign's rules with every change applied, its status now, its version, and
    what it has granted and has left."""
    engine = resources.engine
    found = await resources.run(lambda: read_campaigns(engine, {campaign_id}, utcnow()))
    if not found:
        raise campaign_not_found(campaign_id)
    return JSONResponse(found[0])

"""Routes for operators: admission control read and changed live (scope ``admin``), and the
probes and metrics of the process (no key needed)."""

from __future__ import annotations

import anyio.to_thread
import sqlalchemy as sa
from fastapi import APIRouter, Depends, Request
from starlette.responses import Response

from command_service.admission import AdmissionPolicy, store_policy
from command_service.routes.dependencies import WRITE_ERRORS, ResourcesDep
from kessai.auth import ADMIN, needs, principal_of
from kessai.errors import ApiError, ErrorOut
from kessai.http import JSONResponse
from kessai.observability import metrics_response

router = APIRouter()


@router.get(
    "/v1/admin/admission",
    response_model=AdmissionPolicy,
    responses={401: WRITE_ERRORS[401], 403: {"model": ErrorOut, "description": "Not `admin`."}},
    summary="Admission control as it applies now",
    dependencies=[Depends(needs(ADMIN))],
)
async def get_admission(resources: ResourcesDep) -> Response:
    """The policy this process applies (every process re-reads it each second)."""
    return JSONResponse((await resources.admission.policy()).model_dump())


@router.put(
    "/v1/admin/admission",
    response_model=AdmissionPolicy,
    responses={
        401: WRITE_ERRORS[401],
        403: {"model": ErrorOut, "description": "Not `admin`."},
        422: WRITE_ERRORS[422],
    },
    summary="Change admission control live",
    dependencies=[Depends(needs(ADMIN))],
)
async def put_admission(
    request: Request, body: AdmissionPolicy, resources: ResourcesDep
) -> Response:
    """Turn device-group admission on or off, or change its share of devices, its window or
    what happens to requests without `X-Device-Id`. Every command API process applies it
    within a second; it outlives restarts (it is stored in the write store)."""
    updated_by = principal_of(request.state).key_id
    engine = resources.engine
    await resources.run(lambda: store_policy(engine, body, updated_by))
    resources.admission.applied(body)
    return JSONResponse(body.model_dump())


@router.get("/healthz", summary="The process is alive")
async def healthz() -> JSONResponse:
    return JSONResponse({"status": "ok"})


@router.get("/readyz", summary="The write store answers", responses={503: {"model": ErrorOut}})
async def readyz(resources: ResourcesDep) -> Response:
    engine = resources.engine

    def ping() -> None:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))

    try:
        await anyio.to_thread.run_sync(ping, limiter=resources.limiter)
    except sa.exc.SQLAlchemyError as exc:
        raise ApiError(503, "write_store_unavailable", "The write store does not answer.") from exc
    return JSONResponse({"status": "ready"})


@router.get("/metrics", summary="Prometheus metrics", include_in_schema=False)
async def metrics(resources: ResourcesDep) -> Response:
    return await anyio.to_thread.run_sync(metrics_response, resources.registry)

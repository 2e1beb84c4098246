"""Routes for operators: recorded reconciliation runs (scope ``admin``), and the probes and
metrics of the process (no key needed)."""

from __future__ import annotations

from typing import Annotated

import anyio.to_thread
import sqlalchemy as sa
from fastapi import APIRouter, Query, Request
from starlette.responses import Response

from kessai.errors import ApiError, ErrorOut
from kessai.http import JSONResponse
from kessai.observability import metrics_response
from query_service import handlers
from query_service.routes.dependencies import (
    ADMIN_ROUTE,
    DATA_ERRORS,
    FORBIDDEN,
    ResourcesDep,
    data_response,
)
from query_service.schemas import ReconciliationRunsOut

router = APIRouter()


@router.get(
    "/v1/admin/reconciliation/runs",
    response_model=ReconciliationRunsOut,
    responses={**DATA_ERRORS, 403: FORBIDDEN},
    summary="Recorded reconciliation runs and their findings",
    **ADMIN_ROUTE,
)
async def reconciliation_runs(
    *,
    resources: ResourcesDep,
    limit: Annotated[int, Query(ge=1, le=100, description="Runs per page.")] = 20,
    before: Annotated[
        int | None, Query(ge=1, description="`next_before` of the previous page.")
    ] = None,
) -> Response:
    """What `kessai reconcile` found and repaired, run by run, newest first (as
    `kessai reconcile --history`). Needs the `admin` scope. Like every answer, it says how
    fresh the read side is (`as_of`, `lag_seconds`)."""
    as_of = await resources.freshness.as_of()
    body = await resources.run(
        lambda: handlers.reconciliation_runs(engine=resources.engine, before=before, limit=limit)
    )
    return data_response(body, as_of)


@router.get("/healthz", summary="The process is alive")
async def healthz() -> JSONResponse:
    return JSONResponse({"status": "ok"})


@router.get("/readyz", summary="The read database answers", responses={503: {"model": ErrorOut}})
async def readyz(*, resources: ResourcesDep) -> Response:
    try:
        await resources.run(lambda: handlers.ping(engine=resources.engine))
    except sa.exc.SQLAlchemyError as exc:
        raise ApiError(503, "read_db_unavailable", "The read database does not answer.") from exc
    return JSONResponse({"status": "ready"})


@router.get("/metrics", summary="Prometheus metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    registry = request.app.state.metrics_registry
    return await anyio.to_thread.run_sync(metrics_response, registry)

"""Routes of the query API: each parses and validates, then hands the read to a handler
(``query_service.handlers``) that owns its transaction. The summary and the campaigns are each
one read view in its own module (route, read, SQL and answer: ``summary.py``,
``campaigns.py``).

One module per resource, included here in the order the OpenAPI document lists them; what
they share (resources, parameter types, authorization, freshness) is in ``dependencies``.
"""

from __future__ import annotations

from fastapi import APIRouter

from query_service.routes import admin, campaigns, merchants, payments, summary, users
from query_service.routes.dependencies import Resources

__all__ = ["Resources", "router"]

router = APIRouter()
for _module in (payments, merchants, summary, users, admin, campaigns):
    router.include_router(_module.router)

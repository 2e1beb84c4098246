"""Routes of the command API: parse, authorize, check the Idempotency-Key, hand over the write.

A write route builds the request's ``handlers.WriteCommand`` and hands it to
``handlers.Recorder``, which decides and records it (``command_service/handlers.py`` owns the
transaction); a route opens none.

One module per resource, included here in the order the OpenAPI document lists them; what
they share (resources, headers, documented errors, handing a command over) is in
``dependencies``.
"""

from __future__ import annotations

from fastapi import APIRouter

from command_service.routes import admin, campaigns, payments, refunds, top_ups, users
from command_service.routes.dependencies import Resources

__all__ = ["Resources", "router"]

router = APIRouter()
for _module in (payments, refunds, top_ups, users, campaigns, admin):
    router.include_router(_module.router)

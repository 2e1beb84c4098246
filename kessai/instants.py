"""Instants as requests write them: RFC 3339 date-times with an offset (``Instant``).

pydantic's own ``AwareDatetime`` also reads a number (``0``, ``"1700000000"``) as seconds
since 1970, which no client sending a campaign's start means; and an instant of the year 1
with a positive offset overflows ``datetime`` when it is compared with one in UTC.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any

from pydantic import AwareDatetime, BeforeValidator, WithJsonSchema
from pydantic_core import PydanticCustomError

_RFC3339 = re.compile(r"(\d{4})-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,6})?(Z|[+-]\d{2}:\d{2})")
_YEARS = r"(19[7-9][0-9]|[2-8][0-9]{3}|9[0-8][0-9]{2}|99[0-8][0-9]|999[0-8])"
"""1970 to 9998: an instant of any offset in these years stays within ``datetime``'s range."""


def _rfc3339(value: Any) -> Any:
    """An instant as JSON writes it: an RFC 3339 date-time with an offset, in the years 1970 to
    9998 (or a ``datetime``, as the fold hands over rules it already parsed). Not a number or
    a bare date, which pydantic would otherwise read as an instant of its own choosing."""
    if isinstance(value, datetime):
        return value
    if isinstance(value, str) and (found := _RFC3339.fullmatch(value.upper())):
        if re.fullmatch(_YEARS, found.group(1)):
            return value.upper()
        raise PydanticCustomError("datetime_range", "must be in the years 1970 to 9998")
    raise PydanticCustomError(
        "datetime_type", "must be an RFC 3339 date-time with an offset: 2026-12-01T00:00:00+09:00"
    )


Instant = Annotated[
    AwareDatetime,
    BeforeValidator(_rfc3339),
    WithJsonSchema({"type": "string", "format": "date-time", "pattern": f"^{_YEARS}-"}),
]

"""The read database: denormalized tables shaped for the merchant dashboard queries."""

from __future__ import annotations

import sqlalchemy as sa

from kessai.db import NAMING_CONVENTION

metadata = sa.MetaData(naming_convention=NAMING_CONVENTION)

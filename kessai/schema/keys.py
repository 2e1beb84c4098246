"""The key store: API keys of both services, in a database of its own.

Neither the write store (the query service never touches it) nor the read database (the command
service must not depend on the dashboards' database) can hold them, so both services read this
small database, through a cache, and only ``kessai keys`` writes it. A key's secret is never
stored: only its SHA-256 (the secret is 256 random bits, so a fast hash is enough; there is no
password to guess).
"""

from __future__ import annotations

import sqlalchemy as sa

from kessai.db import NAMING_CONVENTION, UTCDateTime, ascii_id, long_text

metadata = sa.MetaData(naming_convention=NAMING_CONVENTION)

api_keys = sa.Table(
    "api_keys",
    metadata,
    # The public half of a key (``kessai_<key_id>_<secret>``): looked up by primary key, so
    # the secret is never part of a query.
    sa.Column("key_id", ascii_id(32), primary_key=True),
    sa.Column("name", sa.String(100), nullable=False),
    sa.Column("secret_sha256", ascii_id(64), nullable=False),
    # JSON list of scopes: payments:write, wallets:write, users:write, merchant:<id>:read,
    # users:read, admin.
    sa.Column("scopes", long_text(), nullable=False),
    sa.Column("created_at", UTCDateTime(), nullable=False),
    sa.Column("revoked_at", UTCDateTime(), nullable=True),
    mysql_charset="utf8mb4",
    mysql_collate="utf8mb4_bin",
)

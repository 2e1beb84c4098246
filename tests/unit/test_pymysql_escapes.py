"""The fast escapes produce PyMySQL's text exactly: the statement MariaDB receives is the same."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pymysql
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pymysql.constants import SERVER_STATUS

from kessai.pymysql_escapes import Connection


def _connections(server_status: int = 0) -> tuple[Connection, pymysql.connections.Connection]:
    fast = Connection(defer_connect=True, charset="utf8mb4")
    slow = pymysql.connections.Connection(defer_connect=True, charset="utf8mb4")
    fast.server_status = slow.server_status = server_status  # set by the handshake otherwise
    return fast, slow


FAST, SLOW = _connections()
HOSTILE = ["", "'", '"', "\\", "\\'", "\0", "\n\r\032", "'; DROP TABLE events; --", "円\u2028😀"]


@given(st.text() | st.sampled_from(HOSTILE) | st.text(alphabet="\\'\"\0\n\r\032ab"))
def test_strings_are_escaped_as_pymysql_escapes_them(value: str) -> None:
    assert FAST.escape(value) == SLOW.escape(value)


SCALARS = st.integers() | st.booleans() | st.none() | st.binary()


@given(SCALARS | st.floats(allow_nan=False, allow_infinity=False))
def test_other_scalars_are_escaped_as_pymysql_escapes_them(value: object) -> None:
    assert FAST.escape(value) == SLOW.escape(value)


@given(st.datetimes() | st.datetimes(timezones=st.just(UTC)) | st.dates())
def test_times_are_escaped_as_pymysql_escapes_them(value: datetime) -> None:
    assert FAST.escape(value) == SLOW.escape(value)


def test_a_whole_second_has_no_fraction_and_a_fraction_has_six_digits() -> None:
    moment = datetime(2026, 12, 3, 8, 0, 0)  # noqa: DTZ001 (naive, as kessai.db stores)
    assert FAST.escape(moment) == "'2026-12-03 08:00:00'"
    assert FAST.escape(moment + timedelta(microseconds=5)) == "'2026-12-03 08:00:00.000005'"


@pytest.mark.parametrize("value", HOSTILE)
def test_no_backslash_escapes_mode_is_left_to_pymysql(value: str) -> None:
    fast, slow = _connections(SERVER_STATUS.SERVER_STATUS_NO_BACKSLASH_ESCAPES)
    assert fast.escape(value) == slow.escape(value)
    assert fast.escape("it's") == "'it''s'"


def test_a_str_subclass_and_a_custom_mapping_go_to_pymysql() -> None:
    class Name(str):
        pass

    assert FAST.escape(Name("a'b")) == SLOW.escape(Name("a'b")) == "'a\\'b'"
    mapping = {**pymysql.converters.encoders, int: lambda v, _m=None: "<int>"}
    assert FAST.escape(7, mapping) == "<int>"

"""The proxy in front of the command API (deploy/nginx/) refuses like the API itself: same
status, same body, Retry-After always; refunds have a bound of their own; probes are never
limited. What nginx does with the file is measured by ``bench.overload --proxy``."""

from __future__ import annotations

import re

import orjson
import pytest

from bench.proxy import TEMPLATE, proxy_values, render
from kessai.overload import _REFUND_PATH, RETRY_AFTER_SECONDS


@pytest.fixture(scope="module")
def config() -> str:
    return render(TEMPLATE.read_text(), proxy_values(8080, 8000, 8, 2))


def named_location(config: str, name: str) -> str:
    found = re.search(r"location @" + name + r" \{(.*?)\n    \}", config, re.S)
    assert found, f"no location @{name}"
    return found.group(1)


def test_every_variable_is_filled_and_nginx_variables_stay(config: str) -> None:
    assert not re.search(r"\$\{KESSAI_PROXY_[A-Z_]+\}", config)
    assert "$remote_addr" in config
    assert "listen 127.0.0.1:8080;" in config
    assert "server 127.0.0.1:8000;" in config
    with pytest.raises(KeyError, match="KESSAI_PROXY_UPSTREAM"):
        render(TEMPLATE.read_text(), {"KESSAI_PROXY_LISTEN": "80"})


def test_a_refusal_is_the_apis_own_503_overloaded_with_retry_after(config: str) -> None:
    assert "limit_conn_status 503;" in config
    assert "error_page 503 = @overloaded;" in config
    overloaded = named_location(config, "overloaded")
    assert f"add_header Retry-After {RETRY_AFTER_SECONDS} always;" in overloaded
    returned = re.search(r"return (\d+) '(.*)';", overloaded)
    assert returned is not None
    assert returned.group(1) == "503"
    error = orjson.loads(returned.group(2))["error"]
    assert error["code"] == "overloaded"
    assert error["message"] == f"The service is overloaded; retry after {RETRY_AFTER_SECONDS} s."
    assert error["details"]["retry_after_seconds"] == RETRY_AFTER_SECONDS


def test_an_api_that_does_not_answer_gets_a_json_error_too(config: str) -> None:
    unavailable = named_location(config, "unavailable")
    assert "Retry-After" in unavailable
    returned = re.search(r"return (\d+) '(.*)';", unavailable)
    assert returned is not None
    assert orjson.loads(returned.group(2))["error"]["code"] == "upstream_unavailable"


def test_refunds_have_their_own_bound(config: str) -> None:
    """The refund map's regex picks out exactly what the API's shedder prefers as a refund."""
    pattern = re.search(r'"~(\^POST /v1/payments/.*?)" "refunds";', config)
    assert pattern is not None
    refund = re.compile(pattern.group(1))
    for path in ("/v1/payments/p1/refunds", "/v1/payments", "/v1/payments/p1/refunds/x"):
        assert bool(refund.match(f"POST {path}")) == bool(_REFUND_PATH.match(path)), path
    assert not refund.match("GET /v1/payments/p1/refunds")
    assert "limit_conn kessai_general 8;" in config
    assert "limit_conn kessai_refunds 2;" in config


def test_probes_and_metrics_are_never_limited(config: str) -> None:
    probes = re.search(r"location ~ \^/\(healthz\|readyz\|metrics\)\$ \{(.*?)\}", config, re.S)
    assert probes is not None
    assert "limit_conn" not in probes.group(1)

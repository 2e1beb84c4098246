"""The OpenAPI documents of both APIs declare, on every operation, what the edge may answer
there, with the one error body kessai sends: a client generated from a document handles a 503
or a 429 on any route, not only on the few that happen to mention one."""

from __future__ import annotations

from typing import Any

import pytest

from command_service.app import create_app as create_command_app
from kessai.auth import OPEN_PATHS
from kessai.settings import Settings
from query_service.app import create_app as create_query_app

ERROR_BODY = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorOut"}}}


def operations(document: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [
        (path, operation)
        for path, item in document["paths"].items()
        for operation in item.values()
        if isinstance(operation, dict) and "responses" in operation
    ]


@pytest.mark.parametrize("create_app", [create_command_app, create_query_app])
def test_every_operation_documents_the_edge_answers_with_the_error_body(create_app: Any) -> None:
    document = create_app(Settings(keys_db_url="sqlite://")).openapi()
    assert document["components"]["securitySchemes"]["ApiKey"]["scheme"] == "bearer"
    assert "HTTPValidationError" not in document["components"]["schemas"]
    for path, operation in operations(document):
        keyed = path not in OPEN_PATHS
        expected = {"413", "431", "503"} | ({"401", "429"} if keyed else set())
        responses = operation["responses"]
        assert expected <= responses.keys(), (path, sorted(responses))
        assert ("security" in operation) == keyed, path
        for status, answer in responses.items():
            if status.startswith(("4", "5")):
                assert answer["content"] == ERROR_BODY, (path, status)
        assert "Retry-After" in responses["503"]["headers"], path
        if keyed:
            assert "Retry-After" in responses["429"]["headers"], path

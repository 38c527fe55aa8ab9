"""The OpenAPI document covers every route the application serves, and every operation declares
its error answers (issue 12): walks the app's routes (FastAPI's `iter_route_contexts` sees through
included routers) for both security modes, so a route added with `include_in_schema=False`, or a
mounted sub-application, fails here."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.routing import iter_route_contexts
from starlette.routing import Mount
from starlette.staticfiles import StaticFiles

from fhir_facade.api_docs import DOCS_PATH
from fhir_facade.app import create_app
from fhir_facade.config import Settings
from fhir_facade.web_app import WebAppFiles

_METHODS = {"GET", "POST", "PUT", "PATCH", "DELETE"}


def _app(tmp_path: Path, **overrides: Any) -> FastAPI:
    settings = Settings(
        base_url="http://127.0.0.1:8080/fhir",
        data_dir=tmp_path,
        database_url=f"sqlite:///{tmp_path}/store.sqlite3",
        watch_studies=False,
        analyze_enabled=False,
        **overrides,
    )
    return create_app(settings)


@pytest.fixture(params=["none", "smart"])
def app(request: pytest.FixtureRequest, tmp_path: Path) -> FastAPI:
    return _app(tmp_path, auth=request.param)


def _served(app: FastAPI) -> set[tuple[str, str]]:
    """(path as in OpenAPI, method) of every route, but the documentation's own."""
    own = {app.openapi_url, DOCS_PATH}
    served: set[tuple[str, str]] = set()
    for route in iter_route_contexts(app.routes):
        original = route.original_route
        if isinstance(original, Mount):
            # Files, not API operations: /docs/static and the SMART app's /app (ADR 0043).
            files = (StaticFiles, WebAppFiles)
            assert isinstance(original.app, files), f"undocumented sub-application at {original.path}"
            continue
        if route.path in own:
            continue
        # OpenAPI names a path parameter without Starlette's converter: {bulk:path} -> {bulk}
        path = re.sub(r"\{(\w+):\w+\}", r"{\1}", route.path_format or route.path)
        served |= {(path, method) for method in (route.methods or set()) & _METHODS}
    return served


def test_every_route_is_documented(app: FastAPI) -> None:
    paths = app.openapi()["paths"]
    documented = {(path, method.upper()) for path, operations in paths.items() for method in operations}
    served = _served(app)
    assert len(served) > 80
    assert served - documented == set(), "routes missing from the OpenAPI document"
    assert documented - served == set(), "documented operations no route serves"


def test_every_operation_declares_its_errors(app: FastAPI) -> None:
    for path, operations in app.openapi()["paths"].items():
        for method, operation in operations.items():
            responses = operation["responses"]
            where = f"{method.upper()} {path}"
            assert any(s.startswith("4") for s in responses), f"{where} declares no 4xx answer"
            assert "500" in responses, where
            assert operation.get("tags"), f"{where} has no tag"
            assert operation.get("summary"), f"{where} has no summary"
            if path.startswith("/fhir") and ".well-known" not in path:
                for status, response in responses.items():
                    if status[0] in "45":
                        schema = response["content"]["application/fhir+json"]["schema"]
                        assert schema == {"$ref": "#/components/schemas/OperationOutcome"}, (where, status)


def test_secured_operations_declare_401_and_403(tmp_path: Path) -> None:
    document = _app(tmp_path, auth="smart").openapi()
    assert document["components"]["securitySchemes"]["SMART"]["scheme"] == "bearer"
    paths = document["paths"]
    for path, method in [("/fhir/ImagingStudy", "get"), ("/dicom-web/studies", "get"), ("/fhir", "post")]:
        operation = paths[path][method]
        assert operation["security"] == [{"SMART": []}]
        assert {"401", "403"} <= set(operation["responses"])
    # What clients read before they have a token is public, so it cannot answer 401.
    for path, method in [
        ("/fhir/metadata", "get"),
        ("/fhir/.well-known/smart-configuration", "get"),
        ("/auth/token", "post"),
        ("/auth/jwks", "get"),
    ]:
        assert not paths[path][method].get("security"), path
        assert "401" not in paths[path][method]["responses"] or path == "/auth/token"


def test_the_token_endpoint_answers_oauth_errors(tmp_path: Path) -> None:
    """RFC 6749 5.2: the token endpoint's errors are JSON with `error`, not OperationOutcomes."""
    token = _app(tmp_path, auth="smart").openapi()["paths"]["/auth/token"]["post"]
    for status in ("400", "401", "429"):
        schema = token["responses"][status]["content"]["application/json"]["schema"]
        assert schema["required"] == ["error"]
        assert "invalid_grant" in schema["properties"]["error"]["enum"]
    assert "application/x-www-form-urlencoded" in token["requestBody"]["content"]


def test_without_security_nothing_needs_a_token(tmp_path: Path) -> None:
    document = _app(tmp_path).openapi()
    assert "securitySchemes" not in document.get("components", {})
    for path, operations in document["paths"].items():
        assert not path.startswith("/auth/")
        for operation in operations.values():
            assert "401" not in operation["responses"] and "security" not in operation, path


def test_the_proxy_and_the_unconfigured_sync_are_documented(tmp_path: Path) -> None:
    paths = _app(tmp_path).openapi()["paths"]
    qido = paths["/dicom-web/studies"]["get"]
    assert qido["tags"] == ["DICOMweb"]
    assert "application/dicom+json" in qido["responses"]["200"]["content"]
    assert "4XX" in qido["responses"]  # the PACS's refusals pass through
    frames = paths["/dicom-web/studies/{study}/series/{series}/instances/{instance}/frames/{frames}"]["get"]
    assert [p["name"] for p in frames["parameters"]] == ["study", "series", "instance", "frames"]
    status = paths["/fhir/$sync-status"]["get"]
    assert "200" not in status["responses"] and "501" in status["responses"]
    assert paths["/metrics"]["get"]["tags"] == ["monitoring"]

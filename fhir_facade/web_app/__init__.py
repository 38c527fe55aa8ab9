"""The SMART on FHIR imaging app the facade serves at /app (ADR 0043): its files under a strict
Content-Security-Policy (`files`) and its client registration in the built-in authorization server
(`registration`). The pages themselves are ES modules in `static/` (static/pages/<name>.js)."""

from __future__ import annotations

from collections.abc import Iterable

from fastapi import FastAPI

from fhir_facade.config import WebAppSettings
from fhir_facade.web_app.files import APP_PATH, WebAppFiles, content_security_policy
from fhir_facade.web_app.registration import (
    IMAGING_APP_CLIENT_ID,
    IMAGING_APP_SCOPE,
    PROFILE_SCOPES,
    imaging_app_client,
)

__all__ = [
    "APP_PATH",
    "IMAGING_APP_CLIENT_ID",
    "IMAGING_APP_SCOPE",
    "PROFILE_SCOPES",
    "WebAppFiles",
    "content_security_policy",
    "imaging_app_client",
    "install_web_app",
]


def install_web_app(app: FastAPI, settings: WebAppSettings, *, connect_origins: Iterable[str] = ()) -> None:
    """Mount the app at /app when it is enabled. `connect_origins`: an external authorization
    server's token endpoint origin, the one place outside the facade the app may call."""
    if settings.enabled:
        app.mount(APP_PATH, WebAppFiles(settings.vendor_dir, connect_origins=connect_origins), name="web-app")

"""The SMART imaging app as a client of the built-in authorization server (ADR 0043).

`imaging-app` is a public client (a browser app holds no secret: authorization code with PKCE S256,
RFC 7636) whose redirect and launch URLs are derived from FACADE_BASE_URL at every start, so it is
registered whenever the app is served, also with a registry file an earlier start wrote, and follows
a change of the public URL without an edit. A registry file that names `imaging-app` itself wins.

Its scopes are the most any of the app's pages asks for (SMART App Launch 2.x
scopes-and-launch-context.html); the app asks for one profile's share at a time (`PROFILE_SCOPES`,
the same table `static/launch.js` holds):
- patient imaging: `launch/patient` (standalone) or `launch` (EHR launch) with `patient/*.rs`;
- reading worklist (ADR 0033, 0034): `user/*.rs`, and `user/Task.u` (claim and release),
  `user/DiagnosticReport.cu` (write and sign the report; `$analyze` needs create too, ADR 0009),
  `user/Communication.cu` (acknowledge a critical result);
- upload (ADR 0038): `user/*.rs` and `user/ImagingStudy.c` (`$import` needs create on ImagingStudy).
`openid` and `fhirUser` are asked for so that an external server may issue an id_token; the
built-in server grants `fhirUser` (the claim goes into the access token) and never `openid`.
`online_access` (SMART App Launch 2.x scopes-and-launch-context, refresh tokens) brings a refresh
token, so that a radiologist is not signed out when the five-minute access token expires (ADR
0047); the app is not registered for `offline_access`.
"""

from __future__ import annotations

from fhir_facade.auth.server.registry import ClientEntry

__all__ = [
    "IMAGING_APP_CLIENT_ID",
    "IMAGING_APP_NAME",
    "IMAGING_APP_SCOPE",
    "PROFILE_SCOPES",
    "imaging_app_client",
    "launch_url",
    "redirect_uri",
]

IMAGING_APP_CLIENT_ID = "imaging-app"
IMAGING_APP_NAME = "Imaging app (fhir-facade)"

#: Who signed in, and a refresh token for as long as they stay signed in (ADR 0047).
_IDENTITY = "openid fhirUser online_access"
#: What each standalone profile of /app/launch.html asks for (kept equal to static/launch.js).
PROFILE_SCOPES: dict[str, str] = {
    "patient": f"{_IDENTITY} launch/patient patient/*.rs",
    "reader": f"{_IDENTITY} user/*.rs user/Task.u user/DiagnosticReport.cu user/Communication.cu",
    "admin": f"{_IDENTITY} user/*.rs user/ImagingStudy.c",
}
#: An EHR launch: the launch context's patient.
EHR_LAUNCH_SCOPE = f"{_IDENTITY} launch patient/*.rs"

IMAGING_APP_SCOPE = " ".join(
    dict.fromkeys(
        scope for scopes in (*PROFILE_SCOPES.values(), EHR_LAUNCH_SCOPE) for scope in scopes.split()
    )
)


def redirect_uri(public_root: str) -> str:
    """Where the authorization server sends the browser back with the code: the app's shell."""
    return f"{public_root}/app/index.html"


def launch_url(public_root: str) -> str:
    """The app's SMART launch URL (EHR launch: `?iss=...&launch=...`)."""
    return f"{public_root}/app/launch.html"


def imaging_app_client(public_root: str) -> ClientEntry:
    """The registry entry of the app for a facade whose public root (FACADE_BASE_URL without /fhir)
    is `public_root`."""
    return ClientEntry(
        client_id=IMAGING_APP_CLIENT_ID,
        name=IMAGING_APP_NAME,
        kind="public",
        redirect_uris=(redirect_uri(public_root),),
        scope=IMAGING_APP_SCOPE,
        launch_url=launch_url(public_root),
    )

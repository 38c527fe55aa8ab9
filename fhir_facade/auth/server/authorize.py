"""The authorization endpoint's interaction (RFC 6749 3.1, 4.1.1-4.1.2): validate the request, sign
the user in, let them pick the patient for ``launch/patient``, and redirect with a code.

Steps, each a plain HTML form posting back to /auth/authorize with the request in hidden fields:
1. GET: the request is validated (client, exact redirect_uri, scope, PKCE S256, aud, state); a bad
   client or redirect_uri gets an error page, any other error goes back to the app's redirect_uri.
   Valid: the sign-in form.
2. POST username + password. Wrong: the form again, 401; after too many failures for the username or
   the address, 429 without checking the password (``lockout``). Right, without ``launch/patient``: the
   redirect with the code. With ``launch/patient``: the patient choice, carrying a sign-in ticket
   (``tickets``) instead of the password. A single POST with username, password and ``patient`` also
   works (scripted clients).
3. POST ticket + patient: the redirect with the code.
EHR launch (``launch`` in the request, checked by ``grants``): no patient choice; after sign-in the
launch context is taken (single use), the signed-in user must be the user it was created for and
may open its patient, else ``access_denied``; its patient (and encounter) go into the code.
"Deny" at any step redirects with ``error=access_denied``. A forged cross-site POST cannot harm the
user: the code goes to the registered app with a ``state`` the app never issued, so it is dropped
there.
"""

from __future__ import annotations

from typing import Any

from authlib.oauth2.rfc6749 import InvalidRequestError, OAuth2Error
from starlette.responses import Response

from fhir_facade.auth.server.lockout import Attempt, Lockout
from fhir_facade.auth.server.oauth import SmartAuthorizationServer, StarletteOAuth2Request
from fhir_facade.auth.server.pages import error_page, locked_out_page, patient_choice_page, sign_in_page
from fhir_facade.auth.server.registry import Registry, UserEntry
from fhir_facade.auth.server.scope_grants import PATIENT_LAUNCH
from fhir_facade.auth.server.tickets import AUTHORIZATION_PARAMETERS, SignInTickets, request_fingerprint
from fhir_facade.auth.server.users import ResourceOwner, UserDirectory

__all__ = ["AuthorizationEndpoint"]


class AuthorizationEndpoint:
    """GET shows the sign-in form, POST processes it (both synchronous: run them in a worker thread)."""

    def __init__(
        self,
        server: SmartAuthorizationServer,
        registry: Registry,
        users: UserDirectory,
        tickets: SignInTickets,
        lockout: Lockout,
    ) -> None:
        self._server = server
        self._registry = registry
        self._users = users
        self._tickets = tickets
        self._lockout = lockout

    def show(self, request: StarletteOAuth2Request) -> Response:
        try:
            grant = self._server.get_consent_grant(request)
        except OAuth2Error as error:
            return self._refuse(request, error)
        return sign_in_page(
            app_name=self._app_name(request), scope=grant.request.scope, fields=_carried(request)
        )

    def submit(self, request: StarletteOAuth2Request, address: str) -> tuple[Response, Attempt | None]:
        """The answer to a POST from ``address``, and the password attempt it made (None: the password
        was not checked), for the caller to log, audit and delay (``failure_report``)."""
        try:
            grant = self._server.get_consent_grant(request)
        except OAuth2Error as error:
            return self._refuse(request, error), None
        form = request.form
        if form.get("decision") == "deny":
            return self._respond(request, grant, None), None
        fields = _carried(request)
        app_name = self._app_name(request)
        scope = str(grant.request.scope)
        fingerprint = request_fingerprint(form)

        user: UserEntry | None
        attempt: Attempt | None = None
        if "ticket" in form:
            username = self._tickets.redeem(form["ticket"], fingerprint)
            user = self._registry.user(username) if username is not None else None
            if user is None:
                expired = sign_in_page(
                    app_name=app_name,
                    scope=scope,
                    fields=fields,
                    error="Your sign-in has expired. Please sign in again.",
                    status=401,
                )
                return expired, None
        else:
            username = form.get("username", "")
            attempt = self._lockout.begin(username, address)
            if attempt.retry_after is not None:
                return locked_out_page(attempt.retry_after), attempt
            try:
                user = self._users.authenticate(username, form.get("password", ""))
            except BaseException:
                attempt.close()
                raise
            if user is None:
                attempt.failed()
                wrong = sign_in_page(
                    app_name=app_name,
                    scope=scope,
                    fields=fields,
                    error="Unknown username or wrong password.",
                    status=401,
                )
                return wrong, attempt
            attempt.succeeded()
        return self._signed_in(request, grant, user, app_name, fields, fingerprint), attempt

    def _signed_in(
        self,
        request: StarletteOAuth2Request,
        grant: Any,
        user: UserEntry,
        app_name: str,
        fields: dict[str, str],
        fingerprint: str,
    ) -> Response:
        """The user is known: the patient choice for ``launch/patient``, else the redirect with a code."""
        form = request.form
        launch = grant.request.payload.data.get("launch")
        if launch:
            return self._ehr_launch(request, grant, user, str(launch))
        patient: str | None = None
        if PATIENT_LAUNCH in str(grant.request.scope).split():
            if not user.patients:
                message = f"{user.username} may not open any patient, and {app_name} needs one."
                return error_page("access_denied", message, 403)
            chosen = form.get("patient")
            if chosen not in user.patients:
                return patient_choice_page(
                    app_name=app_name,
                    username=user.username,
                    patients=user.patients,
                    fields={**fields, "ticket": self._tickets.issue(user.username, fingerprint)},
                    error=None if chosen is None else "Choose one of the listed patients.",
                    status=200 if chosen is None else 400,
                )
            patient = chosen
        return self._respond(request, grant, ResourceOwner(user.username, user.fhir_user, patient))

    def _ehr_launch(
        self, request: StarletteOAuth2Request, grant: Any, user: UserEntry, launch: str
    ) -> Response:
        """The code for an EHR launch, with the launch context's patient (ADR 0042)."""
        payload = grant.request.payload
        context = self._server.launches.take(launch, grant.request.client.get_client_id())
        if context is None:  # expired while the user signed in, or used by a concurrent request
            error = InvalidRequestError(
                "launch is unknown, expired or was not created for this client",
                state=payload.state,
                redirect_uri=payload.redirect_uri,
            )
            return self._refuse(request, error)
        launched_by_other = context.username is not None and context.username != user.username
        if launched_by_other or not (user.all_patients or context.patient in user.patients):
            return self._respond(request, grant, None)  # access_denied
        owner = ResourceOwner(user.username, user.fhir_user, context.patient, context.encounter)
        return self._respond(request, grant, owner)

    def _respond(
        self, request: StarletteOAuth2Request, grant: object, owner: ResourceOwner | None
    ) -> Response:
        response: Response = self._server.create_authorization_response(
            request, grant_user=owner, grant=grant
        )
        return response

    def _refuse(self, request: StarletteOAuth2Request, error: OAuth2Error) -> Response:
        if error.redirect_uri:  # the client and its redirect_uri were verified: tell the app
            response: Response = self._server.handle_error_response(request, error)
            return response
        return error_page(str(error.error), error.description or None, error.status_code)

    def _app_name(self, request: StarletteOAuth2Request) -> str:
        entry = self._registry.client(request.payload.client_id or "")
        return entry.display_name if entry is not None else "The app"


def _carried(request: StarletteOAuth2Request) -> dict[str, str]:
    data = request.payload.data
    return {name: data[name] for name in AUTHORIZATION_PARAMETERS if name in data}

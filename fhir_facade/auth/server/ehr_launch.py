"""The built-in EHR launcher (SMART App Launch 2.x, app-launch.html "EHR launch"): the embedded
set-up's stand-in for an EHR that starts a SMART app for a patient (ADR 0042).

``GET /auth/ehr-launch``: a sign-in form with the registered apps that have a ``launch_url``.
``POST /auth/ehr-launch`` with username, password and client_id: the user's patients to choose from
(the form carries a sign-in ticket, not the password); with ``patient`` as well (one POST, for scripted
EHRs and tests; optionally ``encounter``): a launch context bound to the app, the patient, the user
and the encounter, and a 303 to ``<launch_url>?iss=<FHIR base>&launch=<value>``.

Only patients in the user's registry list may be launched (``all_patients`` does not widen the
choice), and the sign-in lockout (``lockout``) counts failed passwords here as at /auth/authorize.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from urllib.parse import urlencode

from starlette.responses import RedirectResponse, Response

from fhir_facade.auth.server.launches import LaunchContexts
from fhir_facade.auth.server.lockout import Attempt, Lockout
from fhir_facade.auth.server.pages import ehr_launch_page, error_page, locked_out_page, patient_choice_page
from fhir_facade.auth.server.registry import ClientEntry, Registry, UserEntry
from fhir_facade.auth.server.tickets import SignInTickets
from fhir_facade.auth.server.users import UserDirectory
from fhir_facade.fhir.ids import is_fhir_id

__all__ = ["EhrLauncher"]


class EhrLauncher:
    """GET shows the launcher, POST signs in, picks the patient and redirects to the app (both
    synchronous: run them in a worker thread)."""

    def __init__(
        self,
        *,
        registry: Registry,
        users: UserDirectory,
        tickets: SignInTickets,
        lockout: Lockout,
        launches: LaunchContexts,
        fhir_base: str,
    ) -> None:
        self._registry = registry
        self._users = users
        self._tickets = tickets
        self._lockout = lockout
        self._launches = launches
        self._fhir_base = fhir_base

    def apps(self) -> list[ClientEntry]:
        """The apps that can be launched: registered with a launch_url."""
        return [c for c in self._registry.clients if c.launch_url is not None and not c.backend]

    def show(self) -> Response:
        return self._page()

    def submit(self, form: Mapping[str, str], address: str) -> tuple[Response, Attempt | None]:
        """The answer to a POST from ``address``, and the password attempt it made (None: the password
        was not checked), for the caller to log, audit and delay."""
        app = self._registry.client(form.get("client_id", ""))
        if app is None or app not in self.apps():
            return self._page("Choose one of the listed apps.", 400), None
        encounter = form.get("encounter") or None
        if encounter is not None and not is_fhir_id(encounter):
            return error_page("invalid_request", "encounter must be a FHIR id", 400), None
        fingerprint = _fingerprint(app.client_id, encounter)
        attempt: Attempt | None = None
        if "ticket" in form:
            username = self._tickets.redeem(form["ticket"], fingerprint)
            user = self._registry.user(username) if username is not None else None
            if user is None:
                return self._page("Your sign-in has expired. Please sign in again.", 401), None
            if form.get("decision") == "deny":
                return self._page(), None
        else:
            attempt = self._lockout.begin(form.get("username", ""), address)
            if attempt.retry_after is not None:
                return locked_out_page(attempt.retry_after), attempt
            try:
                user = self._users.authenticate(form.get("username", ""), form.get("password", ""))
            except BaseException:
                attempt.close()
                raise
            if user is None:
                attempt.failed()
                return self._page("Unknown username or wrong password.", 401), attempt
            attempt.succeeded()
        return self._launch(app, user, form.get("patient"), encounter, fingerprint), attempt

    def _launch(
        self, app: ClientEntry, user: UserEntry, patient: str | None, encounter: str | None, fingerprint: str
    ) -> Response:
        if not user.patients:
            return error_page("access_denied", f"{user.username} may not open any patient.", 403)
        if patient not in user.patients:
            fields = {"client_id": app.client_id, "ticket": self._tickets.issue(user.username, fingerprint)}
            if encounter is not None:
                fields["encounter"] = encounter
            return patient_choice_page(
                app_name=app.display_name,
                username=user.username,
                patients=user.patients,
                fields=fields,
                error=None if patient is None else "Choose one of the listed patients.",
                status=200 if patient is None else 400,
                action="ehr-launch",
            )
        launch = self._launches.create(
            client_id=app.client_id, patient=patient, username=user.username, encounter=encounter
        )
        assert app.launch_url is not None
        separator = "&" if "?" in app.launch_url else "?"
        target = f"{app.launch_url}{separator}{urlencode({'iss': self._fhir_base, 'launch': launch})}"
        return RedirectResponse(target, status_code=303, headers={"Cache-Control": "no-store"})

    def _page(self, error: str | None = None, status: int = 200) -> Response:
        return ehr_launch_page(
            apps=[(c.client_id, c.display_name) for c in self.apps()], error=error, status=status
        )


def _fingerprint(client_id: str, encounter: str | None) -> str:
    """What a launcher's sign-in ticket is bound to; never equal to an authorization request's."""
    return hashlib.sha256(f"ehr-launch\0{client_id}\0{encounter or ''}".encode()).hexdigest()

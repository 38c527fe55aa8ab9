"""The authorization endpoint's HTML: sign-in form, patient choice, error page.

Deliberately plain (no scripts, inline CSS only) and served with headers that keep it out of frames
(clickjacking) and caches. No ``form-action`` CSP: browsers apply it to the redirect to the app.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from html import escape

from starlette.responses import HTMLResponse

__all__ = ["ehr_launch_page", "error_page", "locked_out_page", "patient_choice_page", "sign_in_page"]

_HEADERS = {
    "Cache-Control": "no-store",
    "Pragma": "no-cache",
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'",
    "Referrer-Policy": "no-referrer",
}

_STYLE = (
    "body{font-family:system-ui,sans-serif;max-width:28rem;margin:3rem auto;padding:0 1rem}"
    "label{display:block;margin:.8rem 0 .2rem}input,select{width:100%;padding:.4rem}"
    "button{margin:1rem .5rem 0 0;padding:.5rem 1rem}.error{color:#a00}code{font-size:.9em}"
)


def _document(title: str, body: str, status: int, headers: Mapping[str, str] | None = None) -> HTMLResponse:
    html = (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
        f'<meta name="viewport" content="width=device-width"><style>{_STYLE}</style></head>'
        f"<body><h1>{escape(title)}</h1>{body}</body></html>"
    )
    return HTMLResponse(html, status_code=status, headers={**_HEADERS, **(headers or {})})


def _hidden(fields: Mapping[str, str]) -> str:
    return "".join(
        f'<input type="hidden" name="{escape(name)}" value="{escape(value)}">'
        for name, value in fields.items()
    )


def _scopes(scope: str) -> str:
    items = "".join(f"<li><code>{escape(s)}</code></li>" for s in scope.split())
    return f"<p>It asks for:</p><ul>{items}</ul>"


def _error(message: str | None) -> str:
    return f'<p class="error" role="alert">{escape(message)}</p>' if message else ""


def _buttons(allow: str) -> str:
    return (
        f'<button type="submit" name="decision" value="allow">{escape(allow)}</button>'
        '<button type="submit" name="decision" value="deny" formnovalidate>Deny</button>'
    )


def sign_in_page(
    *, app_name: str, scope: str, fields: Mapping[str, str], error: str | None = None, status: int = 200
) -> HTMLResponse:
    """Username and password, with the authorization request carried along in hidden fields."""
    body = (
        f"<p><strong>{escape(app_name)}</strong> wants to access this FHIR server on your behalf.</p>"
        f"{_scopes(scope)}{_error(error)}"
        f'<form method="post" action="authorize">{_hidden(fields)}'
        '<label for="username">Username</label>'
        '<input id="username" name="username" autocomplete="username" required autofocus>'
        '<label for="password">Password</label>'
        '<input id="password" name="password" type="password" autocomplete="current-password" required>'
        f"{_buttons('Sign in and allow')}</form>"
    )
    return _document("Sign in", body, status)


def patient_choice_page(
    *,
    app_name: str,
    username: str,
    patients: Iterable[str],
    fields: Mapping[str, str],
    error: str | None = None,
    status: int = 200,
    action: str = "authorize",
) -> HTMLResponse:
    """The patients the signed-in user may open; the chosen one becomes the app's launch context
    (``action``: the form's target, the authorization endpoint or the EHR launcher)."""
    options = "".join(f'<option value="{escape(p)}">Patient/{escape(p)}</option>' for p in patients)
    body = (
        f"<p>Signed in as <strong>{escape(username)}</strong>. Which patient should "
        f"<strong>{escape(app_name)}</strong> open?</p>{_error(error)}"
        f'<form method="post" action="{escape(action)}">{_hidden(fields)}'
        f'<label for="patient">Patient</label><select id="patient" name="patient" required>{options}</select>'
        f"{_buttons('Allow')}</form>"
    )
    return _document("Choose a patient", body, status)


def ehr_launch_page(
    *, apps: Iterable[tuple[str, str]], error: str | None = None, status: int = 200
) -> HTMLResponse:
    """The EHR launcher's sign-in: username, password and the app to launch (client_id, name)."""
    options = "".join(f'<option value="{escape(c)}">{escape(name)}</option>' for c, name in apps)
    body = (
        "<p>Sign in to launch a SMART app for one of your patients.</p>"
        f'{_error(error)}<form method="post" action="ehr-launch">'
        '<label for="username">Username</label>'
        '<input id="username" name="username" autocomplete="username" required autofocus>'
        '<label for="password">Password</label>'
        '<input id="password" name="password" type="password" autocomplete="current-password" required>'
        '<label for="client_id">App</label>'
        f'<select id="client_id" name="client_id" required>{options}</select>'
        '<button type="submit">Sign in</button></form>'
    )
    return _document("Launch an app", body, status)


def error_page(error: str, description: str | None, status: int) -> HTMLResponse:
    """Shown instead of redirecting when the client or its redirect_uri cannot be trusted
    (RFC 6749 4.1.2.1: never redirect to an unverified URI)."""
    body = f"<p>The authorization request cannot be processed.</p><p><code>{escape(error)}</code></p>"
    if description:
        body += f"<p>{escape(description)}</p>"
    return _document("Authorization error", body, status)


def _wait(seconds: int) -> str:
    if seconds < 120:
        return f"{seconds} seconds"
    return f"{-(-seconds // 60)} minutes"


def locked_out_page(retry_after: int) -> HTMLResponse:
    """429 Too Many Requests (RFC 6585 4) with Retry-After, shown instead of checking the password
    while the username or the address is locked out. The same page whatever was typed, so it tells
    nothing about the password or whether the username exists."""
    body = (
        '<p class="error" role="alert">Too many failed sign-in attempts.</p>'
        f"<p>For your security, sign-in is paused. Please wait {_wait(retry_after)} and try again.</p>"
    )
    return _document("Sign-in paused", body, 429, {"Retry-After": str(retry_after)})

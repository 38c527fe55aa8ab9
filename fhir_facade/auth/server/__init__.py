"""The built-in OAuth 2.0 / SMART on FHIR authorization server for the embedded set-up.

Active with FACADE_AUTH=smart and no external issuer (``Settings.builtin_issuer``). It offers:
- SMART Backend Services: client_credentials with a ``private_key_jwt`` assertion (RS384/ES384),
  ``system/`` scopes only;
- SMART standalone launch: authorization code with PKCE (S256 only) for public and confidential apps,
  a sign-in form and a patient choice for ``launch/patient``;
- SMART EHR launch (ADR 0042): a built-in EHR launcher (``ehr_launch``, /auth/ehr-launch) creates a
  ``launch`` context (``launches``) for a signed-in user, one of their patients and an app with a
  ``launch_url``; the app's authorization request with that ``launch`` and the ``launch`` scope gets the
  patient without a patient choice.

- Refresh tokens (ADR 0047) for apps granted ``online_access`` (or ``offline_access``, when
  registered for it): stored as SHA-256 only, rotated on every use, a reused one revokes its family,
  an absolute lifetime per family; RFC 7009 revocation at /auth/revoke (the app's sign-out).

Access tokens are ES256 JWTs (at most five minutes) that the facade's resource server validates with
``public_key_set()``. Not offered: OpenID Connect id_tokens, dynamic client registration. Codes,
sign-in tickets, launch contexts, refresh tokens and the assertion replay cache are kept in the
store (``shared_state``, ADR 0032), so replicas share them; in process memory when no store is given.

Built on authlib's OAuth 2.0 server (grants, PKCE, RFC 7523 client assertions) with a small Starlette
adapter (``oauth``), since authlib has no Starlette server integration.
"""

from fhir_facade.auth.server.builtin import BuiltinAuthorizationServer
from fhir_facade.auth.server.passwords import hash_secret
from fhir_facade.auth.server.registry import RegistryError, register_backend_client, set_user_password

__all__ = [
    "BuiltinAuthorizationServer",
    "RegistryError",
    "hash_secret",
    "register_backend_client",
    "set_user_password",
]

"""Token revocation (RFC 7009) at /auth/revoke: how an app ends its refresh token family when the
user signs out (ADR 0047).

A refresh token sent by the client it was issued to revokes its whole family (RFC 7009 2.1: the
authorization server should also invalidate the other tokens of the same grant). Access tokens are
self-contained JWTs of five minutes at most and cannot be revoked; sending one, or a token that is
unknown, expired or another client's, is answered 200 all the same (RFC 7009 2.2: the client
cannot act on the difference, and an attacker learns nothing). Clients authenticate as at the token
endpoint: public ones by client_id, confidential ones with their secret.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from authlib.consts import default_json_headers
from authlib.oauth2.rfc7009 import RevocationEndpoint

if TYPE_CHECKING:
    from fhir_facade.auth.server.oauth import SmartAuthorizationServer

__all__ = ["SmartRevocationEndpoint"]


class SmartRevocationEndpoint(RevocationEndpoint):
    """RFC 7009 for the built-in server's refresh tokens."""

    CLIENT_AUTH_METHODS: ClassVar[list[str]] = ["client_secret_basic", "client_secret_post", "none"]
    server: SmartAuthorizationServer

    def create_endpoint_response(self, request: Any) -> tuple[int, dict[str, Any], list[tuple[str, str]]]:
        client = self.authenticate_endpoint_client(request)
        self.check_params(request, client)
        self.server.refresh_tokens.revoke(request.form["token"], client.get_client_id())
        return 200, {}, default_json_headers

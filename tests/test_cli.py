"""The command line's safety rule: no unauthenticated listening beyond loopback by accident."""

from __future__ import annotations

import pytest

from fhir_facade.cli import check_listen_address
from fhir_facade.config import Settings


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "localhost"])
def test_loopback_is_always_allowed(host: str) -> None:
    check_listen_address(Settings(), host)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3", "facade.hospital.example"])
def test_other_addresses_are_refused_without_the_explicit_setting(host: str) -> None:
    with pytest.raises(SystemExit, match="FACADE_ALLOW_UNAUTHENTICATED_REMOTE"):
        check_listen_address(Settings(), host)
    check_listen_address(Settings(allow_unauthenticated_remote=True), host)

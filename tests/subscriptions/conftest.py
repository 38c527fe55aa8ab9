"""Subscription test fixtures: a real HTTP receiver on a loopback port, for each test module."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.subscriptions.receiver import Receiver


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    hook = Receiver()
    hook.start()
    yield hook
    hook.stop()

"""The service's tests. `pytest --loopwatch` fails the one whose login blocks the event loop."""

from __future__ import annotations

import pytest
from accounts import AccountService, hash_password


@pytest.fixture(scope="module")
def service() -> AccountService:
    accounts = AccountService()
    accounts.add_user("ada", "correct horse battery staple")
    return accounts


async def test_an_unknown_user_is_refused(service: AccountService) -> None:
    assert not await service.login("bob", "hunter2")


async def test_the_right_password_logs_in(service: AccountService) -> None:
    assert await service.login("ada", "correct horse battery staple")


def test_the_hash_depends_on_the_salt() -> None:
    # A sync test: --loopwatch leaves it alone (no event loop, nothing to block).
    assert hash_password("pw", b"a" * 16) != hash_password("pw", b"b" * 16)

"""A tiny async account service: users log in with a password, checked against a salted
PBKDF2 hash. It has the bug `pytest --loopwatch` is for: the hashing runs on the event loop."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os

ITERATIONS = 600_000
"""OWASP's recommendation for PBKDF2-HMAC-SHA256: about a tenth of a second of CPU per login."""


def hash_password(password: str, salt: bytes) -> bytes:
    return hashlib.pbkdf2_hmac("sha256", password.encode(), salt, ITERATIONS)


class AccountService:
    def __init__(self) -> None:
        self._users: dict[str, tuple[bytes, bytes]] = {}

    def add_user(self, name: str, password: str) -> None:
        salt = os.urandom(16)
        self._users[name] = (salt, hash_password(password, salt))

    async def login(self, name: str, password: str) -> bool:
        record = self._users.get(name)
        if record is None:
            await asyncio.sleep(0)  # stands for writing an audit record
            return False
        salt, expected = record
        # While this hashes, every other request on the loop waits (see README.md for the fix).
        digest = hash_password(password, salt)
        return hmac.compare_digest(digest, expected)

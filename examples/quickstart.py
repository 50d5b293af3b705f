"""A small async service with blocking code hidden in it, run under loopwatch.

    python examples/quickstart.py

Each request handler below blocks the event loop in a different way; loopwatch names each one,
with how long the loop stalled and where in the code it happened."""

import asyncio
import hashlib
import json
import logging
import sys
import time

from loopwatch import event_loop_monitor_ctx


def fetch_profile(user_id: int) -> dict:
    """Stands in for a sync HTTP client call (requests.get) made from async code."""
    time.sleep(0.08)
    return {"id": user_id, "name": f"user-{user_id}", "tags": list(range(50))}


def hash_password(password: bytes) -> bytes:
    return hashlib.pbkdf2_hmac("sha256", password, b"pepper", 400_000)


async def handle_login(user_id: int) -> str:
    profile = fetch_profile(user_id)  # blocks: a sync "HTTP" call inside async code
    await asyncio.sleep(0.01)
    hash_password(b"hunter2")  # blocks: CPU-heavy hashing on the loop
    await asyncio.sleep(0.01)
    return json.dumps(profile)


async def handle_report() -> int:
    total = 0
    for i in range(3_000_000):  # blocks: an inline CPU loop, no call to blame
        total += i % 7
    return total


async def handle_fixed(user_id: int) -> str:
    profile = await asyncio.to_thread(fetch_profile, user_id)  # the fix: off the loop
    await asyncio.to_thread(hash_password, b"hunter2")
    return json.dumps(profile)


async def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s\n")
    with event_loop_monitor_ctx(threshold_ms=20):
        await asyncio.gather(
            asyncio.create_task(handle_login(1), name="login-1"),
            asyncio.create_task(handle_report(), name="report"),
            asyncio.create_task(handle_fixed(2), name="fixed-2"),  # reports nothing
        )
    print("done: each report above names one blocking spot; the fixed handler has none.", file=sys.stderr)


if __name__ == "__main__":
    asyncio.run(main())

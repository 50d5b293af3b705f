"""An ingestion API in the common RAG style, written twice: POST /ingest/slow blocks the event loop
four ways (a sync HTTP call with requests, a sync database query, key derivation, CPU parsing
inline); POST /ingest/fixed does the same work without blocking (an async HTTP client and
asyncio.to_thread). loopwatch watches the requests that carry the token, and keeps its reports
for GET /loopwatch/reports.

    python examples/ingest_service.py --port 8000     # then: python examples/load.py --port 8000
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import multiprocessing
import os
import re
import sqlite3
import tempfile
from collections import deque
from collections.abc import AsyncIterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from multiprocessing.connection import Connection
from typing import Any

import httpx
import requests
import uvicorn
from loopwatch import BlockingCallInfo
from loopwatch.asgi import LoopwatchMiddleware
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

TOKEN = os.environ.get("LOOPWATCH_TOKEN", "example-token")
SOURCE_DELAY_S = 0.03  # the document source answers after 30 ms, like a service across the network
MINHASH_SEEDS = 48
SOURCE_CONNECTIONS = 100
DATABASE = os.path.join(tempfile.mkdtemp(prefix="ingest-"), "chunks.db")


# --- a slow document source on loopback (raw asyncio, in a process of its own) --------------------


DOCUMENT = json.dumps(
    {
        "text": " ".join(
            f"Part {n} says: loops stall for {n * 7 % 13} ms when sync code runs." for n in range(400)
        )
    }
).encode()


async def _serve_document(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while await reader.readuntil(b"\r\n\r\n"):
            await asyncio.sleep(SOURCE_DELAY_S)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n")
            writer.write(f"Content-Length: {len(DOCUMENT)}\r\n\r\n".encode() + DOCUMENT)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass  # the client closed the connection
    finally:
        writer.close()


def serve_documents(report_port: Connection) -> None:
    async def serve() -> None:
        server = await asyncio.start_server(_serve_document, "127.0.0.1", 0, backlog=2048)
        report_port.send(server.sockets[0].getsockname()[1])
        async with server:
            await server.serve_forever()

    asyncio.run(serve())


def start_document_source() -> int:
    """Another service, so another process: a thread of this one would compete for the GIL."""
    theirs, ours = multiprocessing.Pipe()
    multiprocessing.Process(target=serve_documents, args=(theirs,), daemon=True).start()
    if not ours.poll(30):
        raise SystemExit("ingest_service.py: the document source did not start")
    return int(ours.recv())


# --- the work an ingestion does --------------------------------------------------------------------


def setup_database() -> None:
    with sqlite3.connect(DATABASE) as db:
        db.execute("CREATE TABLE IF NOT EXISTS chunks (doc TEXT, body TEXT)")
        db.executemany(
            "INSERT INTO chunks VALUES (?, ?)", ((f"d{i}", f"chunk {i} " * 20) for i in range(80_000))
        )


def count_similar_chunks(word: str) -> int:
    """A sync database call: an unindexed search, as an ORM query would run it."""
    with sqlite3.connect(DATABASE) as db:
        return db.execute("SELECT count(*) FROM chunks WHERE body LIKE ?", (f"%{word}%",)).fetchone()[0]


def fingerprint(text: str) -> str:
    """Key derivation over the document: CPU work in C."""
    return hashlib.pbkdf2_hmac("sha256", text.encode(), b"ingest", 150_000).hex()


def split_into_chunks(text: str, sentences_per_chunk: int = 8) -> list[dict[str, Any]]:
    """CPU parsing in Python: chunks of sentences, normalised words, and a MinHash signature per
    chunk for near-duplicate detection."""
    # Plain loops, no comprehensions: before 3.12 each comprehension is a frame of its own, and one
    # that alone ran past the threshold would be named instead of this function.
    sentences = re.split(r"(?<=[.!?])\s+", text)
    chunks = []
    for start in range(0, len(sentences), sentences_per_chunk):
        words = []
        for sentence in sentences[start : start + sentences_per_chunk]:
            for word in sentence.split():
                words.append(word.lower().strip(",;:."))
        shingles = set()
        for i in range(len(words) - 2):
            shingles.add(" ".join(words[i : i + 3]))
        signature = []
        for seed in range(MINHASH_SEEDS):
            lowest = None
            for shingle in shingles:
                value = hash((seed, shingle))
                if lowest is None or value < lowest:
                    lowest = value
            signature.append(lowest)
        chunks.append({"n": len(chunks), "words": len(words), "signature": signature})
    return chunks


async def already_ingested(request: Request) -> bool:
    """An async lookup (a cache, a queue), as ingestion pipelines make between their stages."""
    await asyncio.sleep(0.001)
    return False


async def ingest_slow(request: Request) -> JSONResponse:
    source = request.app.state.source
    document = requests.get(source, timeout=30).json()  # blocks: sync HTTP client
    await already_ingested(request)
    similar = count_similar_chunks("chunk 7")  # blocks: sync database call
    await already_ingested(request)
    key = fingerprint(document["text"])  # blocks: CPU work in C
    await already_ingested(request)
    chunks = split_into_chunks(document["text"])  # blocks: CPU parsing inline
    return JSONResponse({"key": key[:16], "chunks": len(chunks), "similar": similar})


async def ingest_fixed(request: Request) -> JSONResponse:
    source = request.app.state.source
    # At most as many requests as the pool has connections: httpx's pool walks its whole queue of
    # waiting requests each time a connection frees up, which took 38 ms at 1,000 waiting.
    async with request.app.state.source_slots:
        document = (await request.app.state.client.get(source)).json()
    await already_ingested(request)
    similar = await asyncio.to_thread(count_similar_chunks, "chunk 7")
    await already_ingested(request)
    key = await asyncio.to_thread(fingerprint, document["text"])  # hashlib releases the GIL
    await already_ingested(request)
    # Python parsing holds the GIL, so a thread would still stall the loop: a process does not.
    parsers = request.app.state.parsers
    chunks = await asyncio.get_running_loop().run_in_executor(parsers, split_into_chunks, document["text"])
    return JSONResponse({"key": key[:16], "chunks": len(chunks), "similar": similar})


# --- the service -----------------------------------------------------------------------------------

REPORTS: deque[dict[str, Any]] = deque(maxlen=1000)


def keep_report(info: BlockingCallInfo) -> None:
    REPORTS.append(
        {
            "path": info.context["path"] if info.context else None,
            "request_id": info.context["request_id"] if info.context else None,
            "culprit": info.method_name,
            "kind": info.kind,
            "duration_ms": round(info.duration_ms, 1),
            "location": info.location,
        }
    )


async def reports(request: Request) -> JSONResponse:
    return JSONResponse(list(REPORTS))


def make_app(source: str) -> LoopwatchMiddleware:
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        # One pooled async client for the app, as a real service keeps one.
        limits = httpx.Limits(max_connections=SOURCE_CONNECTIONS)
        with ProcessPoolExecutor(max_workers=2) as parsers:
            # Start the workers now: forking them at the first request would stall the loop.
            loop = asyncio.get_running_loop()
            # Each thread that runs Python makes the loop wait for the GIL when it wants it back,
            # and a wait for the GIL looks like the loop's own code running long. Two threads
            # serve work that releases the GIL most of the time (sqlite, hashing).
            loop.set_default_executor(ThreadPoolExecutor(max_workers=2))
            await asyncio.gather(*(loop.run_in_executor(parsers, int) for _ in range(2)))
            async with httpx.AsyncClient(limits=limits, timeout=30) as client:
                # One request before serving: httpx imports its async backend at the first one,
                # which stalled the loop for 24 ms.
                (await client.get(app.state.source)).raise_for_status()
                app.state.client, app.state.parsers = client, parsers
                app.state.source_slots = asyncio.Semaphore(SOURCE_CONNECTIONS)
                yield

    app = Starlette(
        lifespan=lifespan,
        routes=[
            Route("/ingest/slow", ingest_slow, methods=["POST"]),
            Route("/ingest/fixed", ingest_fixed, methods=["POST"]),
            Route("/loopwatch/reports", reports),
        ],
    )
    app.state.source = source
    # Requests that carry the token are watched, each on its own; the others run unwatched.
    return LoopwatchMiddleware(
        app, threshold_ms=10, token=TOKEN, on_blocking_call=keep_report, reports_per_minute=None
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    setup_database()
    source = f"http://127.0.0.1:{start_document_source()}/document"
    uvicorn.run(make_app(source), host="127.0.0.1", port=args.port, log_level="warning", backlog=2048)


if __name__ == "__main__":
    main()

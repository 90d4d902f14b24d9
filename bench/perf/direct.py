"""The reference fan-out: the least a gateway can do, as a server behind the same HTTP hop as the gateways.

    .venv/bin/python -m bench.perf.direct --port 9002 --upstream http://127.0.0.1:9001/v1 --members m1,m2,m3

A raw ASGI app under uvicorn (uvloop, httptools). `POST /v1/chat/completions` (streamed requests only) asks every
member at once, whole, with one shared aiohttp client (`asyncio.gather`), puts their answers into one user message,
and streams the concluding call's SSE back to the client byte for byte. aiohttp rather than httpx: measured here,
httpx costs about four times the CPU per request (15 ms against 4 ms at 64 streams, most of it per streamed chunk),
which would make this floor a ceiling. The concluding LLM is the request's `model`
(so one server serves every concluder the benchmark needs). A member that fails is left out; when all fail the
answer is a 502. `GET /health` -> 200.

There is no auth, validation, accounting, logging, cache or retry: what is left is the floor of a fan-out's cost.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import aiohttp
import orjson
import uvicorn

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
JSON_HEADERS = [(b"content-type", b"application/json")]
SSE_HEADERS = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]


class Direct:
    """The ASGI app."""

    def __init__(self, upstream: str, members: list[str]) -> None:
        self.url = upstream.rstrip("/") + "/chat/completions"
        self.members = members
        self._client: aiohttp.ClientSession | None = None

    @property
    def client(self) -> aiohttp.ClientSession:
        """One session for every call (made on first use: it needs the running loop); no connection limit."""
        if self._client is None:
            self._client = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0),
                timeout=aiohttp.ClientTimeout(total=300),
                headers={"Content-Type": "application/json"},
            )
        return self._client

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        if scope["method"] == "POST" and scope["path"] in ("/v1/chat/completions", "/chat/completions"):
            await self.chat(receive, send)
        elif scope["path"] == "/health":
            await respond(send, 200, b'{"status":"ok"}')
        else:
            await respond(send, 404, b'{"error":{"message":"not found","type":"invalid_request_error"}}')

    async def member(self, model: str, messages: list[object]) -> str | None:
        async with self.client.post(self.url, data=orjson.dumps({"model": model, "messages": messages})) as response:
            if response.status != 200:
                return None
            content: str = orjson.loads(await response.read())["choices"][0]["message"]["content"]
            return content

    async def chat(self, receive: Receive, send: Send) -> None:
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        request = orjson.loads(body)
        answers = await asyncio.gather(
            *(self.member(m, request["messages"]) for m in self.members), return_exceptions=True
        )
        texts = [a for a in answers if isinstance(a, str)]
        if not texts:
            await respond(send, 502, b'{"error":{"message":"every member failed","type":"members_failed"}}')
            return
        concluding = {
            "model": request["model"],
            "messages": [{"role": "user", "content": "\n\n".join(texts)}],
            "stream": True,
            "stream_options": request.get("stream_options") or {},
        }
        async with self.client.post(self.url, data=orjson.dumps(concluding)) as response:
            headers = SSE_HEADERS if response.status == 200 else JSON_HEADERS
            await send({"type": "http.response.start", "status": response.status, "headers": headers})
            async for data in response.content.iter_any():
                await send({"type": "http.response.body", "body": data, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def respond(send: Send, status: int, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status, "headers": JSON_HEADERS})
    await send({"type": "http.response.body", "body": body})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="the upstream's base URL, e.g. http://127.0.0.1:9001/v1")
    parser.add_argument("--members", required=True, help="comma-separated member model names")
    args = parser.parse_args()
    uvicorn.run(
        Direct(args.upstream, args.members.split(",")),
        host="127.0.0.1",
        port=args.port,
        loop="uvloop",
        http="httptools",
        lifespan="off",
        access_log=False,
        log_level="warning",
        backlog=4096,
        timeout_keep_alive=300,  # longer than the load client keeps an idle connection: no stale-connection races
    )


if __name__ == "__main__":
    main()

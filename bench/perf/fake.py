"""A fast OpenAI-compatible fake upstream for the performance benchmark, in its own process.

    .venv/bin/python -m bench.perf.fake --port 9001 --models '{"m1": {"ttft_ms": 150, "tokens": 40}, ...}'

It shares a core with the load client, so it must cost next to nothing: plain asyncio on uvloop, requests parsed by
httptools, every chunk of every model encoded once at start-up (HTTP chunk framing included), and each one sent by
a timer callback (`loop.call_at`) that writes it: no coroutine, no ASGI message per chunk.

`POST /v1/chat/completions` and `/chat/completions` behave as the body's `model` says (the bare name, or with an
`openai/` prefix; an unknown model is a 404). Per model (all optional):

    ttft_ms         time to the first token (streamed: headers at once, the role chunk and first token then)
    token_ms        pacing between tokens, on absolute times (start + ttft + i * token_ms: no drift)
    tokens          answer length: "tok0 tok1 ..."
    fail_rate       fraction of requests answered at once with an OpenAI-shaped HTTP 500
    straggler_rate  fraction of requests whose first token comes `straggler_ms` late
    straggler_ms
    seed            the draws of fail_rate and straggler_rate are deterministic per model

Whole answers come after ttft + tokens * token_ms, with usage. Streams end with a finish chunk, a usage chunk when
`stream_options.include_usage` is set, and `data: [DONE]`.

`GET /_stats` -> {"cpu_s": this process' user + system CPU, "requests": chat requests so far}; `GET /health`;
`GET /v1/models`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import resource
import time
from dataclasses import dataclass, field
from typing import Any, cast

import httptools
import orjson
import uvloop

DEFAULTS: dict[str, Any] = {
    "ttft_ms": 0.0,
    "token_ms": 0.0,
    "tokens": 16,
    "fail_rate": 0.0,
    "straggler_rate": 0.0,
    "straggler_ms": 0.0,
    "seed": 0,
}
STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
    b"transfer-encoding: chunked\r\n\r\n"
)
ERROR = orjson.dumps(
    {"error": {"message": "fake upstream failure", "type": "server_error", "param": None, "code": "fake_failure"}}
)
NOT_FOUND = b'{"error":{"message":"not found","type":"invalid_request_error","param":null,"code":null}}'
REASONS = {200: b"OK", 404: b"Not Found", 500: b"Internal Server Error"}


def framed(data: bytes) -> bytes:
    """`data` as one HTTP/1.1 chunk."""
    return b"%x\r\n%s\r\n" % (len(data), data)


def whole(status: int, body: bytes) -> bytes:
    """A complete JSON response."""
    head = b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n"
    return head % (status, REASONS[status], len(body)) + body


@dataclass
class Model:
    """One model's behaviour and its pre-encoded chunks."""

    name: str
    ttft_s: float
    token_s: float
    tokens: int
    fail_rate: float
    straggler_rate: float
    straggler_s: float
    rng: random.Random
    text: str = ""
    chunks: list[bytes] = field(default_factory=list)  # framed; the first carries the role chunk too
    finish: bytes = b""  # the finish chunk, unframed
    head: bytes = b""  # a chunk's constant start, for the per-request usage chunk

    @classmethod
    def build(cls, name: str, behaviour: dict[str, Any]) -> Model:
        unknown = set(behaviour) - set(DEFAULTS)
        if unknown:
            raise ValueError(f"{name}: unknown behaviour fields {sorted(unknown)}")
        b = DEFAULTS | behaviour
        model = cls(
            name=name,
            ttft_s=b["ttft_ms"] / 1000,
            token_s=b["token_ms"] / 1000,
            tokens=int(b["tokens"]),
            fail_rate=b["fail_rate"],
            straggler_rate=b["straggler_rate"],
            straggler_s=b["straggler_ms"] / 1000,
            rng=random.Random(b["seed"]),
        )
        created = int(time.time())
        base = {"id": f"chatcmpl-fake-{name}", "object": "chat.completion.chunk", "created": created, "model": name}

        def chunk(delta: dict[str, str], finish_reason: str | None = None) -> bytes:
            choice = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
            return b"data: " + orjson.dumps(base | {"choices": [choice]}) + b"\n\n"

        words = [f"tok{i} " for i in range(model.tokens)]
        model.text = "".join(words)
        chunks = [chunk({"content": word}) for word in words]
        if chunks:
            chunks[0] = chunk({"role": "assistant", "content": ""}) + chunks[0]
        model.chunks = [framed(c) for c in chunks]
        model.finish = chunk({}, "stop")
        model.head = b"data: " + orjson.dumps(base | {"choices": []})[:-1]
        return model

    def usage(self, body: bytes) -> dict[str, int]:
        prompt = max(1, len(body) // 4)
        return {"prompt_tokens": prompt, "completion_tokens": self.tokens, "total_tokens": prompt + self.tokens}

    def answer(self, body: bytes) -> bytes:
        message = {"role": "assistant", "content": self.text}
        choice = {"index": 0, "message": message, "finish_reason": "stop", "logprobs": None}
        return orjson.dumps(
            {
                "id": f"chatcmpl-fake-{self.name}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": self.name,
                "choices": [choice],
                "usage": self.usage(body),
            }
        )

    def tail(self, body: bytes, include_usage: bool) -> bytes:
        """The stream's end: finish chunk, usage chunk if asked, [DONE], and the last (empty) HTTP chunk."""
        out = self.finish
        if include_usage:
            out += self.head + b',"usage":' + orjson.dumps(self.usage(body)) + b"}\n\n"
        return framed(out + b"data: [DONE]\n\n") + b"0\r\n\r\n"


class Fake:
    """The models, the counters and the routes."""

    def __init__(self, models: dict[str, dict[str, Any]]) -> None:
        self.models = {name: Model.build(name, behaviour) for name, behaviour in models.items()}
        self.requests = 0
        listing = [{"id": n, "object": "model", "created": 0, "owned_by": "fake"} for n in self.models]
        self.listing = whole(200, orjson.dumps({"object": "list", "data": listing}))

    def handle(self, conn: Connection, method: bytes, path: bytes, body: bytes) -> None:
        if method == b"POST" and path in (b"/v1/chat/completions", b"/chat/completions"):
            self.chat(conn, body)
        elif path == b"/_stats":
            usage = resource.getrusage(resource.RUSAGE_SELF)
            stats = {"cpu_s": usage.ru_utime + usage.ru_stime, "requests": self.requests}
            conn.write(whole(200, orjson.dumps(stats)))
        elif path == b"/health":
            conn.write(whole(200, b'{"status":"ok"}'))
        elif path in (b"/v1/models", b"/models"):
            conn.write(self.listing)
        else:
            conn.write(whole(404, NOT_FOUND))

    def chat(self, conn: Connection, body: bytes) -> None:
        self.requests += 1
        request = orjson.loads(body)
        name = request.get("model", "").removeprefix("openai/")
        model = self.models.get(name)
        if model is None:
            conn.write(whole(404, NOT_FOUND))
            return
        fail = model.rng.random() < model.fail_rate
        straggle = model.rng.random() < model.straggler_rate
        if fail:
            conn.write(whole(500, ERROR))
            return
        first = conn.loop.time() + model.ttft_s + (model.straggler_s if straggle else 0.0)
        if not request.get("stream"):
            conn.later(first + model.tokens * model.token_s, whole(200, model.answer(body)))
            return
        conn.write(STREAM_HEAD)
        for i, chunk in enumerate(model.chunks):
            conn.later(first + i * model.token_s, chunk)
        include_usage = bool((request.get("stream_options") or {}).get("include_usage"))
        conn.later(first + (model.tokens - 1) * model.token_s, model.tail(body, include_usage))


class Connection(asyncio.Protocol):
    """One HTTP/1.1 keep-alive connection: httptools parses, Fake answers; writes are timed with call_at."""

    def __init__(self, fake: Fake) -> None:
        self.fake = fake
        self.loop = asyncio.get_running_loop()
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None  # None once the client has gone: timers then write nothing
        self.url = b""
        self.body: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not asyncio's subclasses

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if self.transport is not None:
                self.transport.close()

    def on_message_begin(self) -> None:
        self.url, self.body = b"", []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        method = self.parser.get_method()
        self.fake.handle(self, method, self.url.split(b"?", 1)[0], b"".join(self.body))

    def write(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    def later(self, when: float, data: bytes) -> None:
        self.loop.call_at(when, self.write, data)  # uvloop fires equal times in the order they were set


async def serve(fake: Fake, port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Connection(fake), "127.0.0.1", port, backlog=4096)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--models", required=True, help='JSON: {"<model>": {behaviour}, ...}')
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        uvloop.run(serve(Fake(orjson.loads(args.models)), args.port))


if __name__ == "__main__":
    main()

"""A TCP proxy in front of the real Redis that can hold back Redis' answers to chosen commands, for tests that need
a Redis round trip to last exactly as long as they say (a slow Redis, deterministically).

    proxy = HoldingProxy(("127.0.0.1", 6379))      # runs in a thread of its own, on a free port of 127.0.0.1
    proxy.hold(b"mom:cache:a:")                     # the answers to GETs of keys like this are held
    wait_until(lambda: proxy.held >= 1)             # a command was sent to Redis, its answer is waiting here
    proxy.release()                                 # every held answer goes on, and nothing more is held

The command itself reaches Redis at once (it is executed: a GET reads the key as it is then); only the answer
waits. redis-py sends one command per connection at a time, so the next answer on a connection that sent a
marked command is that command's. `hold(..., command=b"SET", before=True)` holds the command itself instead: it
reaches Redis only when released, and never if its client has gone by then (as a command lost with its client).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading


class HoldingProxy:
    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.held = 0  # answers held so far (since the last `hold`)
        self._marker: bytes | None = None
        self._command = b""
        self._before = False  # hold the marked commands themselves, not their answers
        self._loop = asyncio.new_event_loop()
        self._released: asyncio.Event | None = None
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = int(sock.getsockname()[1])
        self._server: asyncio.Server | None = None
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(sock, ready), name="redis-proxy", daemon=True)
        self._thread.start()
        ready.wait(5)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def _run(self, sock: socket.socket, ready: threading.Event) -> None:
        asyncio.set_event_loop(self._loop)

        async def start() -> None:
            self._released = asyncio.Event()
            self._server = await asyncio.start_server(self._connection, sock=sock)

        self._loop.run_until_complete(start())
        ready.set()
        self._loop.run_forever()

    def hold(self, marker: bytes, command: bytes = b"GET", *, before: bool = False) -> None:
        """From now on, hold the answers to the `command`s (GET) whose bytes contain `marker` (with `before`: the
        commands themselves), until `release`."""

        def arm() -> None:
            assert self._released is not None
            self.held = 0
            self._released.clear()
            self._marker, self._command = marker, b"\r\n" + command + b"\r\n"  # as RESP spells a command
            self._before = before

        self._loop.call_soon_threadsafe(arm)

    def release(self) -> None:
        """Send on every held answer; hold nothing more."""

        def disarm() -> None:
            assert self._released is not None
            self._marker = None
            self._released.set()

        self._loop.call_soon_threadsafe(disarm)

    def close(self) -> None:
        async def stop() -> None:
            if self._server is not None:
                self._server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    async def _connection(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            redis_reader, redis_writer = await asyncio.open_connection(*self.target)
        except OSError:
            client_writer.close()
            return
        to_hold = 0  # answers still to hold on this connection (one per marked command)

        async def commands() -> None:
            nonlocal to_hold
            assert self._released is not None
            while data := await client_reader.read(65536):
                if self._marker is not None and self._marker in data and self._command in data:
                    if self._before:
                        self.held += 1
                        await self._released.wait()
                        if client_writer.transport.is_closing():
                            return  # its client is gone: the command is lost with it
                    else:
                        to_hold += 1
                redis_writer.write(data)
                await redis_writer.drain()

        async def answers() -> None:
            nonlocal to_hold
            assert self._released is not None
            while data := await redis_reader.read(65536):
                if to_hold and self._marker is not None:
                    to_hold = 0
                    self.held += 1
                    await self._released.wait()
                to_hold = 0
                client_writer.write(data)
                await client_writer.drain()

        pumps = [asyncio.ensure_future(commands()), asyncio.ensure_future(answers())]
        try:
            with contextlib.suppress(Exception):
                await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pump in pumps:
                pump.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            for writer in (client_writer, redis_writer):
                with contextlib.suppress(Exception):
                    writer.close()

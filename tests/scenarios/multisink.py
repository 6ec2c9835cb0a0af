"""A minimal SMTP receiver on one or many loopback ports (ephemeral), in a thread.

For tests that need many distinct sites ([delivery] routes to "[127.0.0.1]:port") or one
sink that keeps every message's bytes: every port accepts everything with 250. Bounded:
a line of at most 64 KiB, a message of at most 8 MiB, 30 s per read.
"""
from __future__ import annotations

import asyncio
import threading
import time


class MultiSink:
    def __init__(self, ports: int = 1):
        self.messages: list[tuple[int, str, list[str], bytes]] = []   # (port, from, rcpts, data)
        self.lock = threading.Lock()
        self.loop = asyncio.new_event_loop()
        self.ports: list[int] = []
        self._servers: list[asyncio.base_events.Server] = []
        ready = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(ports, ready), daemon=True)
        self.thread.start()
        assert ready.wait(10)

    def _run(self, n: int, ready: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        for _ in range(n):
            server = self.loop.run_until_complete(
                asyncio.start_server(self._session, "127.0.0.1", 0, limit=1 << 16))
            self._servers.append(server)
            self.ports.append(server.sockets[0].getsockname()[1])
        ready.set()
        self.loop.run_forever()

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        port = writer.get_extra_info("sockname")[1]
        sender, rcpts = "", []
        try:
            writer.write(b"220 sink ESMTP\r\n")
            while True:
                line = await asyncio.wait_for(reader.readline(), 30)
                if not line:
                    return
                verb = line[:4].upper()
                if verb in (b"EHLO", b"HELO"):
                    writer.write(b"250-sink\r\n250 8BITMIME\r\n")
                elif verb == b"MAIL":
                    sender, rcpts = line[10:].strip().strip(b"<>").decode(), []
                    writer.write(b"250 ok\r\n")
                elif verb == b"RCPT":
                    rcpts.append(line[8:].strip().split(b" ")[0].strip(b"<>").decode())
                    writer.write(b"250 ok\r\n")
                elif verb == b"DATA":
                    writer.write(b"354 go\r\n")
                    await writer.drain()
                    data = await self._data(reader)
                    with self.lock:
                        self.messages.append((port, sender, rcpts, data))
                    writer.write(b"250 2.0.0 queued\r\n")
                elif verb == b"QUIT":
                    writer.write(b"221 bye\r\n")
                    await writer.drain()
                    return
                else:   # RSET, NOOP, ...
                    writer.write(b"250 ok\r\n")
                await writer.drain()
        except (TimeoutError, ConnectionError, asyncio.LimitOverrunError, ValueError):
            return
        finally:
            writer.close()

    async def _data(self, reader: asyncio.StreamReader) -> bytes:
        lines, size = [], 0
        while True:
            line = await asyncio.wait_for(reader.readline(), 30)
            if not line or line == b".\r\n":
                return b"".join(lines)
            size += len(line)
            if size > 8 << 20:
                raise ValueError("message too large")
            lines.append(line[1:] if line.startswith(b"..") else line)

    def wait(self, n: int, timeout: float = 30.0) -> list:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if len(self.messages) >= n:
                    return list(self.messages)
            time.sleep(0.05)
        raise AssertionError(f"got {len(self.messages)} messages at the sink, want {n}")

    def close(self) -> None:
        async def stop() -> None:
            for s in self._servers:
                s.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()

"""Buffered JSONL log writer.

Records are serialised with orjson into a buffer and written to the file at
most every `flush_interval` seconds or when the buffer grows past 256 KiB,
so logging costs one write() per batch, not per message. Logs are not the
durability record (the spool is), so they are not fsync'd per batch; close()
fsyncs. File: <log directory>/<name>.jsonl, appended.
"""
from __future__ import annotations

import asyncio
import os
import time

import orjson

from mta.logs.records import RecordType

_FLUSH_AT = 256 << 10


class LogWriter:
    def __init__(self, directory: str, name: str = "mta", flush_interval: float = 0.2):
        os.makedirs(directory, exist_ok=True)
        self.path = os.path.join(directory, f"{name}.jsonl")
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        self._buf = bytearray()
        self._interval = flush_interval
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def log(self, rtype: RecordType, **fields: object) -> None:
        fields["type"] = rtype.value
        fields.setdefault("time", time.time())
        self._buf += orjson.dumps(fields)
        self._buf += b"\n"
        if len(self._buf) >= _FLUSH_AT:
            self.flush()
        elif self._timer is None:
            # get_running_loop() checks getpid() on every call: look it up once
            if self._loop is None:
                try:
                    self._loop = asyncio.get_running_loop()
                except RuntimeError:
                    self.flush()
                    return
            self._timer = self._loop.call_later(self._interval, self.flush)

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._buf:
            return
        data = bytes(self._buf)  # a copy, so the bytearray stays resizable
        self._buf.clear()
        while data:
            data = data[os.write(self._fd, data):]

    def close(self) -> None:
        if self._fd < 0:
            return
        self.flush()
        os.fsync(self._fd)
        os.close(self._fd)
        self._fd = -1

"""Batches DKIM signing requests made during one loop iteration into one native call.

Callers (dispatcher connections, reception) ask `sign(content, specs)` and get
a future; the first request of an iteration schedules a flush with
call_soon, so every request of that iteration goes to the signer's thread
pool in one sign_batch() with the GIL released (uvloop's queued-writes idea,
STYLE.md 11). The future resolves to the signed message, or raises DkimError
for a message that cannot be signed.
"""
from __future__ import annotations

import asyncio
from typing import Sequence

from mta.dkim.signer import DkimError, SignSpec, Signer


class SigningBatcher:
    def __init__(self, signer: Signer, loop: asyncio.AbstractEventLoop):
        self.signer = signer
        self.loop = loop
        self._messages: list[bytes] = []
        self._specs: list[Sequence[SignSpec]] = []
        self._futures: list[asyncio.Future] = []
        self.batches = 0
        self.signed = 0

    def sign(self, content: bytes, specs: Sequence[SignSpec]) -> asyncio.Future:
        fut = self.loop.create_future()
        if not self._messages:
            self.loop.call_soon(self._flush)
        self._messages.append(content)
        self._specs.append(specs)
        self._futures.append(fut)
        return fut

    def _flush(self) -> None:
        messages, specs, futures = self._messages, self._specs, self._futures
        self._messages, self._specs, self._futures = [], [], []
        task = self.loop.create_task(self.signer.sign_batch_async(messages, specs))
        task.add_done_callback(lambda t: self._deliver(t, futures))

    def _deliver(self, task: asyncio.Task, futures: list[asyncio.Future]) -> None:
        self.batches += 1
        if task.exception() is not None:      # a bug in the signer: fail the batch, not the loop
            for fut in futures:
                if not fut.done():
                    fut.set_exception(DkimError("internal", repr(task.exception())))
            return
        for fut, result in zip(futures, task.result()):
            if fut.done():
                continue
            if isinstance(result, DkimError):
                fut.set_exception(result)
            else:
                self.signed += 1
                fut.set_result(result)

"""Batches DKIM signing requests made during one loop iteration into one native call.

Callers (dispatcher connections, reception) ask `sign(content, specs)` and get
a future; the first request of an iteration schedules a flush with
call_soon, so every request of that iteration goes to the signer's thread
pool in one sign_batch() with the GIL released (uvloop's queued-writes idea,
STYLE.md 11): small batches from the loop thread itself, big ones from an
executor thread so the loop keeps serving. The future resolves to the signed message, or raises DkimError
for a message that cannot be signed.
"""
from __future__ import annotations

import asyncio
from typing import Sequence

from mta.dkim.signer import DkimError, SignSpec, Signer

# A batch whose estimated cost is below INLINE_US is signed on the loop thread:
# cheaper than an executor hop. Costs per signature on this kind of machine
# (bench/dkim_bench.py, one core): RSA-2048 ~330 us, Ed25519 ~45 us, hashing
# ~0.5 us per KB. RSA batches therefore always go to the executor.
INLINE_US = 300.0
_SIGN_US = {"rsa-sha256": 330.0, "ed25519-sha256": 45.0}


def _cost_us(messages: list[bytes], specs: list[Sequence[SignSpec]]) -> float:
    return sum(len(m) / 2048 + sum(_SIGN_US.get(s.key.algorithm, 330.0) for s in sp)
               for m, sp in zip(messages, specs))


class SigningBatcher:
    def __init__(self, signer: Signer, loop: asyncio.AbstractEventLoop):
        self.signer = signer
        self.loop = loop
        self._messages: list[bytes] = []
        self._specs: list[Sequence[SignSpec]] = []
        self._futures: list[asyncio.Future] = []
        self.batches = 0
        self.signed = 0
        self.errors = 0             # messages that could not be signed (/metrics)

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
        if _cost_us(messages, specs) <= INLINE_US:
            # Small batch: sign right here (the native pool still spreads it over its
            # threads, GIL released); an executor hop would cost more than the signing.
            try:
                results = self.signer.sign_batch(messages, specs)
            except Exception as exc:  # a bug in the signer: fail the batch, not the loop
                self._fail(futures, exc)
                return
            self._resolve(futures, results)
            return
        task = self.loop.create_task(self.signer.sign_batch_async(messages, specs))
        task.add_done_callback(lambda t: self._deliver(t, futures))

    def _deliver(self, task: asyncio.Task, futures: list[asyncio.Future]) -> None:
        if task.exception() is not None:      # a bug in the signer: fail the batch, not the loop
            self._fail(futures, task.exception())
            return
        self._resolve(futures, task.result())

    def _fail(self, futures: list[asyncio.Future], exc: BaseException | None) -> None:
        for fut in futures:
            if not fut.done():
                fut.set_exception(DkimError("internal", repr(exc)))

    def _resolve(self, futures: list[asyncio.Future], results: list) -> None:
        self.batches += 1
        for fut, result in zip(futures, results):
            if fut.done():
                continue
            if isinstance(result, DkimError):
                self.errors += 1
                fut.set_exception(result)
            else:
                self.signed += 1
                fut.set_result(result)

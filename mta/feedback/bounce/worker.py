"""Returned mail parsed in child processes, with a time, size and memory budget per message.

Why a process: the parser reads mail anyone may send to the bounce domain. Its
scans are linear (tests/test_bounce_linear.py), but only a process boundary
also bounds what nobody foresaw, an operator's catastrophic rule regex
included: a child that overruns `timeout` is killed and replaced, its address
space is capped (RLIMIT_AS, `memory`), and a crash in it costs one message, not
the daemon. The event loop only writes the message to a pipe and reads the
verdict back.

Size: a message longer than `max_size` is parsed on its first `max_size` bytes
(`Parsed.truncated`): a DSN, an ARF report or a text bounce states its
recipients and status before the returned original, which is the part that
grows, so a long original still gets its verdict while the parse cost stays
bounded by max_size.

Wire format, both ways over the child's stdin/stdout: a 4-byte big-endian
length, then the payload; the request is the message, the reply is JSON of the
Report (plain values only: the child handles hostile input, so nothing it sends
is unpickled).
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Sequence

import email.message

from .report import FailedRecipient, Feedback, Report

__all__ = ["Parsed", "ParserPool"]

log = logging.getLogger("mta.feedback.bounce.worker")

_MAX_REPLY = 64 << 20            # a reply larger than this is a broken child
_HEADER_FIELDS = 500             # fields of the returned original's header sent back...
_HEADER_CHARS = 8192             # ...and characters of each


@dataclass(slots=True)
class Parsed:
    """What a parse came to: a report, or the budget it ran over ("time", "memory", "crash")."""

    report: Report | None
    unparsed: str | None = None
    truncated: bool = False


# -- Report <-> plain values -----------------------------------------------------------

def _text(value: Any) -> Any:
    # header values from the email package may carry surrogate escapes; JSON must not
    if isinstance(value, str):
        return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return value


def encode_report(rep: Report) -> dict:
    out: dict[str, Any] = {f.name: _text(getattr(rep, f.name)) for f in fields(Report)
                           if f.name not in ("recipients", "feedback", "original_headers")}
    out["recipients"] = [{f.name: _text(getattr(r, f.name)) for f in fields(FailedRecipient)}
                         for r in rep.recipients]
    out["feedback"] = None if rep.feedback is None else {
        f.name: _text(getattr(rep.feedback, f.name)) for f in fields(Feedback)}
    out["original_headers"] = None if rep.original_headers is None else [
        [_text(k), _text(str(v))[:_HEADER_CHARS]] for k, v in rep.original_headers.items()[:_HEADER_FIELDS]]
    return out


def decode_report(doc: dict) -> Report:
    rcpt_names = {f.name for f in fields(FailedRecipient)}
    fb_names = {f.name for f in fields(Feedback)}
    rep = Report(**{f.name: doc[f.name] for f in fields(Report)
                    if f.name in doc and f.name not in ("recipients", "feedback", "original_headers")})
    rep.recipients = [FailedRecipient(**{k: v for k, v in r.items() if k in rcpt_names})
                      for r in doc.get("recipients") or []]
    if doc.get("feedback") is not None:
        rep.feedback = Feedback(**{k: v for k, v in doc["feedback"].items() if k in fb_names})
    if doc.get("original_headers") is not None:
        msg = email.message.Message()
        for name, value in doc["original_headers"]:
            msg[name] = value
        rep.original_headers = msg
    return rep


# -- the parent's side -------------------------------------------------------------------

class _BadReply(Exception):
    """The child answered something that is not a reply of ours."""


_READY = b"RDY1"        # the child's first bytes: started, rules loaded
_START_TIMEOUT = 60.0    # seconds a child may take to start (not a parse budget)


class _Worker:
    """One child process; requests are strictly one at a time."""

    def __init__(self, proc: asyncio.subprocess.Process):
        self.proc = proc

    @classmethod
    async def spawn(cls, settings: dict) -> "_Worker":
        env = dict(os.environ)
        # the child imports this very package, wherever the daemon was started from
        root = str(Path(__file__).resolve().parents[3])
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", "from mta.feedback.bounce.worker import child_main; child_main()", json.dumps(settings),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, env=env)
        # The child says it is ready before the first request, so a start-up slowed by a
        # loaded machine (interpreter, email package, rule files) never counts against a
        # message's parse budget.
        assert proc.stdout is not None
        try:
            hello = await asyncio.wait_for(proc.stdout.readexactly(len(_READY)), _START_TIMEOUT)
        except (asyncio.TimeoutError, asyncio.IncompleteReadError):
            hello = b""
        if hello != _READY:
            worker = cls(proc)
            await worker.kill()
            raise OSError(f"bounce parser process did not start (exit status {proc.returncode})")
        return cls(proc)

    async def request(self, data: bytes) -> dict:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(len(data).to_bytes(4, "big") + data)
        await self.proc.stdin.drain()
        size = int.from_bytes(await self.proc.stdout.readexactly(4), "big")
        if size > _MAX_REPLY:
            raise _BadReply(f"reply of {size} bytes")
        return json.loads(await self.proc.stdout.readexactly(size))

    async def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
        await self.proc.wait()

    async def close(self) -> None:
        """Let the child see end of input and exit; kill it if it does not."""
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            await asyncio.wait_for(self.proc.wait(), 2.0)
        except asyncio.TimeoutError:
            await self.kill()


class ParserPool:
    """`workers` child processes; `parse()` waits for a free one (at most `workers`
    messages are held in memory for parsing at once)."""

    def __init__(self, rule_files: Sequence[Path] = (), *, workers: int = 1, timeout: float = 10.0,
                 max_size: int = 1 << 20, memory: int = 512 << 20, policy_hard: Sequence[str] = ()):
        self.timeout = timeout
        self.max_size = max_size
        self.settings = {"rules": [str(p) for p in rule_files], "policy_hard": list(policy_hard), "memory": memory,
                         "timeout": timeout, "parent": os.getpid()}
        self._idle: asyncio.Queue[_Worker | None] = asyncio.Queue()
        for _ in range(workers):
            self._idle.put_nowait(None)      # spawned on first use
        self._busy: set[_Worker] = set()
        self.replaced = 0                    # children killed or lost and replaced

    async def parse(self, data: bytes) -> Parsed:
        truncated = len(data) > self.max_size
        if truncated:
            data = data[:self.max_size]
        worker = await self._idle.get()
        try:
            if worker is None:
                worker = await _Worker.spawn(self.settings)
            self._busy.add(worker)
            try:
                doc = await asyncio.wait_for(worker.request(data), self.timeout)
                if "report" in doc:
                    return Parsed(decode_report(doc["report"]), truncated=truncated)
                if "unparsed" in doc:      # over budget inside the child (memory), which lives on
                    return Parsed(None, str(doc["unparsed"]), truncated)
                raise _BadReply(f"reply without a report: {str(doc)[:80]}")
            except asyncio.TimeoutError:
                reason = "time"
            except (_BadReply, asyncio.IncompleteReadError, ConnectionError, ValueError, TypeError,
                    KeyError, AttributeError) as exc:
                log.warning("bounce parser process failed (%s, exit status %s)", exc, worker.proc.returncode)
                reason = "crash"
            self._busy.discard(worker)
            await worker.kill()
            self.replaced += 1
            worker = None
            return Parsed(None, reason, truncated)
        except BaseException:
            # cancelled (shutdown) mid-request: the child's state is unknown
            if worker is not None:
                self._busy.discard(worker)
                await asyncio.shield(worker.kill())
                worker = None
            raise
        finally:
            if worker is not None:
                self._busy.discard(worker)
            self._idle.put_nowait(worker)

    async def close(self) -> None:
        for w in list(self._busy):
            await w.kill()
        while not self._idle.empty():
            w = self._idle.get_nowait()
            if w is not None:
                await w.close()


# -- the child's side --------------------------------------------------------------------

def child_main() -> None:
    """The child process: parse each message read from stdin, answer on stdout."""
    import resource
    import signal

    from . import Classifier, RulesError, parse_message

    settings = json.loads(sys.argv[1])
    signal.signal(signal.SIGINT, signal.SIG_IGN)    # the daemon decides when we stop
    _die_with_parent()
    if os.getppid() != settings["parent"]:
        return                                       # (it died before we asked)
    classifier = Classifier([Path(p) for p in settings["rules"]], settings.get("policy_hard", ()))
    if settings.get("memory"):
        resource.setrlimit(resource.RLIMIT_AS, (settings["memory"], settings["memory"]))
    inp, out = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr                          # a stray print must not corrupt the replies
    out.write(_READY)
    out.flush()
    while True:
        head = inp.read(4)
        if len(head) < 4:
            return                                   # the daemon closed the pipe (or died)
        try:
            data = inp.read(int.from_bytes(head, "big"))
        except MemoryError:
            # the message does not even fit our budget: say so, and stop (the rest of it is
            # still in the pipe; the pool starts a fresh child)
            body = b'{"unparsed": "memory"}'
            out.write(len(body).to_bytes(4, "big") + body)
            out.flush()
            return
        # CPU backstop: should the daemon be gone and unable to kill an overrunning
        # parse, the kernel ends it (SIGXCPU) a little after twice the time budget
        used = resource.getrusage(resource.RUSAGE_SELF)
        resource.setrlimit(resource.RLIMIT_CPU, (int(used.ru_utime + used.ru_stime + 2 * settings["timeout"]) + 2,
                                                 resource.RLIM_INFINITY))
        try:
            try:
                classifier.reload_if_changed()
            except RulesError:
                pass                                 # logged by the classifier; old rules kept
            reply: dict = {"report": encode_report(parse_message(data, classifier))}
        except MemoryError:
            reply = {"unparsed": "memory"}
        del data
        body = json.dumps(reply).encode()
        out.write(len(body).to_bytes(4, "big") + body)
        out.flush()


def _die_with_parent() -> None:
    """Linux: SIGKILL when the daemon exits (PR_SET_PDEATHSIG), even mid-parse."""
    import ctypes
    import signal
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))
    except (OSError, AttributeError):
        pass      # elsewhere the CPU backstop and end of input stop an orphan


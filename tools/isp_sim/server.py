"""The simulator process: one asyncio loop serving every provider's MX addresses, the
event log, the ARF mailer and the HTTP endpoint.

    sim = Simulator(config.load("providers.toml", day_seconds=60), events="out.jsonl",
                    http="127.0.0.1:0")
    sim.start_thread()         # or: asyncio.run(sim.serve()) in a process of its own
    ...  sim.stats() ...
    sim.stop()

HTTP (GET only, except the clock): /stats (JSON, model.Model.stats), /zone (the DNS
records, one per line), /events?after=N (event lines after the N-th, at most 10000);
POST /clock?advance=SECONDS moves simulated time forward when clock control is on.
"""
from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from . import arf
from .config import Config, Provider, zone_records
from .model import Clock, Model
from .smtp import MAX_LINE, Session
from .tls import self_signed_context

MAX_EVENTS_KEPT = 100_000     # events held in memory for /events and tests


class Simulator:
    def __init__(self, cfg: Config, *, events: str | Path | None = None, http: str | None = None,
                 manual_clock: bool = False, clock_control: bool = False) -> None:
        self.cfg = cfg
        self.clock = Clock(cfg.day_seconds, manual=manual_clock)
        self.model = Model(cfg, self.clock)
        names = list(dict.fromkeys(m.name for p in cfg.providers.values() for m in p.mx))
        self.tls_context = self_signed_context(names) if cfg.tls else None
        self.events_path = Path(events) if events else None
        self.http_spec = http
        self.http_port = 0
        self.clock_control = clock_control or manual_clock
        self.recent: list[dict] = []           # the last MAX_EVENTS_KEPT events
        self.event_count = 0
        self.arf_sent = 0
        self.arf_failed = 0
        self._events_file = None
        self._mailer: arf.Mailer | None = None
        self._servers: list[asyncio.AbstractServer] = []
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    # --- what sessions call ------------------------------------------------------------------

    def event(self, **fields: object) -> None:
        now = self.clock.now()
        rec = {"t": round(time.time(), 3), "sim": round(now, 1), "day": int(now // 86400), **fields}
        self.event_count += 1
        self.recent.append(rec)
        if len(self.recent) > MAX_EVENTS_KEPT:
            del self.recent[: MAX_EVENTS_KEPT // 10]
        if self._events_file is not None:
            self._events_file.write(json.dumps(rec, separators=(",", ":")) + "\n")

    def complain(self, provider: Provider, source: str, sender: str, rcpt: str, content: bytes) -> None:
        """A recipient marked the message as spam: mail an ARF report if this provider runs a
        feedback loop and a destination is configured."""
        meta = {"source": source, "provider": provider.name, "sender": sender, "rcpt": rcpt}
        if not (provider.arf and self._mailer and self.cfg.fbl_to):
            self.event(stage="complaint", outcome="no_report", reason="", reply="", **meta)
            return
        reporter = f"feedback@{provider.domains[0]}"
        data = arf.build(reporter=reporter, to=self.cfg.fbl_to, source=source, mail_from=sender, rcpt=rcpt,
                         headers=content, arrival=time.time())
        self._mailer.submit(meta, reporter, self.cfg.fbl_to, data, provider.mx[0].address)

    def _arf_done(self, meta: dict, error: str) -> None:
        if error:
            self.arf_failed += 1
        else:
            self.arf_sent += 1
        self.event(stage="arf", outcome="failed" if error else "sent", reason=error, reply="", **meta)

    # --- serving -----------------------------------------------------------------------------

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        local = writer.get_extra_info("sockname")[0]
        provider = self.cfg.provider_at(local)
        try:
            if provider is not None:
                mx = next(m.name for m in provider.mx if m.address == local)
                await Session(self, reader, writer, provider, mx).run()
        except (OSError, asyncio.IncompleteReadError):      # resets, TLS errors: the client's loss
            pass
        finally:
            writer.close()
            try:
                await writer.wait_closed()
            except (ConnectionError, OSError):
                pass

    async def _http(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            method, target = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ")[:2]
            status, body, ctype = self._route(method, target)
        except (asyncio.LimitOverrunError, asyncio.IncompleteReadError, TimeoutError, ValueError,
                ConnectionError):
            status, body, ctype = "400 Bad Request", b"bad request\n", "text/plain"
        try:
            writer.write(f"HTTP/1.0 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                         f"Connection: close\r\n\r\n".encode() + body)
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    def _route(self, method: str, target: str) -> tuple[str, bytes, str]:
        url = urlsplit(target)
        query = parse_qs(url.query)
        if method == "GET" and url.path == "/stats":
            return "200 OK", json.dumps(self.stats_now()).encode(), "application/json"
        if method == "GET" and url.path == "/zone":
            return "200 OK", ("\n".join(zone_records(self.cfg)) + "\n").encode(), "text/plain"
        if method == "GET" and url.path == "/events":
            after = int(query.get("after", ["0"])[0])
            first = self.event_count - len(self.recent)
            chunk = self.recent[max(0, after - first):][:10000]
            return "200 OK", "".join(json.dumps(e) + "\n" for e in chunk).encode(), "application/x-ndjson"
        if method == "POST" and url.path == "/clock":
            if not self.clock_control:
                return "403 Forbidden", b"clock control is off (--clock-control)\n", "text/plain"
            self.clock.advance(float(query.get("advance", ["0"])[0]))
            return "200 OK", json.dumps({"sim_time": self.clock.now()}).encode(), "application/json"
        return "404 Not Found", b"not found\n", "text/plain"

    def stats_now(self) -> dict:
        out = self.model.stats()
        out["arf"] = {"sent": self.arf_sent, "failed": self.arf_failed,
                      "dropped": self._mailer.dropped if self._mailer else 0}
        out["events"] = self.event_count
        return out

    async def serve(self, ready=None) -> None:
        """Listen on every MX address (and the HTTP endpoint) until stop()."""
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        if self.events_path is not None:
            self._events_file = open(self.events_path, "a", buffering=1)
        if self.cfg.fbl_host and self.cfg.fbl_to:
            self._mailer = arf.Mailer(self.cfg.fbl_host, self._arf_done)
            self._mailer.start()
        try:
            for address in self.cfg.addresses():
                self._servers.append(await asyncio.start_server(
                    self._session, address, self.cfg.port, limit=MAX_LINE, reuse_address=True))
            if self.http_spec:
                host, _, port = self.http_spec.rpartition(":")
                srv = await asyncio.start_server(self._http, host, int(port), limit=8192)
                self.http_port = srv.sockets[0].getsockname()[1]
                self._servers.append(srv)
            if ready is not None:
                ready()
            await self._stop.wait()
        finally:
            for srv in self._servers:
                srv.close()
            for srv in self._servers:
                try:
                    await asyncio.wait_for(srv.wait_closed(), 2)
                except TimeoutError:
                    pass
            self._servers.clear()
            if self._mailer is not None:
                await self._mailer.stop()
            if self._events_file is not None:
                self._events_file.close()
                self._events_file = None

    def request_stop(self) -> None:
        """From inside the loop (a signal handler): end serve()."""
        if self._stop is not None:
            self._stop.set()

    # --- in-process use (tests) -------------------------------------------------------------

    def start_thread(self, timeout: float = 10.0) -> Simulator:
        def run() -> None:
            try:
                asyncio.run(self.serve(ready=self._ready.set))
            except BaseException as e:       # reported to start_thread's caller
                self._error = e
                self._ready.set()

        self._thread = threading.Thread(target=run, name="isp-sim", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout) or self._error is not None:
            raise RuntimeError(f"isp simulator did not start: {self._error!r}")
        return self

    def _call(self, fn, *args):
        """Run fn in the simulator's loop and return its result (thread mode)."""
        if self._loop is None or self._thread is None:
            return fn(*args)

        async def call():
            return fn(*args)
        return asyncio.run_coroutine_threadsafe(call(), self._loop).result(10)

    def stats(self) -> dict:
        return self._call(self.stats_now)

    def advance(self, seconds: float) -> None:
        self._call(self.clock.advance, seconds)

    def events(self) -> list[dict]:
        return self._call(lambda: list(self.recent))

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self.request_stop)
            self._thread.join(15)
            self._thread = None

    def __enter__(self) -> Simulator:
        return self.start_thread()

    def __exit__(self, *exc: object) -> None:
        self.stop()

"""POST /inject: a message for one or many recipients over HTTP (operator token).

Bodies:
  application/json   {"from": "a@example.com", "recipients": ["b@example.org", ...]
                      or [{"email": "b@example.org", "substitutions": {"name": "Bo"}}, ...],
                      one of
                        "raw": "<RFC 5322 text>" | "raw_base64": "<base64 RFC 5322>"
                      or the structured parts
                        "subject", "text", "html" (at least one of text/html),
                        "headers": {"Name": "value"}, "to": "shown To (template)",
                        "substitutions": {defaults for every recipient},
                      and optional "tenant", "campaign", "class"}
  message/rfc822     the raw message; from, to (repeated), tenant, campaign, class in the
                     query string

Raw content goes to every recipient as one message (one spool record, as SMTP would
store one transaction). A structured message with `{{name}}` placeholders (in subject,
text, html, to and header values) is built once per recipient with that recipient's
values over the defaults (values HTML-escaped in html; a placeholder with no value is a
400 naming it); without placeholders it is one message for all recipients. Substitution
is one left-to-right pass over the template (no value is scanned again) and every result
is bounded by [admin] inject_max_template; all messages of one request together by four
times [admin] inject_max_size.

The envelope is built by Reception.new_envelope as for SMTP: our Received header
("with HTTP"), listener "http-inject", protocol "HTTP", the X-headers reception reads
(tenant, campaign, class, egress-rule headers) from the content, then "tenant",
"campaign" and "class" given in the request over them. Suppressed recipients are taken
out as reception does after DATA (a Suppressed record each, listed in the answer); when
none is left the answer is 422. Sealed recipients (`[privacy] keyring`, mta/model/sealed.py)
that claim the sealed format but do not open with the keyring (unknown key id, tampered,
bad base64) are refused one by one, as SMTP refuses them at RCPT (550 5.1.3): listed in
the answer's "refused" with the reason, the others go on; none left: 422. DKIM at reception (signing.stage = "reception") signs
here too. The answer comes once every message of the request is durable (SMTP's 250):
200 {"messages": [{"id", "recipients", "status"}], "suppressed": [...], "refused": [...]}. Refusals: 400 naming the
problem, 413 (body over inject_max_size), 503 (queue full, memory budget, a failed spool
write, DKIM deferral: retry later; Retry-After) and 507 (spool disk space), with the
reason as at SMTP (452 4.3.1 and friends).

Content scanning ([[scan]] tables, mta/ingest/scan.py) runs as at SMTP reception, per
message and by its tenant (the request's over the header), before DKIM signing, through
the same Scanning.judge (same actions, records and fail policy). Each message's "status"
says what became of it: "queued", "held" (an operator hold on its id), "dropped" (a
Scanned record, nothing stored), "rejected" or "deferred" with "error" holding the SMTP
reply reception would have sent (550 5.7.1 / 451 4.7.1 when the scanner is down and
fail = "closed"). The answer is 200 when any message was stored or dropped; when every
message was refused, 503 (Retry-After) if any was deferred, else 422, with the same list.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import html
import re
import time
from email.errors import MessageError
from email.utils import formatdate, make_msgid
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

import orjson
from aiohttp import web

from mta.control.body import BodyTooLarge, read_bounded
from mta.dkim.signer import DkimError
from mta.model.envelope import Recipient
from mta.model.log_records import RecordType
from mta.model.replies import REPLIES
from mta.model.sealed import Unsealable
from mta.spool import SpoolError

if TYPE_CHECKING:
    from mta.ingest.reception import Reception
    from mta.ingest.scan import Verdict

LISTENER, PROTOCOL = "http-inject", "HTTP"
_PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z0-9_.-]{1,64})\s*\}\}")
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_HEADER_NAME = re.compile(r"[!-9;-~]{1,76}")          # RFC 5322 ftext
_ADDRESS = re.compile(r"[^\s<>()\[\],;:\"\\@]{1,64}@[^\s<>()\[\],;:\"\\@]{1,253}")
_MAX_VALUE = 64 << 10     # one substitution value
_MAX_FIELD = 998          # a header value after substitution (one line, RFC 5322 2.1.1)
_RESERVED = frozenset({"from", "to", "subject", "date", "message-id", "mime-version",
                       "content-type", "content-transfer-encoding"})


def _fate(env: Any, v: Verdict) -> dict:
    """The answer's entry for a message the content scan did not let in."""
    entry = {"id": env.id, "recipients": [r.address for r in env.recipients]}
    if v.action == "drop":   # recorded (Scanned), never stored
        return {**entry, "status": "dropped"}
    return {**entry, "status": "rejected" if v.action == "reject" else "deferred",
            "error": v.refusal.decode("ascii").strip() if v.refusal else v.reason}


class Refused(Exception):
    """An HTTP answer other than 200: status and text."""

    def __init__(self, status: int, text: str, headers: dict[str, str] | None = None):
        super().__init__(text)
        self.status, self.text, self.headers = status, text, headers


def _error(status: int, text: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, body=orjson.dumps({"error": text}),
                        content_type="application/json", headers=headers)


def substitute(template: str, values: dict[str, str], limit: int, *, escape: bool = False,
               where: str = "template") -> str:
    """`template` with each {{name}} replaced by values[name] (HTML-escaped with `escape`):
    one pass, the result at most `limit` characters; ValueError names what is wrong."""
    out: list[str] = []
    size = 0
    pos = 0
    for m in _PLACEHOLDER.finditer(template):
        name = m.group(1)
        value = values.get(name)
        if value is None:
            raise ValueError(f"{where}: no value for {{{{{name}}}}}")
        if escape:
            value = html.escape(value, quote=True)
        lit = template[pos:m.start()]
        size += len(lit) + len(value)
        if size > limit:
            raise ValueError(f"{where}: more than {limit} characters after substitution")
        out.append(lit)
        out.append(value)
        pos = m.end()
    rest = template[pos:]
    if size + len(rest) > limit:
        raise ValueError(f"{where}: more than {limit} characters after substitution")
    out.append(rest)
    return "".join(out)


def _crlf(data: bytes) -> bytes:
    """Line ends as CRLF (a text body may come with bare LF)."""
    if b"\n" not in data:
        return data
    return data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def _address(value: Any, what: str, *, empty: bool = False) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a string (an address)")
    if empty and value == "":
        return value
    if len(value) > 320 or not _ADDRESS.fullmatch(value):
        raise ValueError(f"{what}: not an address: {value[:100]!r}")
    return value


def _label(args: dict, key: str) -> str | None:
    value = args.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value or len(value) > 200 \
            or any(c < " " or c == "\x7f" for c in value):
        raise ValueError(f'"{key}" must be a one-line string of 1 to 200 characters')
    return value


def _values(d: Any, what: str) -> dict[str, str]:
    if d is None:
        return {}
    if not isinstance(d, dict) or len(d) > 256:
        raise ValueError(f"{what} must be an object of at most 256 names")
    out = {}
    for k, v in d.items():
        if not _NAME.fullmatch(k):
            raise ValueError(f"{what}: {str(k)[:80]!r} is not a placeholder name "
                             "(1 to 64 of A-Z a-z 0-9 _ . -)")
        if isinstance(v, bool) or not isinstance(v, (str, int, float)):
            raise ValueError(f"{what}.{k} must be a string or a number")
        v = str(v)
        if len(v) > _MAX_VALUE:
            raise ValueError(f"{what}.{k} is longer than {_MAX_VALUE} characters")
        out[k] = v
    return out


class Injector:
    """The POST /inject handler over a Reception (mta/ingest/reception.py)."""

    def __init__(self, reception: Reception, *, max_size: int, max_recipients: int,
                 max_template: int):
        self.reception = reception
        self.max_size = max_size
        self.max_recipients = max_recipients
        self.max_template = max_template
        self.hostname = reception.hostname

    async def handle(self, request: web.Request) -> web.Response:
        try:
            body = await self._read(request)
            messages, sender, x_args = self._parse(request, body)
            return await self._store(request, messages, sender, x_args)
        except Refused as r:
            return _error(r.status, r.text, r.headers)

    # -- the request --------------------------------------------------------------------

    async def _read(self, request: web.Request) -> bytes:
        try:
            return await read_bounded(request.content, request.content_length, self.max_size)
        except BodyTooLarge:
            raise Refused(413, f"the request body is larger than {self.max_size} bytes "
                               "([admin] inject_max_size)", {"Connection": "close"}) from None

    def _parse(self, request: web.Request, body: bytes):
        """[(recipients, content)], sender, {tenant, campaign, queue_class}; Refused 400."""
        ctype = request.content_type
        try:
            if ctype == "message/rfc822":
                q = parse_qs(request.query_string, keep_blank_values=True, max_num_fields=
                             self.max_recipients + 16)
                args: dict[str, Any] = {k: v[0] for k, v in q.items() if k != "to"}
                args["recipients"] = q.get("to", [])
                if not body.strip():
                    raise ValueError("the message/rfc822 body is empty")
                content = _crlf(body)
            elif ctype == "application/json":
                try:
                    args = orjson.loads(body)
                except orjson.JSONDecodeError as exc:
                    raise ValueError(f"the request body is not JSON: {exc}") from None
                if not isinstance(args, dict):
                    raise ValueError("the request body must be a JSON object")
                content = None
            else:
                raise Refused(415, "send application/json or message/rfc822")
            sender = _address(args.get("from"), '"from"', empty=True)
            x_args = {"tenant": _label(args, "tenant"), "campaign": _label(args, "campaign"),
                      "queue_class": _label(args, "class")}
            rcpts = self._recipients(args.get("recipients"))
            if content is None:
                content = self._raw(args)
            if content is not None:
                return [([a for a, _ in rcpts], content)], sender, x_args
            return self._structured(args, sender, rcpts), sender, x_args
        except ValueError as exc:
            raise Refused(400, str(exc)) from None

    def _recipients(self, value: Any) -> list[tuple[str, dict[str, str]]]:
        if not isinstance(value, list) or not value:
            raise ValueError('"recipients" must be a non-empty array (or "to" in the query '
                             'string for message/rfc822)')
        if len(value) > self.max_recipients:
            raise ValueError(f"{len(value)} recipients: at most {self.max_recipients} a "
                             "request ([admin] inject_max_recipients)")
        out = []
        for i, r in enumerate(value):
            if isinstance(r, dict):
                out.append((_address(r.get("email"), f"recipients[{i}].email"),
                            _values(r.get("substitutions"), f"recipients[{i}].substitutions")))
            else:
                out.append((_address(r, f"recipients[{i}]"), {}))
        return out

    def _raw(self, args: dict) -> bytes | None:
        raw, b64 = args.get("raw"), args.get("raw_base64")
        if raw is not None and b64 is not None:
            raise ValueError('give "raw" or "raw_base64", not both')
        if raw is not None:
            if not isinstance(raw, str) or not raw.strip():
                raise ValueError('"raw" must be a non-empty string (the RFC 5322 message)')
            return _crlf(raw.encode("utf-8"))
        if b64 is not None:
            if not isinstance(b64, str):
                raise ValueError('"raw_base64" must be a string')
            try:
                data = base64.b64decode(b64, validate=True)
            except (binascii.Error, ValueError):
                raise ValueError('"raw_base64" is not valid base64') from None
            if not data.strip():
                raise ValueError('"raw_base64" holds an empty message')
            return _crlf(data)
        return None

    def _structured(self, args: dict, sender: str,
                    rcpts: list[tuple[str, dict[str, str]]]) -> list[tuple[list[str], bytes]]:
        parts = {}
        for key in ("subject", "text", "html", "to"):
            v = args.get(key)
            if v is None:
                continue
            if not isinstance(v, str):
                raise ValueError(f'"{key}" must be a string')
            if len(v) > self.max_template:
                raise ValueError(f'"{key}" is longer than {self.max_template} characters '
                                 "([admin] inject_max_template)")
            parts[key] = v
        if "text" not in parts and "html" not in parts:
            raise ValueError('a message needs "raw", "raw_base64", or "text" and/or "html"')
        headers = args.get("headers") or {}
        if not isinstance(headers, dict) or len(headers) > 100:
            raise ValueError('"headers" must be an object of at most 100 fields')
        for name, value in headers.items():
            if not _HEADER_NAME.fullmatch(name) or name.lower() in _RESERVED:
                raise ValueError(f"headers: {name[:80]!r} is not a header name we set from "
                                 "it (ftext, not From/To/Subject/Date/Message-ID/MIME)")
            if not isinstance(value, str) or len(value) > _MAX_FIELD:
                raise ValueError(f"headers.{name} must be a string of at most {_MAX_FIELD} "
                                 "characters")
        defaults = _values(args.get("substitutions"), "substitutions")
        templated = any(_PLACEHOLDER.search(t) for t in (*parts.values(), *headers.values()))
        budget = self.max_size * 4
        out: list[tuple[list[str], bytes]] = []
        if not templated:
            shown = rcpts[0][0] if len(rcpts) == 1 else "undisclosed-recipients:;"
            content = self._build(sender, parts, headers, parts.get("to") or shown)
            return [([a for a, _ in rcpts], content)]
        for i, (addr, own) in enumerate(rcpts):
            values = {**defaults, "email": addr, **own} if own else {**defaults, "email": addr}
            where = f"recipients[{i}]"
            done = {k: substitute(v, values, self.max_template, escape=(k == "html"),
                                  where=f"{where} {k}") for k, v in parts.items()}
            hdrs = {k: substitute(v, values, _MAX_FIELD, where=f"{where} header {k}")
                    for k, v in headers.items()}
            content = self._build(sender, done, hdrs, done.get("to") or addr)
            budget -= len(content)
            if budget < 0:
                raise ValueError(f"the messages of this request come to more than "
                                 f"{self.max_size * 4} bytes (4 x [admin] inject_max_size)")
            out.append(([addr], content))
        return out

    def _build(self, sender: str, parts: dict[str, str], headers: dict[str, str],
               to: str) -> bytes:
        """The RFC 5322 message (CRLF): headers, then text, html or both as alternatives."""
        from email.message import EmailMessage
        from email.policy import SMTPUTF8
        subject = parts.get("subject", "")
        for what, v in (("subject", subject), ("to", to), *headers.items()):
            if "\r" in v or "\n" in v or len(v) > _MAX_FIELD:
                raise ValueError(f"{what}: a header value must be one line of at most "
                                 f"{_MAX_FIELD} characters (after substitution)")
        msg = EmailMessage(policy=SMTPUTF8)
        try:
            msg["From"] = sender or f"MAILER-DAEMON@{self.hostname}"
            msg["To"] = to
            if subject:
                msg["Subject"] = subject
            msg["Date"] = formatdate(time.time(), localtime=True)
            msg["Message-ID"] = make_msgid(domain=self.hostname)
            for k, v in headers.items():
                msg[k] = v
            text, htm = parts.get("text"), parts.get("html")
            if text is not None:
                msg.set_content(text, cte="quoted-printable")
                if htm is not None:
                    msg.add_alternative(htm, subtype="html", cte="quoted-printable")
            else:
                msg.set_content(htm, subtype="html", cte="quoted-printable")
            return msg.as_bytes()
        except (ValueError, TypeError, IndexError, MessageError) as exc:   # email's refusals
            raise ValueError(f"cannot build the message: {exc}") from None

    # -- storing --------------------------------------------------------------------------

    def _admission(self, sender: str) -> None:
        refused = self.reception.mail_check(sender)
        if refused is not None:
            name, line = refused
            status = 507 if name == "SPOOL_FULL" else 503
            raise Refused(status, f"not accepting mail now: {line.decode(errors='replace').strip()}",
                          {"Retry-After": "10"})

    def _unsealable(self, messages) -> list[dict]:
        """Take sealed recipients that do not open out of `messages` (in place), as RCPT
        refuses them; what was taken, with why."""
        policy = self.reception.policy
        ring = getattr(policy, "sealed", None) if policy is not None else None
        if ring is None:
            return []
        out: list[dict] = []
        for rcpts, _ in messages:
            kept = []
            for addr in rcpts:
                try:
                    ring.open(addr)
                except Unsealable as exc:
                    r = REPLIES["BAD_SEALED"]
                    out.append({"recipient": addr, "error": f"{r.code} {r.status} sealed "
                                f"recipient does not open with the keyring: {exc}"})
                    continue
                kept.append(addr)
            rcpts[:] = kept
        messages[:] = [m for m in messages if m[0]]
        return out

    def _suppress(self, messages, sender: str, tenant: str | None, ip: str) -> list[dict]:
        """Take suppressed recipients out of `messages` (in place); what was taken."""
        policy = self.reception.policy
        if policy is None or policy.suppressions is None or policy.suppressions.empty():
            return []
        domain = sender.rpartition("@")[2].lower() or None
        out: list[dict] = []
        logs = self.reception.rejection_logs
        for rcpts, _ in messages:
            kept = []
            for addr in rcpts:
                entry = None if policy.is_bounce_address(addr) else policy.suppressions.check(
                    policy.clear(addr), tenant=tenant, sender_domain=domain)   # sealed: clear
                if entry is None:
                    kept.append(addr)
                    continue
                out.append({"recipient": addr, "scope": entry.scope, "reason": entry.reason})
                policy.suppressed += 1
                if logs is not None:
                    logs.log(RecordType.SUPPRESSED, sender=sender, recipient=addr,
                             scope=entry.scope, reason=entry.reason, client_ip=ip,
                             listener=LISTENER)
            rcpts[:] = kept
        messages[:] = [m for m in messages if m[0]]
        return out

    async def _store(self, request: web.Request, messages, sender: str,
                     x_args: dict) -> web.Response:
        reception = self.reception
        self._admission(sender)
        ip = request.remote or ""
        given = {k: v for k, v in x_args.items() if v is not None}
        # each message's X-header values (one header scan), the request's over them
        refused = self._unsealable(messages)
        if not messages:
            return web.Response(status=422, body=orjson.dumps(
                {"error": "no recipient left: every recipient was refused", "refused": refused,
                 "suppressed": []}), content_type="application/json")
        scanned = [{**reception.x_values(content), **given} for _, content in messages]
        suppressed = self._suppress(messages, sender, scanned[0].get("tenant") if scanned
                                    else None, ip)
        if not messages:
            return web.Response(status=422, body=orjson.dumps(
                {"error": "every recipient is suppressed", "suppressed": suppressed,
                 "refused": refused}),
                content_type="application/json")
        if len(scanned) != len(messages):   # a message lost all its recipients
            scanned = [{**reception.x_values(content), **given} for _, content in messages]
        made = []
        for (rcpts, content), x_values in zip(messages, scanned):
            raw_id, env = reception.new_envelope(
                sender, [Recipient(a) for a in rcpts], content, helo=LISTENER, client_ip=ip,
                client_port=0, listener=LISTENER, protocol=PROTOCOL, x_values=x_values,
                smtputf8=not (sender + "".join(rcpts)).isascii())
            made.append((raw_id, env, content))
        verdicts = await self._scan(made)
        stored, pending, held, fates = [], [], set(), []
        dkim = reception.dkim
        for (raw_id, env, content), v in zip(made, verdicts):
            if v is not None:
                if v.refusal is not None or v.action == "drop":
                    fates.append(_fate(env, v))
                    continue
                content = v.content   # tagged before signing, as at SMTP reception
            if dkim is not None:
                content = await self._sign(dkim, content, env)
            if v is not None and v.action == "hold":
                reception.scan.place_hold(raw_id)
                held.add(raw_id)
            s = reception.store(raw_id, env, content)
            stored.append(s)
            pending.append(s.durable)
        results = await asyncio.gather(*pending, return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        for s, r in zip(stored, results):
            if not isinstance(r, BaseException):
                reception.durable(s)
            elif s.raw_id in held:
                reception.scan.lift_hold(s.raw_id)
        if failed:
            ok = [s.id for s, r in zip(stored, results) if not isinstance(r, BaseException)]
            exc = failed[0]
            if not isinstance(exc, SpoolError):
                raise exc
            r = REPLIES["SPOOL_ERROR"]
            return web.Response(status=503, headers={"Retry-After": "10"}, body=orjson.dumps(
                {"error": f"{r.code} {r.status} {r.text}", "stored": ok}),
                content_type="application/json")
        answer = [{"id": s.id, "recipients": [r.address for r in s.envelope.recipients],
                   "status": "held" if s.raw_id in held else "queued"} for s in stored] + fates
        body = {"messages": answer, "suppressed": suppressed, "refused": refused}
        if stored or any(f["status"] == "dropped" for f in fates):
            return web.Response(body=orjson.dumps(body), content_type="application/json")
        if any(f["status"] == "deferred" for f in fates):   # fail = "closed", scanner down
            return web.Response(status=503, headers={"Retry-After": "10"}, body=orjson.dumps(
                {"error": fates[0]["error"], **body}), content_type="application/json")
        return web.Response(status=422, body=orjson.dumps(
            {"error": fates[0]["error"], **body}), content_type="application/json")

    async def _scan(self, made: list) -> list[Verdict | None]:
        """Each message's content-scan verdict ([[scan]] tables of its tenant; None: not
        scanned), the messages of a request concurrently within each table's bound."""
        scan = self.reception.scan
        if scan is None:
            return [None] * len(made)
        jobs = [(scan.policy_for(env.tenant), env, content) for _, env, content in made]
        if all(p is None for p, _, _ in jobs):
            return [None] * len(made)

        async def one(policies, env, content) -> Verdict | None:
            return None if policies is None else await scan.judge(policies, content, env)
        return list(await asyncio.gather(*(one(*j) for j in jobs)))

    async def _sign(self, dkim: Any, content: bytes, env: Any) -> bytes:
        specs = dkim.domains.for_message(content, env)
        if not specs:
            return content
        try:
            return await dkim.batcher.sign(content, specs)
        except DkimError as exc:
            if dkim.on_error == "defer":
                raise Refused(503, f"cannot DKIM-sign the message now: {exc}",
                              {"Retry-After": "10"}) from None
            return content

"""In-band classifier: SMTP reply code + enhanced status + reply text -> category, hard/soft.

Rules are data, not code: `rules.toml` next to this module ships with the
product; operators layer their own TOML files in front of it (tried first).
Each rule may constrain the reply code (exact, "5xx"/"55x"-style prefix, or
[lo, hi] range), the enhanced status (glob with "*" / "x" per part, e.g.
"5.1.*" or "*.7.1") and the text (case-insensitive regexes, any may match).
All given constraints must hold; the first matching rule wins.

"hard" means a permanent, address-level failure: unknown user, unknown/null-MX
domain, moved -- only when the reply is permanent; a 4xx never counts as hard.
Mailbox full, expired, rate, size, network and system errors are always soft.
The policy categories (POLICY_CATEGORIES: IP/domain blocks, content filters,
viruses, SPF/DKIM/DMARC and local policy, suspended accounts) are a verdict about
the sender, not the address: soft unless the operator lists them in
`policy_hard` ([bounces] policy_hard) or an operator rule says `hard = true`.

Rule files are checked by the config's TOML value checker (mta/config/values.py):
a problem names the file, the rule (number and name) and the key, and says what the
key allows. RulesError is fatal at start-up; on a reload the old rules stay.

Speed: every rule's regexes are joined into one precompiled pattern; a verdict
is a short loop of integer and regex tests (microseconds). Reloads stat the
files and re-read only when an mtime changed; a broken file keeps the old rules.
"""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from mta.config.schema import BOUNCE_POLICY_CATEGORIES
from mta.config.values import (
    BOOL,
    CHOICE,
    REGEX,
    REGEX_LIST,
    Invalid,
    Key,
    ValueType,
    check_table,
    describe,
    read_toml,
    render,
)
from mta.model.verdict import Verdict

__all__ = ["CATEGORIES", "POLICY_CATEGORIES", "Classifier", "RulesError", "Verdict", "SHIPPED_RULES"]

log = logging.getLogger(__name__)

SHIPPED_RULES = Path(__file__).with_name("rules.toml")

CATEGORIES = frozenset({
    "invalid_recipient", "inactive_mailbox", "mailbox_full", "invalid_domain",
    "routing_error", "spam_block", "spam_content", "virus", "policy",
    "relaying_denied", "rate_limited", "message_too_large", "expired",
    "protocol_error", "tls_error", "network_error", "system_error",
    "auto_reply", "bad_sender", "unknown",
})

# The categories whose hard/soft is the operator's choice (see BOUNCE_POLICY_CATEGORIES
# in mta/config/schema.py for the names [bounces] policy_hard accepts).
POLICY_CATEGORIES = frozenset(BOUNCE_POLICY_CATEGORIES.values())
# The only categories the shipped rules may grade hard.
ADDRESS_CATEGORIES = frozenset({"invalid_recipient", "invalid_domain"})


class RulesError(ValueError):
    """A rules file is unreadable or a rule in it is malformed."""


@dataclass(frozen=True, slots=True)
class _Rule:
    name: str
    code_lo: int
    code_hi: int
    code_prefix: str          # "" = any; else the reply code as text must start with it
    status: re.Pattern[str] | None
    text: re.Pattern[str] | None
    not_text: re.Pattern[str] | None
    category: str
    hard: bool


def _parse_rule_name(value: object, base: Path) -> str:
    if not isinstance(value, str) or not value:
        raise Invalid(f"expected a non-empty string, got {describe(value)}")
    return value


def _parse_code(value: object, base: Path) -> tuple[int, int, str]:
    """(lo, hi, prefix) from 550, "5xx" / "55x", or [lo, hi]."""
    if isinstance(value, int) and not isinstance(value, bool):
        if not 200 <= value <= 599:
            raise Invalid(f"reply code {value} is outside 200..599")
        return value, value, ""
    if isinstance(value, str) and re.fullmatch(r"[2-5](?:\d|[xX])(?:\d|[xX])", value):
        prefix = re.split(r"[xX]", value, maxsplit=1)[0]
        return 0, 999, prefix
    if (isinstance(value, list) and len(value) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) for v in value) and value[0] <= value[1]):
        return value[0], value[1], ""
    raise Invalid(f"expected a reply code: 550, \"5xx\", \"55x\" or [lo, hi], "
                  f"got {describe(value)}")


def _parse_status(value: object, base: Path) -> re.Pattern[str]:
    pats = [value] if isinstance(value, str) else value
    if not isinstance(pats, list) or not pats or not all(isinstance(p, str) for p in pats):
        raise Invalid(f"expected a status pattern or a non-empty array of them, got "
                      f"{describe(value)}")
    alts = []
    for p in pats:
        parts = p.split(".")
        if len(parts) != 3 or not all(re.fullmatch(r"\d{1,3}|[*xX]", s) for s in parts):
            raise Invalid(f"{render(p)} is not a status pattern "
                          "(like \"5.1.1\", \"5.7.*\", \"*.2.2\")")
        alts.append(r"\.".join(r"\d{1,3}" if s in "*xX" else re.escape(s) for s in parts))
    return re.compile(r"\A(?:" + "|".join(alts) + r")\Z")


def _parse_text(value: object, base: Path) -> re.Pattern[str]:
    pats = (REGEX.parse(value, base),) if isinstance(value, str) else REGEX_LIST.parse(value, base)
    if not pats:
        raise Invalid("expected a regular expression or a non-empty array of them, got []")
    # Case-insensitive by lower-casing both sides: sre is several times faster
    # on plain patterns than with re.IGNORECASE over long alternations.
    return re.compile("|".join(f"(?:{_lower_regex(p)})" for p in pats))


def _lower_regex(p: str) -> str:
    """Lower-case the literal characters of a regex, leaving escapes (\\S, \\D...) alone."""
    out, i = [], 0
    while i < len(p):
        if p[i] == "\\" and i + 1 < len(p):
            out.append(p[i:i + 2])
            i += 2
        else:
            out.append(p[i].lower())
            i += 1
    return "".join(out)


_TEXT = ValueType("regexes", _parse_text, "a regular expression or an array of them; "
                  "case-insensitive")
# The keys of a [[rule]] table, in the order they are checked.
RULE_KEYS = {
    "name": Key(ValueType("rule name", _parse_rule_name, "a non-empty string"), None,
                "the rule's name, logged as the verdict's rule", required=True),
    "code": Key(ValueType("reply code", _parse_code, '550, "5xx", "55x" or [lo, hi]'), None,
                "the reply codes the rule applies to; absent: any"),
    "status": Key(ValueType("status patterns", _parse_status, '"5.1.1", "5.7.*", "*.2.2" '
                            "or an array of them"), None,
                  "enhanced status codes the rule applies to; absent: any"),
    "text": Key(_TEXT, None, "the reply text must match one of these; absent: any"),
    "not_text": Key(_TEXT, None, "the reply text must match none of these"),
    "category": Key(CHOICE, None, "the verdict's category", choices=tuple(sorted(CATEGORIES)),
                    required=True),
    "hard": Key(BOOL, False, "a permanent reply means the address is bad: suppress it"),
}


def _compile_rule(raw: object) -> _Rule:
    v = check_table(raw, RULE_KEYS, Path())
    lo, hi, prefix = v["code"] or (0, 999, "")
    return _Rule(name=v["name"], code_lo=lo, code_hi=hi, code_prefix=prefix,
                 status=v["status"], text=v["text"], not_text=v["not_text"],
                 category=v["category"], hard=v["hard"])


def load_rules(path: Path) -> list[_Rule]:
    """Compile one rules file; RulesError names the file, the rule and the problem."""
    try:
        doc = read_toml(path)
    except Invalid as e:
        raise RulesError(f"{path}: {e}") from None
    raw_rules = doc.get("rule", [])
    if not isinstance(raw_rules, list):
        raise RulesError(f"{path}: 'rule' must be an array of tables ([[rule]])")
    rules = []
    for i, raw in enumerate(raw_rules, 1):
        try:
            rules.append(_compile_rule(raw))
        except Invalid as e:
            name = raw.get("name") if isinstance(raw, dict) else None
            label = f"rule #{i}" + (f" ({name!r})" if name else "")
            raise RulesError(f"{path}: {label}: {e}") from None
    return rules


def _mtime(path: Path) -> int | None:
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return None


class Classifier:
    """Ordered rules: operator files first (in the order given), shipped rules.toml last."""

    def __init__(self, extra_rule_files: Sequence[Path] = (), policy_hard: Sequence[str] = ()):
        unknown = [c for c in policy_hard if c not in BOUNCE_POLICY_CATEGORIES]
        if unknown:
            raise RulesError(f"policy_hard: {unknown[0]!r} is not a policy category "
                             f"(allowed: {', '.join(BOUNCE_POLICY_CATEGORIES)})")
        self.policy_hard = frozenset(BOUNCE_POLICY_CATEGORIES[c] for c in policy_hard)
        self._files = [Path(p) for p in extra_rule_files] + [SHIPPED_RULES]
        self._mtimes: list[int | None] = []
        self._rules: list[_Rule] = []
        self._load()   # a bad file at start-up raises: there are no old rules to keep

    def _load(self) -> None:
        mtimes = [_mtime(p) for p in self._files]
        rules: list[_Rule] = []
        for p in self._files:
            rules.extend(load_rules(p))
        self._rules, self._mtimes = rules, mtimes
        self._cache: dict[tuple[int | None, str | None, str], Verdict] = {}

    def reload_if_changed(self) -> bool:
        """Re-read the rule files if any mtime changed. True when new rules are active.

        On a bad file the previous rules stay active; the error is logged and
        raised as RulesError (naming file, rule and problem)."""
        if [_mtime(p) for p in self._files] == self._mtimes:
            return False
        try:
            self._load()
        except RulesError as e:
            log.error("bounce rules not reloaded, keeping the previous rules: %s", e)
            raise
        return True

    def classify(self, code: int | None, status: str | None, text: str) -> Verdict:
        # (keyed by what is classified: a whole notice as the key would be hashed
        # per call and kept alive by the cache)
        text = (text or "")[:_CLASSIFIED]
        key = (code, status, text)
        v = self._cache.get(key)
        if v is None:
            v = self._classify(code, status, text.lower())
            if len(self._cache) >= 4096:   # replies repeat a lot; a full cache just starts over
                self._cache.clear()
            self._cache[key] = v
        return v

    def _classify(self, code: int | None, status: str | None, text: str) -> Verdict:
        q = _QUOTED_REPLY.search(text)
        if q:
            # A relay's own label around the remote reply it quotes (Amazon SES:
            # "5.1.0 - Unknown address error 550-'5.7.1 <a>... Access denied'"):
            # the remote's words and status are the verdict, not the label.
            inner = q.group(1)
            st = _LEADING_STATUS.match(inner)
            v = self._classify(code, st.group(1) if st else status, inner)
            if v.category != "unknown":   # (an apostrophe may have cut the quote short)
                return v
        m = _RCPT_REJECTED.search(text)
        if m:
            # Postfix-style "Recipient address rejected: <reason>": the reason
            # after the colon is the verdict (an access map saying "Mailbox
            # full" or "Internal system error"), not the words before it. An
            # unrecognised reason falls back to the status / reply code.
            # A bare "Access denied" there is Microsoft's directory-based edge
            # blocking (no such recipient): only a specific reason overrides.
            v = self._match(code, status, m.group(1))
            if v.rule == "policy-text":
                return self._match(code, status, text)
            return v if v.category != "unknown" else self._match(code, status, "")
        return self._match(code, status, text)

    def _match(self, code: int | None, status: str | None, text: str) -> Verdict:
        c = code or 0
        cs = str(code) if code else ""
        for r in self._rules:
            if r.code_prefix:
                if not cs.startswith(r.code_prefix):
                    continue
            elif c < r.code_lo or c > r.code_hi:
                continue
            if r.status is not None and (status is None or r.status.match(status) is None):
                continue
            if r.text is not None and r.text.search(text) is None:
                continue
            if r.not_text is not None and r.not_text.search(text) is not None:
                continue
            hard = r.hard or r.category in self.policy_hard
            return Verdict(r.category, hard and not _temporary(code, status), r.name)
        return Verdict("unknown", False, "")


_CLASSIFIED = 2000   # characters of a reply text the rules see
_QUOTED_REPLY = re.compile(r"\b[245]\d\d[ -]'([^']{3,300})'")
_LEADING_STATUS = re.compile(r"\s*([245]\.\d{1,3}\.\d{1,3})\b")
_RCPT_REJECTED = re.compile(r"recipient address rejected: ?([^.;<\n]{3,200})")


def _temporary(code: int | None, status: str | None) -> bool:
    """A 4xx reply / 4.x.x status is never a hard (suppress-worthy) failure."""
    if status:
        return status[0] == "4"
    return code is not None and 400 <= code < 500

"""Non-standard bounces: find failed recipients and their diagnostics in the human text.

Most MTAs that do not send RFC 3464 (qmail, Exim, old Sendmail, Exchange 2003,
Gmail, Yahoo, mail.ru, Domino, ...) still follow a few layouts, so this module
uses generic techniques, not one parser per vendor:

  1. cut the notice where the returned original starts ("--- Below this line
     is a copy of the message", "------ This is a copy of the message", an
     inline header block with Received:/Return-Path:/Message-ID: ...);
  2. look for addresses in telling positions, best first:
       "<addr>:" / "addr: ..." at the start of a line (qmail, Postfix, Yahoo),
       "addr... User unknown" (Sendmail), an address alone on its line (Exim,
       Gmail, Domino, Office 365 "addr<mailto:addr>"), "addr on <date>" (Exchange),
       "RCPT TO:<addr>" in an SMTP transcript, "... to addr" phrases;
  3. each address's diagnostic is the text from it to the next failed address.

The envelope sender (the bounce's To:), the reporting side (MAILER-DAEMON,
postmaster) and the original's From: are never taken as failed recipients.
"""
from __future__ import annotations

import re
from bisect import bisect_right
from dataclasses import dataclass

from .diagnostic import ADDR, is_role_address, unfold
from .report import MAX_RECIPIENTS

__all__ = ["Found", "bare_local_parts", "cut_original", "scan", "is_delay_text", "FAILURE_TEXT"]

_A = ADDR.pattern

# Lines that start the copy of the returned original.
# (Possessive lead-in: a line of blanks or dashes is read once, not once per way of
# splitting it between the three runs. The "---- Original message ----" form is
# checked for its dashes in cut_original, since the lead-in has consumed them.)
_CUT = re.compile(
    r"^(?P<lead>[ \t]*+[-=*_#>]*+[ \t]*+)(?:"
    r"(?:this is a )?copy of (?:the |your )?(?:original )?message|"
    r"below (?:this line )?is a copy|"
    r"(?:the )?original message (?:follows|headers?|is attached|below)|"
    r"(?:the )?headers? of (?:the |your )?(?:original )?message|"
    r"returned message|returned mail follows|"
    r"(?:the )?(?:headers|text) of (?:the |your )?(?:original )?message|"
    r"original message header|"
    r"unsent message (?:below|follows)|"
    r"message (?:text|headers?) follows?|"
    r"(?:start|beginning) of (?:the )?(?:original|returned) message|"
    r"content-type: message/rfc822|"
    r"undelivered message (?:headers )?follows|"
    r"your message (?:reads|headers|follows|begins)|"
    r"(?P<dashed>original message)"
    r")",
    re.I | re.M,
)
_HDR = re.compile(r"^(?:Return-Path|Received|Message-I[dD]|Date|From|To|Subject|Cc|Reply-To|Sender|"
                  r"MIME-Version|Content-Type|Content-Transfer-Encoding|DKIM-Signature|X-[\w-]+|"
                  r"Delivered-To|Authentication-Results|ARC-[\w-]+|References|In-Reply-To):[ \t]", re.I)
_WEAK_BITS = {"from": 1, "subject": 2}
_HDR_STRONG = re.compile(r"^(?:Return-Path|Received|Message-I[dD]|DKIM-Signature):", re.I)


def cut_original(text: str) -> tuple[str, str]:
    """Split a notice into (the report text, the quoted original or '')."""
    best = len(text)
    for m in _CUT.finditer(text):
        if m.start() > 0 and (m.group("dashed") is None or "--" in m.group("lead")):
            best = m.start()
            break
    # An inline header block: at least three header lines in a row, one of
    # them a header only a real message carries (Received, Return-Path...).
    # Or a block of the original's own fields without any trace header: From and
    # Subject and a third (To, Cc, Date...) -- "From: a\nTo: b\nSubject: c" -- once the
    # report has named an address (a summary "From/To/Subject/Sent" block at the top
    # of an Exchange notice is the report, not the original).
    lines = text.split("\n")
    pos = 0
    first_at = text.find("@")
    run_start, run, strong, names = -1, 0, False, 0
    for line in lines:
        if pos >= best:
            break
        if _HDR.match(line):
            if run == 0:
                run_start = pos
            run += 1
            strong = strong or bool(_HDR_STRONG.match(line))
            names |= _WEAK_BITS.get(line[:line.find(":")].lower(), 0)
            if run >= 3 and run_start > 0 and (strong or (names & 3 == 3 and 0 <= first_at < run_start)):
                best = min(best, run_start)
                break
        elif line[:1] in (" ", "\t") and run:
            pass   # a folded header line
        else:
            run, strong, names = 0, False, 0
        pos += len(line) + 1
    return text[:best], text[best:]


@dataclass(slots=True)
class Found:
    address: str
    diagnostic: str
    score: int


_P_COLON = re.compile(r"^[ \t]*[\"'<]?(" + _A + r")[\"'>]?[ \t]*:(?!//)", re.M)       # qmail/Postfix/Yahoo
_P_DOTS = re.compile(r"^[ \t]*(?:[245]\d\d[ \t]+)?<?(" + _A + r")>?[ \t]*\.\.\.[ \t]", re.M)                    # Sendmail
# An address alone on its line, maybe bulleted, labelled, quoted, or followed by
# a duplicate / mailto: link / short bracketed reason (Exim, Gmail, O365, Domino...).
_P_ALONE = re.compile(
    r"^[ \t]*(?:[>*\u2022\u00b7-]+[ \t]*|\d{1,3}[.)][ \t]*)?(?:[\"'][^\"'\n]*[\"'][ \t]*)?"
    r"(?:\w[\w.-]*(?:[ \t]+\w[\w.-]*){0,3}[ \t]*:[ \t]*(?:rfc822;[ \t]*)?)?[\"'<]?(?:mailto:)?(" + _A + r")[\"'>]?"
    r"(?:[ \t]*+<(?:mailto:)?[^>\n]*>|[ \t]*+\([^)\n]{0,80}\)|[ \t]*+\[[^\]\n]{0,80}\])?[ \t]*+[;,.:]?[ \t]*+$",
    re.M)
_P_ON = re.compile(r"^[ \t]*<?(" + _A + r")>?[ \t]+on[ \t]+\w", re.M)                # Exchange 2003
# "addr Invalid Address, ...", "* addr - 550 ...", "1) addr: reason", "<<addr>> 550 ...":
# an address leading its line (maybe bulleted or numbered), then its reason.
_P_LEAD = re.compile(
    r"^[ \t]*+(?:[*\u2022\u00b7>-]+[ \t]*+|\d{1,3}[.):][ \t]*+)?<{0,2}(" + _A + r")>{0,2}"
    r"(?:(?:[ \t]*+(?:[-:,;=]|--))?[ \t]++(?:[A-Za-z(\[]|[245]\d\d\b|#?[245]\.\d)|:(?!//)[ \t]*+[A-Za-z(\[])", re.M)
# An address quoted in an SMTP reply: "550 5.1.1 <addr>: ...", "550-<addr>... User unknown".
_P_REPLY = re.compile(r"\b[45]\d\d[ -](?:#?[45]\.\d{1,3}\.\d{1,3}[ \t]+)?<(" + _A + r")>")
_P_TAIL = re.compile(r":[ \t]*+<(" + _A + r")>[ \t]*+\.?[ \t]*+$", re.M)                # "mailbox is full: <addr>"
# Exchange / X.400 originator-recipient form "c=US;a= ;p=ORG;o=Site;dda:SMTP=user@example.com;".
_P_X400 = re.compile(r"\bdda:SMTP=([^\s;@<>]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,})", re.I)
# Exim: an alias or list expanded to addresses it will not name ("an undisclosed
# address (generated from a@b)"): the address we sent to is the "generated from" one.
_P_GENERATED = re.compile(r"^[ \t]*\(generated from[ \t]+<?(" + _A + r")>?\)", re.I | re.M)
_MAIL_FROM = re.compile(r"MAIL[ \t]+FROM[ \t]*:[ \t]*<?(" + _A + r")>?", re.I)
_P_RCPT = re.compile(r"RCPT[ \t]+TO[ \t]*:[ \t]*<?(" + _A + r")>?", re.I)
_P_PHRASE = re.compile(
    r"(?:\baddressed,[ \t]*|\b(?:to|for|generated by|recipient(?:s|\(s\))?|addressee|rcpt|destinatario|destinataire|empf\u00e4nger|"
    r"address(?:es)?(?:\(es\))?|mailbox|user|account)[ \t]*+[:=]?[ \t]*+|\b(?:following|below)[^\n@]{0,40}:\s*+)"
    r"[\"']?<?(" + _A + r")>?", re.I)
_P_ANY = re.compile(_A)
_NEWLINE = re.compile("\n")
_NEVER = re.compile(r"^(?:mailer-daemon|mail-daemon|maildaemon|mailerdaemon|double-bounce)@")

# (pattern, score): higher scores win; only the best score found is used.
_PATTERNS = ((_P_COLON, 6), (_P_DOTS, 6), (_P_X400, 6), (_P_ON, 5), (_P_ALONE, 5), (_P_LEAD, 4), (_P_TAIL, 4), (_P_RCPT, 4), (_P_REPLY, 4),
             (_P_GENERATED, 4), (_P_PHRASE, 3))

# Where an address is NOT a failed recipient: "MAIL FROM:<a>", "From: a", "sender a", Message-IDs.
# (A word, not part of a host name: "from a@x to b@mail.sender.example" names b.)
# The notice's own contact addresses ("write to help@x", "contact postmaster@x") too.
_NOT_RCPT = re.compile(
    r"(?<![.@\w-])(?:mail[ \t]+from[ \t]*:?|from[ \t]*:|sender\b[^\n@.]{0,20}|return-path[ \t]*:|message-id[ \t]*:?|"
    r"reply-to[ \t]*:|errors-to[ \t]*:|envelope-from|sent by\b|sent from\b|from\b|"
    r"(?:write|contact|reach|e-?mail us|send (?:an? )?(?:e-?mail|mail|message)|questions?|help ?desk|support)\b[^\n@]{0,12})[ \t]*<?$",
    re.I)

FAILURE_TEXT = re.compile(
    r"could ?n[o']t be delivered|could not deliver|undeliverable|undelivered|delivery (?:has )?failed|"
    r"permanent(?:ly)? (?:fatal )?(?:error|failure|failed)|failed permanently|unable to deliver|wasn't able to deliver|"
    r"was not able to deliver|not (?:be )?delivered|delivery to the following|following address(?:es|\(es\))? failed|"
    r"did not reach|rejected|returned to sender|delivery problem|non[- ]?delivery|failure notice|"
    r"mail delivery failed|message was not|delivery status notification|error occurred|"
    r"has not yet been delivered|delayed|will (?:continue to )?(?:try|retry)|"
    r"failed|failure|errors? (?:while|during)|could not be sent|unknown user|user unknown|no such user|bounced|"
    r"\b[45]\d\d[ -][45]\.\d", re.I)

_DELAY = re.compile(
    r"this is (?:only )?a warning|warning message only|will (?:continue to |keep )?(?:try|trying|retry|retrying)\b|"
    # (not "will attempt to contact the recipient": a postmaster's promise, not a retry)
    r"will (?:continue to |keep )?attempt(?:ing)? (?:to )?(?:re)?(?:deliver|send)|"
    r"will be retried|still (?:being )?(?:retried|trying)|has not yet been delivered|not been delivered yet|"
    r"has been delayed|delivery (?:has been |is )?delayed|transient non-fatal|"
    r"no action is required|message (?:is )?delayed|delayed mail|still undelivered|"
    r"delivery attempts will continue|retry (?:until|for)|(?:^|\W)delay(?:ed)?\W*$",
    re.I | re.M)


# "The following recipients failed: a@x, b@x; c@x": the addresses listed after the first
# one a phrase names, on the same line.
_P_NEXT = re.compile(r"[ \t]*+[,;][ \t]*+(?:and[ \t]+)?[\"']?<?(" + _A + r")>?[\"']?")


def _with_listed(pat: re.Pattern[str], text: str):
    """pat's matches; after a phrase's match, the further addresses of its list. (Linear:
    a list is never walked twice, even when an address in it matches the phrase again.)"""
    walked = 0
    for m in pat.finditer(text):
        yield m
        if pat is _P_PHRASE and m.end() >= walked:
            end = m.end()
            while len(text) > end and text[end] in ",; \t":
                n = _P_NEXT.match(text, end)
                if n is None:
                    break
                yield n
                end = n.end()
            walked = end


def is_delay_text(text: str) -> bool:
    return bool(_DELAY.search(text))


def scan(text: str, exclude: set[str]) -> list[Found]:
    """Failed recipients in a report text (already cut before the original)."""
    hits: dict[str, tuple[int, int]] = {}   # lower address -> (score, first position)
    # The envelope sender a transcript names ("MAIL FROM:<a>", quoted back in the
    # reply to it) is ours: never a failed recipient.
    mail_from = {m.group(1).strip(".").lower() for m in _MAIL_FROM.finditer(text)}
    for pat, base in _PATTERNS:
        for m in _with_listed(pat, text):
            score = base
            addr = m.group(1).strip(".")
            low = addr.lower()
            if _NEVER.match(low) or low in mail_from:
                continue
            # The envelope sender, the original's From and role addresses can be
            # the failed recipient (tests, aliases): demote them, do not drop them.
            if low in exclude:
                score -= 4
            elif is_role_address(addr):
                score -= 2
                if score < 1:
                    continue
            if _NOT_RCPT.search(text[max(0, m.start(1) - 30):m.start(1)]) and pat not in (_P_RCPT, _P_GENERATED):
                continue
            if pat is _P_ALONE and _looks_like_header_line(text, m.start()):
                continue
            prev = hits.get(low)
            if prev is None or score > prev[0]:
                hits[low] = (score, m.start(1) if prev is None else min(prev[1], m.start(1)))
            elif m.start(1) < prev[1]:
                hits[low] = (prev[0], m.start(1))
    if not hits:
        return []
    best = max(s for s, _ in hits.values())
    chosen = {a for a, (s, _) in hits.items() if s == best}
    # Every occurrence of any chosen address (any pattern, or a plain mention) bounds the blocks.
    occ: list[tuple[int, str]] = []
    originals: dict[str, str] = {}
    for m in _P_ANY.finditer(text):
        a = m.group(1).strip(".")
        low = a.lower()
        originals.setdefault(low, a)
        if low in chosen:
            occ.append((m.start(1), low))
    # A block runs from the line of an address to the line of the next other
    # address, and never starts before the previous block ended: with many
    # addresses on one line, the blocks split the line instead of each
    # repeating it (which was quadratic in the line's length).
    starts = [0] + [m.end() for m in _NEWLINE.finditer(text)]
    segs: dict[str, list[str]] = {}
    i = prev_end = 0
    while i < len(occ):
        pos, a = occ[i]
        j = i + 1
        while j < len(occ) and occ[j][1] == a:
            j += 1
        end = starts[bisect_right(starts, occ[j][0]) - 1] if j < len(occ) else len(text)
        begin = max(starts[bisect_right(starts, pos) - 1], prev_end)
        prev_end = max(end, pos)
        segs.setdefault(a, []).append(text[begin:prev_end])
        i = j
    out: list[Found] = []
    for addr in sorted(chosen, key=lambda a: hits[a][1])[:MAX_RECIPIENTS]:
        diag = unfold("\n".join(_dedupe(segs.get(addr, []))))
        out.append(Found(originals.get(addr, addr), diag, best))
    return out


# Old AOL / CompuServe style: the failed recipients listed as bare local parts
# (screen names) under a "following recipients:" line; the domain is the reporter's.
_BARE_LIST = re.compile(r"following recipients?\b[^\n]*:[ \t]*\n((?:[ \t]+[A-Za-z0-9][\w.+-]{0,63}[ \t]*(?:\n|$))+)", re.I)


def bare_local_parts(text: str, domain: str) -> list[Found]:
    """Recipients named only by local part, completed with the reporting domain."""
    m = _BARE_LIST.search(text)
    if not m or not domain:
        return []
    diag = unfold(text[:m.end()])
    names = [name.strip() for name in m.group(1).split("\n") if name.strip()]
    return [Found(f"{name}@{domain}", diag, 1) for name in names[:MAX_RECIPIENTS]]


def _dedupe(parts: list[str]) -> list[str]:
    seen, out = set(), []
    for p in parts:
        if p not in seen:
            seen.add(p)
            out.append(p)
    return out


def _looks_like_header_line(text: str, start: int) -> bool:
    line_end = text.find("\n", start)
    line = text[start:line_end if line_end >= 0 else len(text)].lstrip()
    return bool(re.match(r"(?:From|Sender|Reply-To|Return-Path|Errors-To|Message-I[dD]|In-Reply-To|References)\s*:", line, re.I))

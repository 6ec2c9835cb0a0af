#!/usr/bin/env python3
"""Accuracy of mta.feedback.bounce.parse_message on the shared bounce corpora, per field and per source family.

Corpora (each where tools/corpora.py finds it: tests/data, else ../shared/corpus; the GPL
flufl-bounce and arf-fbl are only in ../shared, and a missing one is reported, not scored):
  sisimai-set-of-emails  maildir/bsd/*.eml vs expectations.tsv; maildir/dos and
                         maildir/mac via line-ending-variants.tsv (rows whose file is
                         identical to its bsd counterpart after newline normalisation);
                         maildir/not/* must yield no recipient.
  flufl-bounce           data/*.txt vs expectations.tsv (set of recipients; the
                         failure class: temporary = kind "delay").
  arf-fbl                every feedback field present in expectations.tsv.

Fields (each a fraction of the rows where the corpus states a value):
  recipient   the expected address is among the parsed recipients
              (sisimai rows with its pseudo address "...@libsisimai.org.invalid" skipped);
              flufl: the parsed set equals the expected set
  status      status_kind=dsn rows: the parsed status (stated, not derived) equals it
  replycode   rows with an expected reply code
  hard        sisimai hardbounce column, only on rows whose reason is not a policy choice:
              user/domain unknown, moved = hard; mailbox full, expired, rate, size,
              system = soft (HARD_REASONS / SOFT_REASONS). Blocked, filtered, policy,
              security, spam... are the operator's choice ([bounces] policy_hard).
  hard-all    the hardbounce column on every row (sisimai's policy labels included; for information)
  feedback    feedback_type of sisimai arf-* rows
  kind        flufl: permanent -> "bounce", temporary -> "delay"
  arf:<Field> arf-fbl fields, exact text

Held-out estimate (--folds): leave one source family out at a time (a sisimai
<lhost|rhost>-<engine>, rfc3464, rfc3834, arf; a flufl file group such as "qmail",
"yahoo"). For each family F, every alternative of a classifier rule's `text` that
decides a verdict only on F's files (in the whole corpus) is dropped -- as if it had
never been written, because only F motivated it -- and so is every text-scan layout
pattern (mta/feedback/bounce/textscan.py) without which only F finds fewer recipients;
F is scored with what is left. The summed held-out table estimates accuracy on bounces
of an unseen source. (The parser's other code paths are not ablated.)
`--holdout FAMILY` does the same for one family (repeatable).

Usage: tools/bounce_accuracy.py [--corpus DIR] [--failures] [--folds | --holdout FAMILY ...]
  DIR: one folder holding all three; exit status 1 when a corpus was not found.
"""
from __future__ import annotations

import argparse
import csv
import json
import re
import sys
import tempfile
import tomllib
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import corpora  # noqa: E402  (tools/corpora.py)

from mta.feedback.bounce import Classifier, Report, parse_message, textscan  # noqa: E402
from mta.feedback.bounce.classify import SHIPPED_RULES, _lower_regex  # noqa: E402

# sisimai reasons whose hard/soft label is a fact about the address, not a policy choice
HARD_REASONS = frozenset({"userunknown", "hostunknown", "hasmoved"})
SOFT_REASONS = frozenset({"mailboxfull", "expired", "toomanyconn", "speeding", "exceedlimit",
                          "mesgtoobig", "emailtoolarge", "ratelimited", "systemerror", "systemfull",
                          "mailererror"})

PSEUDO = "libsisimai.org.invalid"
ARF_FIELDS = {
    "Feedback-Type": "feedback_type", "Original-Rcpt-To": "original_rcpt_to", "Source-IP": "source_ip",
    "Original-Mail-From": "original_mail_from", "User-Agent": "user_agent", "Version": "version",
    "Arrival-Date": "arrival_date", "Reported-Domain": "reported_domain", "Reported-URI": "reported_uri",
}


@dataclass
class Tally:
    ok: int = 0
    total: int = 0

    def add(self, good: bool) -> None:
        self.total += 1
        self.ok += bool(good)

    @property
    def pct(self) -> float:
        return 100.0 * self.ok / self.total if self.total else 100.0


@dataclass
class Scores:
    """field -> Tally, overall and per family; failures for --failures."""
    fields: dict[str, Tally] = field(default_factory=lambda: defaultdict(Tally))
    families: dict[str, dict[str, Tally]] = field(default_factory=lambda: defaultdict(lambda: defaultdict(Tally)))
    failures: list[str] = field(default_factory=list)

    def add(self, family: str, name: str, good: bool, why: str = "") -> None:
        self.fields[name].add(good)
        self.families[family][name].add(good)
        if not good:
            self.failures.append(f"{name:12} {why}")


def _family(name: str) -> str:
    stem = Path(name).name.rsplit(".", 1)[0]
    return re.sub(r"[-_]\d+$", "", stem)


def _read_tsv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))


def _norm(addr: str) -> str:
    """Compare mailboxes, not spellings: '"a..b"@x' and 'a..b@x' are the same address."""
    return addr.strip().replace('"', "").lower()


def _match(rep: Report, addr: str, index: int):
    by_addr = {_norm(r.recipient): r for r in rep.recipients}
    r = by_addr.get(addr.lower())
    if r is None and 0 < index <= len(rep.recipients):
        r = rep.recipients[index - 1]
    return r


def score_sisimai_rows(scores: Scores, rep: Report, rows: list[dict[str, str]], label: str) -> None:
    fam = _family(rows[0]["file"])
    got = {_norm(r.recipient) for r in rep.recipients}
    for row in rows:
        if not row["index"]:
            continue
        exp = _norm(row["recipient"])
        r = _match(rep, exp, int(row["index"]))
        ctx = f"{label} #{row['index']}"
        if exp and PSEUDO not in exp:
            scores.add(fam, "recipient", exp in got, f"{ctx}: want {exp} got {sorted(got)} kind={rep.kind}")
        if row["status_kind"] == "dsn":
            st = None if r is None or r.status_derived else r.status
            scores.add(fam, "status", st == row["status"], f"{ctx}: want {row['status']} got {st}")
        if row["replycode"]:
            rc = None if r is None else r.reply_code
            scores.add(fam, "replycode", str(rc) == row["replycode"], f"{ctx}: want {row['replycode']} got {rc}")
        if row["hardbounce"] in ("true", "false"):
            hard = None if r is None else r.hard
            want = row["hardbounce"] == "true"
            why = (f"{ctx}: want {want} ({row['reason']}) got {hard} "
                   f"({None if r is None else (r.category, r.reply_code, r.status, r.diagnostic[:150])})")
            scores.add(fam, "hard-all", hard == want, why)
            if row["reason"] in HARD_REASONS or row["reason"] in SOFT_REASONS:
                scores.add(fam, "hard", hard == (row["reason"] in HARD_REASONS), why)
        if row["feedback_type"]:
            ft = rep.feedback.feedback_type if rep.feedback else None
            scores.add(fam, "feedback", ft == row["feedback_type"], f"{ctx}: want {row['feedback_type']} got {ft}")


def _wanted(families: set[str] | None, name: str) -> bool:
    return families is None or _family(name) in families


def run_sisimai(base: Path, classifier: Classifier, families: set[str] | None = None) -> Scores:
    scores = Scores()
    by_file: dict[str, list[dict[str, str]]] = defaultdict(list)
    for row in _read_tsv(base / "expectations.tsv"):
        by_file[row["file"]].append(row)
    for name, rows in sorted(by_file.items()):
        path = base / "maildir" / "bsd" / name
        if path.exists() and _wanted(families, name):
            _note(classifier, _family(name))
            score_sisimai_rows(scores, parse_message(path.read_bytes(), classifier), rows, f"bsd/{name}")
    for row in _read_tsv(base / "line-ending-variants.tsv"):
        variant = base / row["variant_file"]
        bsd_name = Path(row["bsd_counterpart"]).name
        if row["identical_after_newline_normalisation"] != "yes" or bsd_name not in by_file or not variant.exists():
            continue
        if not _wanted(families, bsd_name):
            continue
        _note(classifier, _family(bsd_name))
        rep = parse_message(variant.read_bytes(), classifier)
        score_sisimai_rows(scores, rep, by_file[bsd_name], row["variant_file"].removeprefix("maildir/"))
    for path in sorted((base / "maildir" / "not").glob("*")):
        if families is not None and "not-bounce" not in families:
            continue
        _note(classifier, "not-bounce")
        rep = parse_message(path.read_bytes(), classifier)
        scores.add("not-bounce", "nothing", not rep.recipients and rep.kind == "none",
                   f"not/{path.name}: kind={rep.kind} {[r.recipient for r in rep.recipients]}")
    return scores


def run_flufl(base: Path, classifier: Classifier, families: set[str] | None = None) -> Scores:
    scores = Scores()
    expected: dict[str, tuple[set[str], str]] = {}
    for row in _read_tsv(base / "expectations.tsv"):
        if row["expected_recipients"].startswith("("):
            continue   # "(no expectation in flufl.bounce tests)"
        rcpts = {a.strip().lower() for a in row["expected_recipients"].split(";") if a.strip()}
        prev = expected.get(row["file"])
        # groupwise_02 is listed twice (one detector finds nothing, another the address): the union is right.
        expected[row["file"]] = ((prev[0] if prev else set()) | rcpts, row["failure_class"])
    for name, (want, klass) in sorted(expected.items()):
        path = base / "data" / name
        if not path.exists() or not _wanted(families, "flufl-" + name):
            continue
        _note(classifier, _family("flufl-" + name))
        rep = parse_message(path.read_bytes(), classifier)
        got = {r.recipient.lower() for r in rep.recipients}
        fam = _family("flufl-" + name)
        scores.add(fam, "recipient", got == want, f"{name}: want {sorted(want)} got {sorted(got)} kind={rep.kind}")
        if want:
            want_kind = "delay" if klass == "temporary" else "bounce"
            scores.add(fam, "kind", rep.kind == want_kind, f"{name}: want {want_kind} got {rep.kind}")
    return scores


def run_arf(base: Path, classifier: Classifier, families: set[str] | None = None) -> Scores:
    scores = Scores()
    for row in _read_tsv(base / "expectations.tsv"):
        path = (base / row["path"]).resolve()
        if not path.exists():
            continue
        rep = parse_message(path.read_bytes(), classifier)
        fam = row["path"].split("/")[0] if not row["path"].startswith("..") else "sisimai-arf"
        if fam == "abuseio":
            fam = "abuseio/" + Path(row["path"]).stem.rsplit("_example", 1)[0]
        if families is not None and "arf-fbl" not in families:
            continue
        for col, attr in ARF_FIELDS.items():
            want = row.get(col, "")
            if not want:
                continue
            got = getattr(rep.feedback, attr) if rep.feedback else None
            scores.add(fam, "arf:" + col, got == want, f"{row['path']}: {col} want {want!r} got {got!r}")
    return scores


# -- held-out folds: drop the rule alternatives only the held-out family needs ---------------

def _note(classifier: Classifier, family: str) -> None:
    if isinstance(classifier, RecordingClassifier):
        classifier.family = family


def _alternatives(rule: dict) -> list[str]:
    t = rule.get("text")
    return [] if t is None else [t] if isinstance(t, str) else list(t)


class RecordingClassifier(Classifier):
    """The shipped rules, no verdict cache; records which text alternatives of the
    deciding rule matched, per source family: usage[(rule name, alternative)] = families."""

    def __init__(self, rules_path: Path = SHIPPED_RULES):
        super().__init__()
        self._files = [rules_path]
        self._load()
        self.family = ""
        self.usage: dict[tuple[str, str], set[str]] = defaultdict(set)
        self._alts = {r["name"]: [(a, re.compile(_lower_regex(a))) for a in _alternatives(r)]
                      for r in tomllib.loads(rules_path.read_text())["rule"]}

    def classify(self, code, status, text):   # type: ignore[override]
        return self._classify(code, status, (text or "")[:2000].lower())

    def _match(self, code, status, text):     # type: ignore[override]
        v = super()._match(code, status, text)
        for alt, rx in self._alts.get(v.rule, ()):
            if rx.search(text):
                self.usage[(v.rule, alt)].add(self.family)
        return v


def ablated_rules(usage: dict[tuple[str, str], set[str]], held_out: set[str], out: Path) -> int:
    """Write the shipped rules less every alternative used only by held_out families; the count dropped."""
    doc = tomllib.loads(SHIPPED_RULES.read_text())
    dropped, lines = 0, []
    for r in doc["rule"]:
        alts = _alternatives(r)
        keep = [a for a in alts if not (usage.get((r["name"], a)) and usage[(r["name"], a)] <= held_out)]
        dropped += len(alts) - len(keep)
        if alts and not keep:
            continue
        lines.append("[[rule]]")
        for k, v in r.items():
            if k == "text":
                v = keep
            lines.append(f"{k} = {json.dumps(v)}")
        lines.append("")
    out.write_text("\n".join(lines))
    return dropped


def _recipients_found(bases: dict[str, Path], runners: dict, classifier: Classifier) -> dict[str, int]:
    out: dict[str, int] = {}
    for title, fn in runners.items():
        if title in bases:
            for fam, d in fn(bases[title], classifier).families.items():
                if "recipient" in d:
                    out[fam] = d["recipient"].ok
    return out


def parser_needs(bases: dict[str, Path], runners: dict) -> list[set[str]]:
    """For each text-scan pattern (textscan._PATTERNS), the families that find fewer
    recipients without it."""
    c = Classifier()
    full = _recipients_found(bases, runners, c)
    patterns = textscan._PATTERNS
    needs = []
    try:
        for i in range(len(patterns)):
            textscan._PATTERNS = patterns[:i] + patterns[i + 1:]
            less = _recipients_found(bases, runners, c)
            needs.append({f for f, n in full.items() if less.get(f, 0) < n})
    finally:
        textscan._PATTERNS = patterns
    return needs


def run_folds(bases: dict[str, Path], only: list[str] | None) -> tuple[dict[str, Scores], int, list[str]]:
    """Leave-one-family-out over sisimai and flufl: (title -> held-out scores, alternatives dropped, log).

    Also drops each text-scan layout pattern that only the held-out family needs."""
    rec = RecordingClassifier()
    runners = {"sisimai-set-of-emails": run_sisimai, "flufl-bounce": run_flufl}
    fams: dict[str, set[str]] = {}
    for title, fn in runners.items():
        if title in bases:
            sc = fn(bases[title], rec)
            fams[title] = set(sc.families)
    needs = parser_needs(bases, runners)
    patterns = textscan._PATTERNS
    out = {t: Scores() for t in fams}
    total, notes = 0, []
    with tempfile.TemporaryDirectory() as tmp:
        for title, families in fams.items():
            for fam in sorted(families):
                if only and fam not in only:
                    continue
                path = Path(tmp) / "rules.toml"
                n = ablated_rules(rec.usage, {fam}, path)
                only_it = [i for i, need in enumerate(needs) if need and need <= {fam}]
                total += n + len(only_it)
                if n or only_it:
                    notes.append(f"{fam}: {n} rule alternative(s), {len(only_it)} text-scan pattern(s) only it needs")
                held = RecordingClassifier(path)
                textscan._PATTERNS = tuple(p for i, p in enumerate(patterns) if i not in only_it)
                try:
                    sc = runners[title](bases[title], held, {fam})
                finally:
                    textscan._PATTERNS = patterns
                for name, t in sc.fields.items():
                    out[title].fields[name].ok += t.ok
                    out[title].fields[name].total += t.total
                for f2, d in sc.families.items():
                    for name, t in d.items():
                        out[title].families[f2][name] = t
                out[title].failures += sc.failures
    return out, total, notes


def table(title: str, scores: Scores) -> str:
    names = sorted(scores.fields, key=lambda n: (n.startswith("arf:"), n))
    out = [f"== {title}", "overall:"]
    for n in names:
        t = scores.fields[n]
        out.append(f"  {n:24} {t.pct:6.1f}%  ({t.ok}/{t.total})")
    out.append("per family:")
    for fam in sorted(scores.families):
        cells = [f"{n}={t.ok}/{t.total}" for n, t in sorted(scores.families[fam].items())]
        out.append(f"  {fam:28} " + "  ".join(cells))
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", type=Path,
                    help="one folder holding all three corpora (default: each found by tools/corpora.py)")
    ap.add_argument("--failures", action="store_true", help="list every failed comparison")
    ap.add_argument("--folds", action="store_true",
                    help="leave-one-family-out held-out estimate instead of the full corpus scores")
    ap.add_argument("--holdout", action="append", metavar="FAMILY",
                    help="held-out estimate for this family only (e.g. lhost-exim, flufl-qmail); repeatable")
    args = ap.parse_args(argv)
    classifier = Classifier()
    not_scored = 0
    bases: dict[str, Path] = {}
    for title in ("sisimai-set-of-emails", "flufl-bounce", "arf-fbl"):
        base = corpora.find(title) if args.corpus is None else args.corpus / title
        if base is None or not base.is_dir():
            print(f"== {title}: not scored, " + (corpora.missing(title) if args.corpus is None else f"no folder {base}"),
                  file=sys.stderr)
            not_scored += 1
            continue
        bases[title] = base
    if args.folds or args.holdout:
        held, dropped, notes = run_folds(bases, args.holdout)
        print(f"# leave-one-family-out: {dropped} rule alternative(s) / text-scan pattern(s) dropped in all, "
              f"over {len(notes)} families")
        for n in notes:
            print("#   " + n)
        for title, scores in held.items():
            print(table(title + " (held out)", scores))
            if args.failures and scores.failures:
                print("failures:")
                for line in scores.failures:
                    print("  " + line)
            print()
        return 1 if not_scored else 0
    for title, fn in (("sisimai-set-of-emails", run_sisimai), ("flufl-bounce", run_flufl), ("arf-fbl", run_arf)):
        if title not in bases:
            continue
        scores = fn(bases[title], classifier)
        print(table(title, scores))
        if args.failures and scores.failures:
            print("failures:")
            for line in scores.failures:
                print("  " + line)
        print()
    return 1 if not_scored else 0


if __name__ == "__main__":
    sys.exit(main())

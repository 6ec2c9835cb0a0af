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
  hard        sisimai hardbounce column
  feedback    feedback_type of sisimai arf-* rows
  kind        flufl: permanent -> "bounce", temporary -> "delay"
  arf:<Field> arf-fbl fields, exact text

Usage: tools/bounce_accuracy.py [--corpus DIR] [--failures]
  DIR: one folder holding all three; exit status 1 when a corpus was not found.
"""
from __future__ import annotations

import argparse
import csv
import re
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import corpora  # noqa: E402  (tools/corpora.py)

from mta.feedback.bounce import Classifier, Report, parse_message  # noqa: E402

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
            scores.add(fam, "hard", hard == want,
                       f"{ctx}: want {want} ({row['reason']}) got {hard} "
                       f"({None if r is None else (r.category, r.reply_code, r.status, r.diagnostic[:150])})")
        if row["feedback_type"]:
            ft = rep.feedback.feedback_type if rep.feedback else None
            scores.add(fam, "feedback", ft == row["feedback_type"], f"{ctx}: want {row['feedback_type']} got {ft}")


def run_sisimai(base: Path, classifier: Classifier) -> Scores:
    scores = Scores()
    by_file: dict[str, list[dict[str, str]]] = defaultdict(list)
    for row in _read_tsv(base / "expectations.tsv"):
        by_file[row["file"]].append(row)
    for name, rows in sorted(by_file.items()):
        path = base / "maildir" / "bsd" / name
        if path.exists():
            score_sisimai_rows(scores, parse_message(path.read_bytes(), classifier), rows, f"bsd/{name}")
    for row in _read_tsv(base / "line-ending-variants.tsv"):
        variant = base / row["variant_file"]
        bsd_name = Path(row["bsd_counterpart"]).name
        if row["identical_after_newline_normalisation"] != "yes" or bsd_name not in by_file or not variant.exists():
            continue
        rep = parse_message(variant.read_bytes(), classifier)
        score_sisimai_rows(scores, rep, by_file[bsd_name], row["variant_file"].removeprefix("maildir/"))
    for path in sorted((base / "maildir" / "not").glob("*")):
        rep = parse_message(path.read_bytes(), classifier)
        scores.add("not-bounce", "nothing", not rep.recipients and rep.kind == "none",
                   f"not/{path.name}: kind={rep.kind} {[r.recipient for r in rep.recipients]}")
    return scores


def run_flufl(base: Path, classifier: Classifier) -> Scores:
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
        if not path.exists():
            continue
        rep = parse_message(path.read_bytes(), classifier)
        got = {r.recipient.lower() for r in rep.recipients}
        fam = _family(name)
        scores.add(fam, "recipient", got == want, f"{name}: want {sorted(want)} got {sorted(got)} kind={rep.kind}")
        if want:
            want_kind = "delay" if klass == "temporary" else "bounce"
            scores.add(fam, "kind", rep.kind == want_kind, f"{name}: want {want_kind} got {rep.kind}")
    return scores


def run_arf(base: Path, classifier: Classifier) -> Scores:
    scores = Scores()
    for row in _read_tsv(base / "expectations.tsv"):
        path = (base / row["path"]).resolve()
        if not path.exists():
            continue
        rep = parse_message(path.read_bytes(), classifier)
        fam = row["path"].split("/")[0] if not row["path"].startswith("..") else "sisimai-arf"
        if fam == "abuseio":
            fam = "abuseio/" + Path(row["path"]).stem.rsplit("_example", 1)[0]
        for col, attr in ARF_FIELDS.items():
            want = row.get(col, "")
            if not want:
                continue
            got = getattr(rep.feedback, attr) if rep.feedback else None
            scores.add(fam, "arf:" + col, got == want, f"{row['path']}: {col} want {want!r} got {got!r}")
    return scores


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
    args = ap.parse_args(argv)
    classifier = Classifier()
    not_scored = 0
    for title, fn in (("sisimai-set-of-emails", run_sisimai), ("flufl-bounce", run_flufl), ("arf-fbl", run_arf)):
        base = corpora.find(title) if args.corpus is None else args.corpus / title
        if base is None or not base.is_dir():
            print(f"== {title}: not scored, " + (corpora.missing(title) if args.corpus is None else f"no folder {base}"),
                  file=sys.stderr)
            not_scored += 1
            continue
        scores = fn(base, classifier)
        print(table(title, scores))
        if args.failures and scores.failures:
            print("failures:")
            for line in scores.failures:
                print("  " + line)
        print()
    return 1 if not_scored else 0


if __name__ == "__main__":
    sys.exit(main())

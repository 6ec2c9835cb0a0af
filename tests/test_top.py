"""`mta top` against a real daemon relaying to a real sink (tools/sink.py):

- `--once` prints one plain frame (no escape codes) with the provider's and source's
  rates and the totals, and the rates are above zero while mail flows;
- the interactive screen under tmux (a real terminal): the numbers move when mail flows,
  `q` and Ctrl-C quit with status 0 and leave the terminal as it was (the shell's screen,
  not top's, after it ends);
- frame() with hostile text (a remote reply with escape sequences) prints none of it.
"""
from __future__ import annotations

import os
import re
import shutil
import smtplib
import subprocess
import sys
import threading
import time

import pytest
from conftest import ROOT, free_port, missing_tool

from mta.control.top import frame
from mta.control.views import LiveError, LiveRow, LiveView, OutcomeCounts


class Flow:
    """A thread sending messages through the daemon's SMTP listener until stopped."""

    def __init__(self, port: int, domains: tuple[str, ...] = ("a.test",)):
        self.port, self.domains = port, domains
        self.sent = 0
        self.stop_event = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            with smtplib.SMTP("127.0.0.1", self.port, timeout=20) as s:
                while not self.stop_event.is_set():
                    dom = self.domains[self.sent % len(self.domains)]
                    s.sendmail("s@sender.test", [f"u{self.sent}@{dom}"],
                               b"From: <s@sender.test>\r\nSubject: top\r\n\r\nhello\r\n")
                    self.sent += 1
                    time.sleep(0.01)
        except BaseException as exc:   # the test reports it
            self.error = exc

    def __enter__(self) -> Flow:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop_event.set()
        self.thread.join(30)
        assert self.error is None, f"sending failed: {self.error!r}"


@pytest.fixture
def relay(daemon_factory, tmp_path):
    """A daemon relaying everything to tools/sink.py on a free loopback port."""
    port = free_port()
    sink = subprocess.Popen([sys.executable, str(ROOT / "tools" / "sink.py"), f"127.0.0.1:{port}"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        assert sink.stdout is not None and b"ready" in sink.stdout.readline()
        d = daemon_factory(extra=f'[delivery]\nsmarthost = "127.0.0.1:{port}"\n')
        yield d
    finally:
        sink.terminate()
        sink.wait(30)


def _top(d, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mta", "top", "-c", str(d.config), *args],
                          capture_output=True, text=True, timeout=timeout, cwd=d.workdir,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)), check=False)


def _row(text: str, title: str) -> list[str]:
    """The first data line after the table header starting with `title`."""
    lines = text.splitlines()
    i = next(n for n, ln in enumerate(lines) if ln.startswith(title))
    return lines[i + 1].split()


def test_once_against_a_daemon_with_mail_flowing(relay):
    with Flow(relay.port) as flow:
        deadline = time.monotonic() + 30
        while flow.sent < 20 and time.monotonic() < deadline:
            time.sleep(0.1)
        res = _top(relay, "--once", "--interval", "2")
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert "\x1b" not in out                        # plain text over a pipe
    assert out.startswith("mta top ")
    m = re.search(r"delivered ([\d.]+)/s", out)
    assert m and float(m.group(1)) > 0, out
    provider = _row(out, "PROVIDER")
    assert provider[0] == f"[127.0.0.1]:{relay_sink_port(relay)}", out
    assert float(provider[1]) > 0, out              # deliv/s of the smarthost's site
    source = _row(out, "SOURCE")
    assert source[0] == "default" and float(source[1]) > 0, out
    total = int(re.search(r"\| *scheduled (\d+)", out).group(1))
    assert total >= 0
    assert "SUSPENSIONS AND THROTTLES (0)" in out


def relay_sink_port(d) -> int:
    return int(re.search(r'smarthost = "127.0.0.1:(\d+)"', d.config.read_text()).group(1))


def test_once_without_a_daemon_exits_3(daemon_factory):
    d = daemon_factory(start=False)
    d.spool_dir.mkdir(parents=True, exist_ok=True)
    (d.spool_dir / "admin.token").write_text("x" * 64 + "\n")
    res = _top(d, "--once", "--interval", "0.2")
    assert res.returncode == 3, res
    assert "cannot reach the daemon's admin API" in res.stderr


class Tmux:
    """A private tmux server (its own socket name), killed at the end."""

    def __init__(self, name: str):
        self.name = name

    def run(self, *args: str) -> str:
        return subprocess.run(["tmux", "-L", self.name, *args], capture_output=True, text=True,
                              timeout=20, check=True).stdout

    def capture(self) -> str:
        return self.run("capture-pane", "-p", "-t", "top")

    def wait_for(self, pattern: str, timeout: float = 30) -> re.Match:
        deadline = time.monotonic() + timeout
        while True:
            screen = self.capture()
            m = re.search(pattern, screen)
            if m:
                return m
            if time.monotonic() > deadline:
                raise AssertionError(f"no {pattern!r} on the screen:\n{screen}")
            time.sleep(0.2)


@pytest.fixture
def tmux(tmp_path):
    if shutil.which("tmux") is None:
        missing_tool("tmux is not installed (tools/dev.sh installs it)")
    t = Tmux(f"mta-top-test-{os.getpid()}-{tmp_path.name}")
    yield t
    subprocess.run(["tmux", "-L", t.name, "kill-server"], capture_output=True, timeout=20,
                   check=False)


def _start_top(tmux: Tmux, d) -> None:
    # the shell survives the Ctrl-C sent to the foreground group (a handler, not ignored:
    # top gets SIGINT as usual) and shows how top ended
    cmd = (f"trap 'echo' INT; cd {d.workdir} && clear && echo SHELL-SCREEN && "
           f"PYTHONPATH={ROOT} {sys.executable} -m mta top -c {d.config} --interval 0.5; "
           "echo TOP-EXIT=$?; sleep 600")
    tmux.run("new-session", "-d", "-s", "top", "-x", "150", "-y", "50",
             "env", "TERM=xterm-256color", "sh", "-c", cmd)
    tmux.wait_for(r"(?m)^PROVIDER")


@pytest.mark.parametrize("quit_key", ["q", "C-c"])
def test_interactive_under_tmux(relay, tmux, quit_key):
    _start_top(tmux, relay)
    assert "SHELL-SCREEN" not in tmux.capture()        # top's own (alternate) screen
    before = int(tmux.wait_for(r"received (\d+) +delivered (\d+)").group(2))
    with Flow(relay.port) as flow:
        deadline = time.monotonic() + 30
        while flow.sent < 20 and time.monotonic() < deadline:
            time.sleep(0.1)
        m = tmux.wait_for(r"delivered [1-9][\d.]*/s")    # a rate above zero
        rate_line = m.group(0)
        after = int(tmux.wait_for(r"received (\d+) +delivered ([1-9]\d*)").group(2))
    assert after > before, rate_line
    screen = tmux.capture()
    assert re.search(rf"(?m)^\[127\.0\.0\.1\]:{relay_sink_port(relay)} +[\d.]+", screen), screen
    tmux.run("send-keys", "-t", "top", quit_key)
    tmux.wait_for(r"TOP-EXIT=0")
    screen = tmux.capture()
    assert "SHELL-SCREEN" in screen and "PROVIDER" not in screen, screen   # terminal restored


def _view(errors: list[LiveError], rows: list[LiveRow], at: float) -> LiveView:
    return LiveView(at, OutcomeCounts(10, 1, 2, 0), 12, 3, 1, 0, 1, rows, [], errors)


def test_frame_rates_and_hostile_text():
    evil = "mx.\x1b[2J\x1b]0;pwned\x07evil.test"
    prev = _view([], [LiveRow("s1", evil, "prov", 10, 0, 0, 1, 0, 5, None)], 100.0)
    cur = _view([LiveError(101.0, "deferred", "s1", evil, 451, "4.7.0 \x1b[31mslow down\r\n")],
                [LiveRow("s1", evil, "prov", 30, 4, 0, 1, 2, 5, 200.0),
                 LiveRow("s2", evil, "prov", 10, 0, 0, 0, 0, 5, None)], 102.0)
    text = "\n".join(frame(cur, prev, 2.0))
    assert "\x1b" not in text and "\x07" not in text and "\r" not in text
    provider = _row(text, "PROVIDER")
    # s1: (30-10)/2 = 10/s; s2 appeared in between: 10/2 = 5/s; the site's depth once
    assert provider[:7] == ["prov", "15.0", "2.0", "0.0", "5", "2", "1"], text
    assert provider[7] == "SUSPENDED"
    assert "slow down" in text


def test_live_stats_ring_and_pair_counts_from_the_engine():
    from types import SimpleNamespace

    from mta.control.views import LiveStats, pair_counts
    from mta.model.attempt import Attempt, AttemptResult, RemoteReply
    engine = SimpleNamespace(outcomes=SimpleNamespace(observers=[], by_pair={}), dispatchers={})
    stats = LiveStats(engine, errors=3)
    assert engine.outcomes.observers == [stats.observe]
    ok, soft, hard = RemoteReply(250, "2.0.0", "ok"), RemoteReply(451, "4.7.0", "slow"), \
        RemoteReply(550, "5.1.1", "\x1b[2Jno such user " + "x" * 300)
    for n in range(5):
        stats.observe(AttemptResult(None, None, Attempt("s1", "site"),
                                    [(0, ok), (1, soft), (2, hard if n % 2 else ok)]))
    assert len(stats.errors) == 3 and stats.errors[-1].kind == "deferred"
    assert [e.kind for e in stats.errors] == ["deferred", "bounced", "deferred"]
    assert all(len(e.text) <= 200 for e in stats.errors)
    # the counts are the engine's rows (delivered, bounced, deferred) summed per pair
    engine.outcomes.by_pair = {"s1": {"site": {"bulk": {"p1": [3, 1, 2], "p2": [5, 1, 3]},
                                               "transactional": {"p1": [0, 0, 0]}}}}
    assert pair_counts(engine, "s1", "site") == (8, 5, 2)
    assert pair_counts(engine, "s1", "other") == (0, 0, 0)

"""Test helpers for `mailflow inbound` run as a process: real SMTP client tools (swaks, postfix's
smtp-source) and a bare-socket client that sends bytes exactly as given.

The tools are required, not optional: a missing one fails the test with the package to
install (CI installs them), because a skipped test would prove nothing while looking green.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from .conftest import Processes, wait_until
from .dns_server import DnsServer
from .servers import free_port

SENDER = "ann@sender.example"

# (binary, Debian package that installs it)
SWAKS = ("swaks", "swaks")
SMTP_SOURCE = ("smtp-source", "postfix")


def tool(spec: tuple[str, str]) -> str:
    """The path of a client tool, or a failed test that names the package to install."""
    name, package = spec
    found = shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}") if os.access(p, os.X_OK)), None
    )
    if found is None:
        pytest.fail(
            f"{name} is not installed: apt-get install {package} (these tests use it as the SMTP client)",
            pytrace=False,
        )
    return found


@contextmanager
def local_dns(env: dict[str, str]) -> Iterator[dict[str, str]]:
    """The processes' environment with DNS answered by a local server that knows no name:
    the server's lookups (authentication looks senders up) get a quick NXDOMAIN, never the
    machine's resolver."""
    with DnsServer({}) as dns:
        yield dict(env, MAILFLOW_DNS_SERVERS=json.dumps([dns.address]))


@dataclass
class Inbound:
    """A `mailflow inbound` process on a port of its own (started again on the same port)."""

    procs: Processes
    env: dict[str, str]
    port: int
    proc: subprocess.Popen[bytes] | None = None
    started: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start(self) -> Inbound:
        self.proc = self.procs.start("inbound", "--port", str(self.port), env=self.env)
        self.started.append(self.proc)
        wait_until(self._answers, 30, what=f"`mailflow inbound` to answer on port {self.port}")
        return self

    def _answers(self) -> bool:
        assert self.proc is not None
        assert self.proc.poll() is None, f"`mailflow inbound` exited {self.proc.returncode}:\n{self.log()}"
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=2) as sock:
                return sock.makefile("rb").readline().startswith(b"220")
        except OSError:
            return False

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL, and wait until it is gone."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    def log(self) -> str:
        return "\n".join(self.procs.log_of(p) for p in self.started)[-6000:]


def start_inbound(procs: Processes, env: dict[str, str], **settings: object) -> Inbound:
    """`mailflow inbound` with MAILFLOW_INBOUND_<NAME> settings, e.g. max_recipients=3."""
    extra = {f"MAILFLOW_INBOUND_{k.upper()}": str(v) for k, v in settings.items()}
    return Inbound(procs, dict(env, **extra), free_port()).start()


def received(db) -> int:
    """How many messages are stored (inbound_messages rows)."""
    return int(db.execute("SELECT count(*) FROM inbound_messages").fetchone()[0])


# --- swaks ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    command: str  # what it answers: "banner", "EHLO", "MAIL", "RCPT", "DATA", "." (end of data), ...
    code: int
    text: str  # the last line's text, after the code


@dataclass(frozen=True)
class Transcript:
    exit_code: int
    output: str
    replies: tuple[Reply, ...]
    sent: tuple[str, ...]  # the command lines swaks sent, as it shows them

    def of(self, command: str) -> list[Reply]:
        return [r for r in self.replies if r.command == command]

    def end_of_data(self) -> Reply:
        [reply] = self.of(".")
        return reply


_SENT = re.compile(r"^ [-~]> (.*)$")
_REPLY = re.compile(r"^<[-~*][ *] (\d{3})([ -])(.*)$")  # "<-  250 OK", "<** 550 ...", "<~  250" under TLS


def parse_swaks(exit_code: int, output: str) -> Transcript:
    """Which reply answered which command: the last command word sent before it (a reply that
    follows a 354 answers the end of the data)."""
    replies: list[Reply] = []
    sent: list[str] = []
    last = "banner"
    in_data = False
    for line in output.splitlines():
        m = _SENT.match(line)
        if m:
            sent.append(m.group(1))
            if not in_data:
                last = m.group(1).split(" ", 1)[0].split(":", 1)[0].upper() or last
            continue
        m = _REPLY.match(line)
        if m and m.group(2) == " ":
            code = int(m.group(1))
            replies.append(Reply("." if in_data else last, code, m.group(3).strip()))
            in_data = code == 354
    return Transcript(exit_code, output, tuple(replies), tuple(sent))


def swaks(port: int, *args: str, to: str = "help@acme.example", mail_from: str = SENDER) -> Transcript:
    """One swaks session (EHLO client.test) against 127.0.0.1:port; every reply kept."""
    binary = tool(SWAKS)
    cmd = [binary, "--server", f"127.0.0.1:{port}", "--helo", "client.test", "--timeout", "30"]
    cmd += ["--from", mail_from, "--to", to, *args]
    done = subprocess.run(cmd, capture_output=True, text=True, errors="replace", timeout=120)
    return parse_swaks(done.returncode, done.stdout + done.stderr)


# --- a bare-socket client ------------------------------------------------------------------


class Dropped(Exception):
    """The server closed the connection without a reply."""


class RawSMTP:
    """An SMTP client over a bare socket: the message bytes go exactly as given (dot-stuffed
    per CRLF line, as RFC 5321 asks, and nothing else: no client repairs them)."""

    def __init__(self, port: int, timeout: float = 60) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.file = self.sock.makefile("rb")
        self.banner = self.reply()

    def __enter__(self) -> RawSMTP:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.sock.sendall(b"QUIT\r\n")
        except OSError:
            pass
        self.file.close()
        self.sock.close()

    def reply(self) -> tuple[int, str]:
        while True:
            line = self.file.readline()
            if not line:
                raise Dropped("the server closed the connection without a reply")
            if line[3:4] != b"-":
                return int(line[:3]), line[4:].decode(errors="replace").strip()

    def command(self, line: bytes | str) -> tuple[int, str]:
        self.sock.sendall((line.encode() if isinstance(line, str) else line) + b"\r\n")
        return self.reply()

    def data(self, payload: bytes) -> tuple[int, str]:
        """DATA, the payload, the end of data: the reply to the end of data (or to DATA)."""
        code, text = self.command("DATA")
        if code != 354:
            return code, text
        self.sock.sendall(stuffed(payload) + b".\r\n")
        return self.reply()

    def send(self, mail_from: str, rcpts: list[str], payload: bytes) -> list[tuple[int, str]]:
        """MAIL, each RCPT, DATA (after the caller's EHLO): every reply."""
        replies = [self.command(f"MAIL FROM:<{mail_from}>")]
        replies += [self.command(f"RCPT TO:<{r}>") for r in rcpts]
        replies.append(self.data(payload))
        return replies


def stuffed(payload: bytes) -> bytes:
    """The payload as DATA carries it: a line that starts with '.' gets another, and the last
    line is ended with CRLF if it was not (SMTP cannot carry a message that does not end so)."""
    if not payload:
        return b""
    lines = as_sent(payload).split(b"\r\n")
    return b"\r\n".join(b"." + line if line.startswith(b".") else line for line in lines)


def as_sent(payload: bytes) -> bytes:
    """What the server receives for a payload (the CRLF that SMTP needs at the end)."""
    return payload if not payload or payload.endswith(b"\r\n") else payload + b"\r\n"


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


# --- postfix's smtp-source -----------------------------------------------------------------

_UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
_STORED = re.compile(rf"<<< 250 2\.0\.0 .*?({_UUID})")  # mailflow's 250 to the end of data names the message


class SmtpSource:
    """postfix's smtp-source, verbose: its log shows each command it sent and each reply it read
    (smtp-source's own counter, -c, counts messages sent, not acknowledged)."""

    def __init__(self, port: int, log: Path, *args: str) -> None:
        self.log = log
        self.args = [tool(SMTP_SOURCE), "-v", "-M", "tools.test", *args, f"127.0.0.1:{port}"]
        with open(log, "wb") as err:
            self.proc = subprocess.Popen(self.args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout)

    def lines(self) -> list[str]:
        return self.log.read_text(errors="replace").splitlines()

    def acknowledged(self) -> list[str]:
        """The message id in each 250 the client read for the end of a message, in order."""
        return [m.group(1) for line in self.lines() if (m := _STORED.search(line))]

    def ends_of_data(self) -> int:
        """How many messages it sent to the end ('.'), acknowledged or not."""
        return sum(1 for line in self.lines() if line.endswith(": ."))

    def refusals(self) -> list[str]:
        """Every 4xx and 5xx reply it read."""
        return [line for line in self.lines() if re.search(r"<<< [45]\d\d", line)]

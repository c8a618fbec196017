"""Real spam scorers for tests: SpamAssassin's spamd and rspamd, each on a free port of
127.0.0.1 with a directory of its own (configuration, home, logs), started for a test
module and stopped after it. Never the machine's own services, never fakes.

Both are set up to start in about a second and to stay on this machine. spamd: `--local`
(no DNS or network tests), `dns_available no`, Bayes and autolearn off, and the Debian
package's rules as installed. rspamd: the Debian package's configuration with overrides of
our own (`--var LOCAL_CONFDIR=...`): DNS sent to a DnsServer of the test's own that knows
no names, the modules that fetch maps or ask fuzzy servers off, the controller and proxy
workers off, and a four-suffix TLD list instead of the 9,600-suffix one (compiling that
takes ~9 s).

A scorer that is not installed fails the test with the Debian package to install: CI
installs them, so a missing one is a broken machine, not a reason to skip.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from .dns_server import DnsServer
from .servers import free_port

_SBIN = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def _binary(name: str, package: str) -> str:
    found = shutil.which(name) or shutil.which(name, path=_SBIN)
    if not found:
        pytest.fail(
            f"{name} is not installed: apt-get install {package} (the real-scorer tests need it)", pytrace=False
        )
    return found


def _ask(port: int, request: bytes, timeout_s: float = 1.0) -> bytes:
    """One request on a fresh connection; what came back before the server closed it."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
        sock.sendall(request)
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks)


class _Daemon:
    """A scorer process of this test run's own: started by start(), ended by stop() (by its pid)."""

    name = ""
    startup_timeout_s = 60.0

    def __init__(self) -> None:
        # Not under pytest's temp root, which prunes old folders while other sessions run.
        self.dir = Path(tempfile.mkdtemp(prefix=f"mf{self.name}-"))
        self.dir.chmod(0o755)  # the daemon's unprivileged user reads its configuration here
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.startup_s = 0.0
        self.run_as: pwd.struct_passwd | None = None

    @property
    def log(self) -> Path:
        return self.dir / "output.log"

    def command(self) -> list[str]:
        raise NotImplementedError

    def ready(self) -> bool:
        raise NotImplementedError

    def _own(self, *paths: Path) -> None:
        """Hand directories the daemon writes to its unprivileged user (when we are root)."""
        for path in paths:
            path.mkdir(parents=True, exist_ok=True)
            if self.run_as is not None:
                os.chown(path, self.run_as.pw_uid, self.run_as.pw_gid)

    def start(self) -> None:
        started = time.monotonic()
        command = self.command()
        with self.log.open("ab") as output:  # the daemon keeps a descriptor of its own
            self.process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, cwd=self.dir)
        deadline = started + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(
                    f"{self.name} exited with {self.process.returncode} on start:\n{self.tail()}", pytrace=False
                )
            with contextlib.suppress(OSError):
                if self.ready():
                    self.startup_s = time.monotonic() - started
                    return
            time.sleep(0.05)
        self.stop()
        pytest.fail(f"{self.name} did not answer within {self.startup_timeout_s} s:\n{self.tail()}", pytrace=False)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()  # both stop their worker children on SIGTERM
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self.process = None

    def tail(self, lines: int = 30) -> str:
        texts = [p.read_text(errors="replace") for p in sorted(self.dir.rglob("*.log"))]
        return "\n".join("\n".join(t.splitlines()[-lines:]) for t in texts)

    def __enter__(self):
        try:
            self.start()
        except BaseException:  # pytest.fail() raises a BaseException; the failure has the log's tail
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class RealSpamd(_Daemon):
    """SpamAssassin's spamd (Debian: spamassassin, spamd), on 127.0.0.1:`port`."""

    name = "spamd"

    def command(self) -> list[str]:
        spamd = _binary("spamd", "spamassassin spamd")
        config = self.dir / "config"
        config.mkdir()
        # The plugins the package loads (SPF, DKIM, ...), without the machine's local.cf.
        for pre in Path("/etc/spamassassin").glob("*.pre"):
            shutil.copy(pre, config / pre.name)
        (config / "local.cf").write_text(
            "use_bayes 0\nbayes_auto_learn 0\nskip_rbl_checks 1\ndns_available no\nuse_razor2 0\nuse_pyzor 0\n"
        )
        for path in config.iterdir():
            path.chmod(0o644)
        config.chmod(0o755)
        args = [
            spamd,
            f"--listen=127.0.0.1:{self.port}",
            "--local",  # no DNS blocklists, Razor, Pyzor or DCC: nothing leaves the machine
            "--nouser-config",
            f"--siteconfigpath={config}",
            f"--helper-home-dir={self.dir / 'home'}",
            f"--pidfile={self.dir / 'spamd.pid'}",
            f"--syslog={self.dir / 'spamd.log'}",
            "--min-children=1",
            "--max-children=2",
            "--timeout-child=60",
        ]
        if os.geteuid() == 0:  # spamd would fall back to nobody anyway, with a warning
            self.run_as = pwd.getpwnam("nobody")
            args.append("--username=nobody")
        self._own(self.dir / "home")
        return args

    def ready(self) -> bool:
        reply = _ask(self.port, b"PING SPAMC/1.5\r\n\r\n")
        return reply.startswith(b"SPAMD/") and b"PONG" in reply


_RSPAMD_OFF = ("fuzzy_check", "rbl", "multimap", "phishing", "whitelist", "asn", "mime_types", "mid", "rspamd_update")


class RealRspamd(_Daemon):
    """rspamd's normal worker (Debian: rspamd), on http://127.0.0.1:`port` (/checkv2, /ping)."""

    name = "rspamd"

    def __init__(self) -> None:
        super().__init__()
        # Every name is unknown (NXDOMAIN at once), and no query leaves the machine.
        self.dns = DnsServer({})
        self._dns_up = False

    def start(self) -> None:
        self.dns.__enter__()
        self._dns_up = True
        super().start()

    def stop(self) -> None:
        super().stop()
        if self._dns_up:
            self.dns.__exit__(None, None, None)
            self._dns_up = False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        rspamd = _binary("rspamd", "rspamd")
        main = Path("/etc/rspamd/rspamd.conf")
        if not main.exists():
            pytest.fail(f"{main} is missing: apt-get install --reinstall rspamd", pytrace=False)
        local, override = self.dir / "local.d", self.dir / "override.d"
        local.mkdir()
        override.mkdir()
        (self.dir / "tld.dat").write_text("com\norg\nnet\nexample\n")
        (local / "options.inc").write_text(
            f'dns {{ nameserver = ["{self.dns.address}"]; timeout = 0.5s; retransmits = 1; }}\n'
            f'url_tld = "{self.dir / "tld.dat"}";\n'
        )
        (override / "worker-normal.inc").write_text(f'bind_socket = "127.0.0.1:{self.port}";\ncount = 1;\n')
        for worker in ("worker-controller.inc", "worker-proxy.inc"):
            (override / worker).write_text("enabled = false;\n")
        for module in _RSPAMD_OFF:
            (override / f"{module}.conf").write_text("enabled = false;\n")
        (override / "logging.inc").write_text('type = "file";\nfilename = "$LOGDIR/rspamd.log";\nlevel = "info";\n')
        if os.geteuid() == 0:  # rspamd refuses to run its workers as root
            self.run_as = pwd.getpwnam("_rspamd")
        self._own(self.dir / "run", self.dir / "db", self.dir / "logs")
        args = [rspamd, "-f", "-c", str(main)]
        if self.run_as is not None:
            args += ["-u", self.run_as.pw_name, "-g", grp.getgrgid(self.run_as.pw_gid).gr_name]
        for name, value in (("LOCAL_CONFDIR", self.dir), ("RUNDIR", self.dir / "run"), ("DBDIR", self.dir / "db")):
            args.append(f"--var={name}={value}")
        args.append(f"--var=LOGDIR={self.dir / 'logs'}")
        return args

    def ready(self) -> bool:
        reply = _ask(self.port, b"GET /ping HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        return reply.startswith(b"HTTP/1.1 200") and b"pong" in reply

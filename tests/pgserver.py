"""A throw-away PostgreSQL 15 instance on loopback, for fixture captures and e2e tests.

PostgreSQL refuses to run as root, so the cluster lives in a temp dir owned by ``postgres``
(under /tmp: pytest's own temp dirs are private to root) and every server binary runs through
``runuser -u postgres``. Set-up (roles, ``pgbench -i``) goes through the Unix socket in that
dir, so only the traffic a test means to measure crosses TCP, where the probe sees it.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from tests.conftest import free_ports

BIN = Path("/usr/lib/postgresql/15/bin")
# Roles that must authenticate over TCP, one per password method (trust for everyone else).
PASSWORD_ROLES = {"md5": "md5-Secret-7", "scram-sha-256": "scram-Secret-7",
                  "password": "clear-Secret-7"}


def role_name(method: str) -> str:
    return {"md5": "md5user", "scram-sha-256": "scramuser", "password": "clearuser"}[method]


class PostgresServer:
    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="ks-pg-"))
        owner = pwd.getpwnam("postgres")
        os.chown(self.dir, owner.pw_uid, owner.pw_gid)
        (self.port,) = free_ports(1)
        self.proc: subprocess.Popen[bytes] | None = None

    def _as_postgres(self, *argv: str, check: bool = True, **kw: object
                     ) -> subprocess.CompletedProcess[str]:
        done: subprocess.CompletedProcess[str] = subprocess.run(  # type: ignore[call-overload]
            ["runuser", "-u", "postgres", "--", *argv], capture_output=True, text=True,
            check=check, timeout=120, **kw)
        return done

    def start(self) -> None:
        data = self.dir / "data"
        self._as_postgres(str(BIN / "initdb"), "-D", str(data), "-U", "postgres", "-E", "UTF8",
                          "--auth-local=trust", "--auth-host=trust", "--no-sync")
        hba = [f"host all {role_name(m)} 127.0.0.1/32 {m}" for m in PASSWORD_ROLES]
        hba += ["local all all trust", "host all all 127.0.0.1/32 trust"]
        (data / "pg_hba.conf").write_text("\n".join(hba) + "\n")
        with open(self.dir / "server.log", "ab") as log:  # the server keeps its own copy
            self.proc = subprocess.Popen(
                ["runuser", "-u", "postgres", "--", str(BIN / "postgres"), "-D", str(data),
                 "-k", str(self.dir), "-p", str(self.port), "-c", "listen_addresses=127.0.0.1",
                 "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
                 "-c", "shared_buffers=16MB", "-c", "max_connections=30", "-c", "ssl=off"],
                stdout=subprocess.DEVNULL, stderr=log)
        deadline = time.monotonic() + 60
        while self.psql("SELECT 1", check=False).returncode != 0:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"postgres did not start:\n{self.log()}")
            time.sleep(0.2)
        for method, password in PASSWORD_ROLES.items():
            encryption = "md5" if method == "md5" else "scram-sha-256"
            self.psql(f"SET password_encryption = '{encryption}'; "
                      f"CREATE ROLE {role_name(method)} LOGIN PASSWORD '{password}'")

    def log(self) -> str:
        try:
            return (self.dir / "server.log").read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def psql(self, sql: str, *, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run SQL over the Unix socket (not seen by the probe), as the superuser."""
        return self._as_postgres(str(BIN / "psql"), "-X", "-q", "-h", str(self.dir), "-p",
                                 str(self.port), "-U", "postgres", "-d", "postgres",
                                 "-v", "ON_ERROR_STOP=1", "-c", sql, check=check)

    def pgbench_init(self, scale: int = 1) -> None:
        self._as_postgres(str(BIN / "pgbench"), "-i", "-q", "-s", str(scale), "-h",
                          str(self.dir), "-p", str(self.port), "-U", "postgres", "postgres")

    def postmaster_pid(self) -> int | None:
        try:
            return int((self.dir / "data" / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def stop(self) -> None:
        pid = self.postmaster_pid()  # runuser's child: signal it, not runuser
        if self.proc is not None and self.proc.poll() is None and pid is not None:
            os.kill(pid, signal.SIGINT)  # fast shutdown: backends end, then the postmaster
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.kill(pid, signal.SIGKILL)
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)

"""A real PostgreSQL server for the tests: ``initdb`` into a temporary directory, ``pg_ctl start`` listening on
a unix socket in that directory only (no TCP port), one fresh database per test, stopped at the end of the
session. Never a mock.

Needs the server binaries (Debian: ``apt-get install -y postgresql``, found under
``/usr/lib/postgresql/*/bin``; or ``initdb`` on PATH, or ``$FASTPATCH_PG_BIN``) and psycopg 3
(``pip install "psycopg[binary]"``); without them the tests that use ``pg_url`` are skipped with the
reason. PostgreSQL refuses to run as root: as root the server runs as the ``postgres`` system user
(``runuser``), with its directories chowned to it.
"""
from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest


def _bin_dir():
    env = os.environ.get("FASTPATCH_PG_BIN")
    if env:  # given: only there
        return Path(env) if (Path(env) / "initdb").is_file() and (Path(env) / "pg_ctl").is_file() else None
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[-2]), reverse=True)
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(str(Path(on_path).parent))
    for d in candidates:
        if d and (Path(d) / "initdb").is_file() and (Path(d) / "pg_ctl").is_file():
            return Path(d)
    return None


class PgServer:
    def __init__(self, bin_dir: Path, base: Path, as_user):
        self.bin, self.base, self.as_user = bin_dir, base, as_user
        self.data, self.sock, self.log = base / "data", base / "sock", base / "server.log"

    def _cmd(self, *argv):
        argv = [str(a) for a in argv]
        return (["runuser", "-u", self.as_user, "--"] + argv) if self.as_user else argv

    def run(self, *argv, timeout=120):
        return subprocess.run(self._cmd(*argv), capture_output=True, text=True, timeout=timeout)

    def init(self):
        r = self.run(self.bin / "initdb", "-D", self.data, "-U", "postgres", "--auth=trust", "-E", "UTF8",
                     "--no-instructions")
        if r.returncode:
            raise RuntimeError(f"initdb failed ({r.returncode}): {r.stderr[-2000:]}")

    def start(self):
        opts = (f"-c listen_addresses='' -c unix_socket_directories='{self.sock}' -c max_connections=200 "
                "-c shared_buffers=32MB")
        r = self.run(self.bin / "pg_ctl", "-D", self.data, "-l", self.log, "-o", opts, "-w", "-t", "120", "start")
        if r.returncode:
            log = self.log.read_text()[-2000:] if self.log.exists() else ""
            raise RuntimeError(f"pg_ctl start failed ({r.returncode}): {r.stderr[-1000:]} {log}")

    def stop(self, mode="fast"):
        self.run(self.bin / "pg_ctl", "-D", self.data, "-m", mode, "-w", "-t", "120", "stop")

    def url(self, dbname="postgres"):
        return f"postgresql://postgres@/{dbname}?host={self.sock}"


class PgUnavailable(RuntimeError):
    """PostgreSQL cannot run here (no binaries, no psycopg, root without a ``postgres`` user): the reason."""


def start_server(prefix: str = "fp-pg-") -> PgServer:
    """Start a throwaway PostgreSQL server in a new temporary directory (unix socket only). Raises
    PgUnavailable (with the reason and the fix) when it cannot run here, RuntimeError when initdb or pg_ctl
    fail. Stop it with :func:`stop_server`. Used by the ``pg_server`` fixture and by scripts
    (benchmarks/load_vllm_governed.py)."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        raise PgUnavailable('PostgreSQL store tests need psycopg 3: pip install "psycopg[binary]"') from None
    bin_dir = _bin_dir()
    if bin_dir is None:
        raise PgUnavailable("PostgreSQL store tests need the server binaries (initdb, pg_ctl): apt-get install -y "
                            "postgresql (Debian: /usr/lib/postgresql/*/bin), or set FASTPATCH_PG_BIN to their "
                            f"folder (now {os.environ.get('FASTPATCH_PG_BIN')!r})")
    as_user = None
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        if shutil.which("runuser") is None:
            raise PgUnavailable("running as root: PostgreSQL must run as another user, and runuser is missing")
        try:
            import pwd
            pw = pwd.getpwnam("postgres")
        except KeyError:
            raise PgUnavailable("running as root and there is no 'postgres' system user to run the server as "
                                "(apt-get install -y postgresql creates it)") from None
        as_user = "postgres"
    base = Path(tempfile.mkdtemp(prefix=prefix))  # short: a unix socket path is at most 107 bytes
    (base / "sock").mkdir()
    if as_user:
        for p in (base, base / "sock"):
            os.chown(p, pw.pw_uid, pw.pw_gid)
        os.chmod(base, 0o755)
    server = PgServer(bin_dir, base, as_user)
    try:
        server.init()
        server.start()
    except BaseException:
        shutil.rmtree(base, ignore_errors=True)
        raise
    return server


def stop_server(server: PgServer) -> None:
    """Stop a server from :func:`start_server` and remove its directory (data, socket, log)."""
    try:
        server.stop()
    finally:
        shutil.rmtree(server.base, ignore_errors=True)


def create_database(server: PgServer, name: str) -> str:
    """CREATE DATABASE ``name`` on ``server``; its ``postgresql://`` URL."""
    import psycopg

    with psycopg.connect(server.url(), autocommit=True) as c:
        c.execute(f"CREATE DATABASE {name}")
    return server.url(name)


def _unavailable(reason: str):
    """Skip, or fail where the environment promises PostgreSQL (CI sets FASTPATCH_REQUIRE_PG=1, so a
    missing install step fails loudly instead of turning these tests into skips)."""
    if os.environ.get("FASTPATCH_REQUIRE_PG") == "1":
        pytest.fail(f"FASTPATCH_REQUIRE_PG=1 but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def pg_server():
    """The session's PostgreSQL server (skips with the reason when the binaries or psycopg are missing)."""
    try:
        server = start_server()
    except PgUnavailable as exc:
        _unavailable(str(exc))
    try:
        yield server
    finally:
        stop_server(server)


@pytest.fixture
def pg_url(pg_server):
    """A fresh, empty database for this test: its ``postgresql://`` URL (dropped afterwards)."""
    import psycopg

    name = f"t_{uuid.uuid4().hex[:16]}"
    yield create_database(pg_server, name)
    with psycopg.connect(pg_server.url(), autocommit=True) as c:
        c.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

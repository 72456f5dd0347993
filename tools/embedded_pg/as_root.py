"""Running the embedded PostgreSQL as root, which PostgreSQL refuses: the unprivileged account
that runs the server instead, and places it can reach — the requested data directory, or else a
cluster and a copy of the binaries relocated under RELOCATE_ROOT (nothing above them is chmod-ed)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import pwd
import shutil
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

SYSTEM_USER = "renderflow-pg"
"""The system account created to run the server when we are root and `postgres` is absent."""
RELOCATE_ROOT = Path("/var/tmp/renderflow-pg")
"""As root: where clusters and binaries go when the server account cannot reach them in place."""
# The server gets a fixed, minimal environment: PG* variables of the caller must not leak in.
SERVER_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LC_ALL": "C"}


class PlacementError(RuntimeError):
    """No place the server account can reach could be made for the cluster."""


class Account(NamedTuple):
    """The unprivileged account that runs the server when we are root."""

    name: str
    uid: int
    gid: int


def as_account(account: Account | None, argv: Sequence[str]) -> list[str]:
    """`argv` run as `account` (None: as we are), by `setpriv`, which drops the privileges and
    executes it: no extra process, no PAM.

    Not Popen's `user`/`group`: dropping them in Python's child, between fork and exec, rules out
    vfork, and a fork of a process whose gRPC threads are busy (the supervisor of `renderflow run`
    checks health over gRPC) killed the child with SIGSEGV one time in three."""
    if account is None:
        return list(argv)
    setpriv = shutil.which("setpriv", path=SERVER_ENV["PATH"] + ":/usr/sbin:/sbin")
    if setpriv is None:
        raise PlacementError("running PostgreSQL as root needs setpriv (util-linux) to drop privileges")
    return [setpriv, f"--reuid={account.uid}", f"--regid={account.gid}", "--clear-groups", "--", *argv]


def server_account() -> Account | None:
    """None unless root; else `postgres`, or a system account of our own, or `nobody`."""
    if os.geteuid() != 0:
        return None
    for attempt in range(2):
        for name in ("postgres", SYSTEM_USER):
            with contextlib.suppress(KeyError):
                entry = pwd.getpwnam(name)
                return Account(name, entry.pw_uid, entry.pw_gid)
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
    return Account("nobody", entry.pw_uid, entry.pw_gid)


def _can_reach(account: Account, path: Path) -> bool:
    """Whether `account` can reach and search/execute `path` (every parent included)."""
    probe = ["/bin/sh", "-c", 'test -x "$1"', "sh", str(path)]
    result = subprocess.run(as_account(account, probe), cwd="/", env=SERVER_ENV, check=False)
    return result.returncode == 0


def _relocate_root() -> Path:
    RELOCATE_ROOT.mkdir(mode=0o755, parents=True, exist_ok=True)
    # Shared by every root run, and /var/tmp is world-writable: refuse a planted directory.
    info = RELOCATE_ROOT.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != 0 or info.st_mode & 0o022:
        raise PlacementError(f"{RELOCATE_ROOT} must be a directory only root can write")
    return RELOCATE_ROOT


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def reachable_bin(bin_dir: Path, account: Account) -> Path:
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


def place_data_dir(requested: Path, account: Account | None) -> Path:
    """The directory the cluster lives in. As root, when the server account cannot reach the
    requested one, it lives in RELOCATE_ROOT/data-<hash> and `requested` is a symlink to it."""
    if account is None:
        requested.parent.mkdir(parents=True, exist_ok=True)
        return requested
    entry = RELOCATE_ROOT / f"data-{_digest(str(requested))}"
    if requested.is_symlink():
        if Path(os.readlink(requested)) != entry / "data":
            return place_data_dir(requested.resolve(), account)  # the user's own symlink
    else:
        requested.parent.mkdir(parents=True, exist_ok=True)
        if _can_reach(account, requested.parent):
            return requested
        if requested.is_dir():
            if any(requested.iterdir()):
                raise PlacementError(
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


def collect_garbage(is_live: Callable[[Path], bool]) -> None:
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
                if is_live(data):
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

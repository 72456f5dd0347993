"""A generic process supervisor: start child processes in stages, wait until they are healthy,
restart those that die (with backoff), and stop them all in reverse order."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import aiohttp
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shared.logs import RotatingFile

LOG_MAX_BYTES = 20 * 1024 * 1024
"""RENDERFLOW_LOCAL_LOG_MAX_BYTES: a process's log is rotated to `<name>.log.1`, `.2`, ... past this
size (0: never)."""
LOG_BACKUPS = 3
"""RENDERFLOW_LOCAL_LOG_BACKUPS: rotated logs kept per process, `<name>.log.1` the newest."""
LOG_BUFFER = 1024 * 1024
"""Output of a child read but not yet written, past which more is dropped rather than block it."""


class HealthCheck(Protocol):
    """One probe of whether a process serves; it must not raise, and should return within ~1 s."""

    def describe(self) -> str:
        """What is probed, for error messages."""
        ...

    async def probe(self) -> bool:
        """True when the process answers as healthy."""
        ...


@dataclass(frozen=True)
class GrpcHealth:
    """The standard gRPC health check (grpc.health.v1) answers SERVING for `service`."""

    address: str
    service: str = ""

    def describe(self) -> str:
        """What is probed."""
        return f"gRPC health of {self.service or '(server)'} at {self.address}"

    async def probe(self) -> bool:
        """One Check call on a fresh channel (a reused one would sit in reconnect backoff)."""
        try:
            async with grpc.aio.insecure_channel(self.address) as channel:
                stub = health_pb2_grpc.HealthStub(channel)
                request = health_pb2.HealthCheckRequest(service=self.service)
                response = await stub.Check(request, timeout=1.0)
                return bool(response.status == health_pb2.HealthCheckResponse.SERVING)
        except (grpc.RpcError, OSError):
            return False


@dataclass(frozen=True)
class HttpHealth:
    """An HTTP GET of `url` answers 200."""

    url: str

    def describe(self) -> str:
        """What is probed."""
        return f"GET {self.url}"

    async def probe(self) -> bool:
        """One GET with a 1 s deadline."""
        try:
            timeout = aiohttp.ClientTimeout(total=1.0)
            async with aiohttp.ClientSession(timeout=timeout) as session, session.get(self.url) as r:
                return r.status == 200
        except (aiohttp.ClientError, OSError, TimeoutError):
            return False


@dataclass(frozen=True)
class ProcessSpec:
    """A child process: its name (also its log file's), its argv, and how to tell it is up.

    Without a health check, a process counts as healthy as soon as it runs.
    """

    name: str
    argv: Sequence[str]
    health: HealthCheck | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    """Variables of this child only, over the supervisor's `env`."""
    inherit_env: bool = True
    """False: the child gets `env` alone, not the supervisor's environment."""
    cwd: Path | None = None
    run_as: tuple[int, int] | None = None
    """(uid, gid) the child runs as, without supplementary groups (a supervisor running as root)."""
    stop_signal: signal.Signals = signal.SIGTERM
    """What asks it to stop (also when the supervisor dies, see `die_with_parent`)."""


@dataclass(frozen=True)
class Backoff:
    """Delay before restarting a child that died: `initial`, multiplied by `factor` after each
    consecutive death up to `maximum`, back to `initial` once it has stayed up `reset_after`."""

    initial: float = 0.5
    factor: float = 2.0
    maximum: float = 10.0
    reset_after: float = 30.0


@dataclass(frozen=True)
class ChildEvent:
    """Something that happened to a child: `started`, `exited` (and will restart) or `stopped`."""

    kind: str
    name: str
    pid: int
    returncode: int | None = None
    delay: float | None = None
    log: Path | None = None

    def __str__(self) -> str:
        if self.kind == "exited":
            return (
                f"{self.name} (pid {self.pid}) exited with code {self.returncode}; "
                f"restarting in {self.delay:.1f}s (log: {self.log})"
            )
        return f"{self.name} (pid {self.pid}) {self.kind}"


class StartupError(RuntimeError):
    """A child exited, or did not become healthy in time, while the supervisor was starting."""

    def __init__(self, name: str, reason: str, log: Path) -> None:
        super().__init__(f"{name} {reason}; last lines of {log}:\n{tail(log)}")
        self.name = name


def print_notices(event: ChildEvent) -> None:
    """The default notifier: one line on stderr when a child dies and is restarted."""
    if event.kind == "exited":
        print(f"[supervisor] {event}", file=sys.stderr, flush=True)


class _Log:
    """A child's log file, written by a thread of its own from a bounded buffer. The event loop
    reads the child's pipe as fast as the child writes and only queues what it read, so neither a
    slow or full disk nor a busy writer ever blocks the child: past LOG_BUFFER bytes waiting, output
    is dropped, and the log says how much."""

    def __init__(self, file: RotatingFile) -> None:
        self._file = file
        self._chunks: list[bytes] = []
        self._queued = 0
        self._dropped = 0
        self._busy = False
        self._closed = False
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._run, name=f"log {file.path.name}", daemon=True)
        self._thread.start()

    def write(self, data: bytes) -> None:
        """Queue `data` for the file; never waits for I/O."""
        with self._changed:
            if self._queued + len(data) > LOG_BUFFER:
                self._dropped += len(data)
            else:
                self._chunks.append(data)
                self._queued += len(data)
            self._changed.notify_all()

    def flush(self, timeout: float) -> None:
        """Wait until what was queued is written (`timeout` at most; blocking: run it in a thread)."""
        with self._changed:
            self._changed.wait_for(lambda: not (self._chunks or self._dropped or self._busy), timeout)

    def close(self, timeout: float = 5.0) -> None:
        """Write what is queued, then close the file (the thread does, should the disk hang)."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self._changed:
                self._changed.wait_for(lambda: self._chunks or self._dropped or self._closed)
                if not (self._chunks or self._dropped):
                    break
                data, dropped = b"".join(self._chunks), self._dropped
                self._chunks, self._queued, self._dropped, self._busy = [], 0, 0, True
            if dropped:
                data += f"\n--- {dropped} bytes of output dropped here: written too slowly\n".encode()
            # A write that fails (a full disk) loses its data; the child and the next writes go on.
            with contextlib.suppress(OSError):
                self._file.write(data)
            with self._changed:
                self._busy = False
                self._changed.notify_all()
        self._file.close()


class _PipeReader(asyncio.Protocol):
    """Hands what a child writes on stdout and stderr to its log; `closed` once all writers are gone."""

    def __init__(self, log: _Log) -> None:
        self._log = log
        self.transport: asyncio.BaseTransport | None = None
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self._log.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


@dataclass
class _Child:
    spec: ProcessSpec
    proc: asyncio.subprocess.Process | None = None
    started_at: float = 0.0
    restarts: int = 0
    monitor: asyncio.Task[None] | None = None
    pids: list[int] = field(default_factory=list)
    log: _Log | None = None
    reader: _PipeReader | None = None  # of the latest process


class Supervisor:
    """Runs `stages` of processes: each stage starts once the previous one is healthy, and the
    stages stop in reverse order (within a stage, the last listed stops first).

    Each child runs in its own process group (so signals reach its own children too), with
    stdin closed and stdout/stderr read through a pipe into `<log_dir>/<name>.log`, which is
    rotated to `<name>.log.1` ... `<name>.log.<log_backups>` past `log_max_bytes` (0: never);
    `env` is added to the environment it inherits. With `die_with_parent` (Linux, util-linux
    `setpriv`), a child gets its stop signal should the supervisor itself be killed without a
    chance to stop it.
    """

    def __init__(
        self,
        stages: Sequence[Sequence[ProcessSpec]],
        log_dir: Path,
        *,
        env: Mapping[str, str] | None = None,
        backoff: Backoff | None = None,
        start_timeout: float = 60.0,
        stop_timeout: float = 8.0,
        notify: Callable[[ChildEvent], None] = print_notices,
        die_with_parent: bool = True,
        log_max_bytes: int = LOG_MAX_BYTES,
        log_backups: int = LOG_BACKUPS,
    ) -> None:
        self._stages = [[_Child(spec) for spec in stage] for stage in stages]
        names = [child.spec.name for stage in self._stages for child in stage]
        if len(set(names)) != len(names):
            raise ValueError(f"process names must be unique, got {names}")
        self._log_dir = log_dir
        self._env = {**os.environ, **(env or {})}
        self._backoff = backoff or Backoff()
        self._start_timeout = start_timeout
        self._stop_timeout = stop_timeout
        self._notify = notify
        self._log_max_bytes = log_max_bytes
        self._log_backups = log_backups
        self._stopping = False
        self._stopped = asyncio.Event()
        self._setpriv = shutil.which("setpriv") if die_with_parent and sys.platform == "linux" else None

    def log_path(self, name: str) -> Path:
        """The log file of the child `name`."""
        return self._log_dir / f"{name}.log"

    def pids(self) -> dict[str, int]:
        """The pid of each child that is running now."""
        return {c.spec.name: c.proc.pid for c in self._children() if _running(c.proc) and c.proc}

    def all_pids(self) -> list[int]:
        """Every pid this supervisor has started, restarts included."""
        return [pid for child in self._children() for pid in child.pids]

    def restarts(self) -> dict[str, int]:
        """How many times each child has been restarted."""
        return {child.spec.name: child.restarts for child in self._children()}

    async def start(self) -> None:
        """Start every stage in order, each once the previous one is healthy, then keep them
        running. Raises StartupError (naming the process, with its log's tail) on failure; the
        caller then calls stop()."""
        self._log_dir.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + self._start_timeout
        for stage in self._stages:
            if self._stopping:
                return
            for child in stage:
                await self._spawn(child)
            waits = [asyncio.create_task(self._wait_healthy(c, deadline)) for c in stage]
            try:
                await asyncio.gather(*waits)
            finally:
                for task in waits:
                    task.cancel()
                await asyncio.gather(*waits, return_exceptions=True)
            for child in stage:
                assert child.proc is not None
                if child.proc.returncode is not None:  # one without a health check died meanwhile
                    reason = f"exited with code {child.proc.returncode} during startup"
                    raise await self._failure(child, reason)
                child.monitor = asyncio.create_task(self._monitor(child), name=child.spec.name)

    async def stop(self) -> None:
        """Stop restarting; SIGTERM each stage in reverse order and wait for it, SIGKILL what is
        left once `stop_timeout` is spent. Idempotent; returns when every child is reaped."""
        if self._stopping:
            await self._stopped.wait()
            return
        self._stopping = True
        try:
            monitors = [c.monitor for c in self._children() if c.monitor is not None]
            for task in monitors:
                task.cancel()
            await asyncio.gather(*monitors, return_exceptions=True)
            running = [child for child in self._children() if _running(child.proc)]
            deadline = time.monotonic() + self._stop_timeout
            # Clients stop before their servers; each later stage keeps half a second for itself.
            for remaining, stage in enumerate(reversed(self._stages)):
                children = list(reversed(stage))
                for child in children:
                    _signal_group(child, child.spec.stop_signal)
                reserve = 0.5 * (len(self._stages) - 1 - remaining)
                await _wait_exit(children, deadline - reserve - time.monotonic())
            for child in running:
                # Also the grandchildren of one that exited meanwhile (seconds ago: its pid, the
                # group's id, cannot have been handed out again yet).
                _signal_group(child, signal.SIGKILL, even_if_exited=True)
            await _wait_exit(running, 2.0)
            await self._close_logs()
        finally:
            self._stopped.set()

    async def __aenter__(self) -> Supervisor:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    def _children(self) -> list[_Child]:
        return [child for stage in self._stages for child in stage]

    async def _spawn(self, child: _Child) -> None:
        spec, log_path = child.spec, self.log_path(child.spec.name)
        if child.log is None:
            child.log = _Log(RotatingFile(log_path, self._log_max_bytes, self._log_backups))
        if child.reader is not None:
            child.reader.close()  # the previous process's pipe, should an orphan still hold it
        child.started_at = time.monotonic()
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        child.log.write(f"--- {stamp} starting: {shlex.join(spec.argv)}\n".encode())
        # Our own pipe rather than asyncio's: Process.wait() would also wait for its end of file,
        # which never comes while an orphan of the child holds it.
        read_end, write_end = os.pipe()
        try:
            if shutil.which(spec.argv[0]) is None:  # setpriv would only exit 127
                raise FileNotFoundError(f"no such program: {spec.argv[0]}")
            # setpriv sets the parent-death signal and drops privileges, then execs the child: same
            # pid, nothing in between. Not Popen's user/group: changing them in Python's child,
            # between fork and exec, rules out vfork, and a fork of this process, whose gRPC
            # threads check health, killed the child with SIGSEGV one time in three.
            prefix: list[str] = []
            if self._setpriv:
                prefix = [self._setpriv, "--pdeathsig", spec.stop_signal.name]
            if spec.run_as is not None:
                prefix = prefix or [_setpriv_for(spec.name)]
                prefix += [f"--reuid={spec.run_as[0]}", f"--regid={spec.run_as[1]}", "--clear-groups"]
            if prefix:
                prefix.append("--")
            child.proc = await asyncio.create_subprocess_exec(
                *prefix,
                *spec.argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=write_end,
                stderr=write_end,
                env={**self._env, **spec.env} if spec.inherit_env else dict(spec.env),
                cwd=spec.cwd,
                start_new_session=True,  # its own group: Ctrl-C reaches us only; we order the stop
            )
        except OSError as error:
            os.close(read_end)
            child.log.write(f"--- could not start: {error}\n".encode())
            raise await self._failure(child, f"could not start: {error}") from error
        finally:
            os.close(write_end)  # the child has its own: end of file once it and its children are gone
        if self._setpriv:
            await _past_setpriv(child.proc.pid, self._setpriv)
        log = child.log
        pipe = os.fdopen(read_end, "rb", buffering=0)
        _, child.reader = await asyncio.get_running_loop().connect_read_pipe(lambda: _PipeReader(log), pipe)
        child.pids.append(child.proc.pid)
        self._notify(ChildEvent("started", spec.name, child.proc.pid, log=log_path))

    async def _failure(self, child: _Child, reason: str) -> StartupError:
        """The StartupError of `child`, raised once its last words are in its log."""
        exited = child.proc is not None and child.proc.returncode is not None
        if exited and child.reader is not None:
            await asyncio.wait([child.reader.closed], timeout=1.0)  # what is still in the pipe
        if child.log is not None:
            await asyncio.to_thread(child.log.flush, 1.0)
        return StartupError(child.spec.name, reason, self.log_path(child.spec.name))

    async def _close_logs(self) -> None:
        """Read the pipes to their end (a while at most), then write and close every log."""
        readers = [child.reader for child in self._children() if child.reader is not None]
        if readers:
            await asyncio.wait([reader.closed for reader in readers], timeout=1.0)
        for reader in readers:
            reader.close()
        logs = [child.log for child in self._children() if child.log is not None]
        await asyncio.gather(*(asyncio.to_thread(log.close) for log in logs))

    async def _wait_healthy(self, child: _Child, deadline: float) -> None:
        assert child.proc is not None
        proc, health = child.proc, child.spec.health
        exited = asyncio.ensure_future(proc.wait())
        try:
            while True:
                if proc.returncode is not None:
                    reason = f"exited with code {proc.returncode} before it became healthy"
                    raise await self._failure(child, reason)
                if health is None or await _probe(health, deadline):
                    return
                if time.monotonic() >= deadline:
                    reason = f"did not become healthy within {self._start_timeout:g}s ({health.describe()})"
                    raise await self._failure(child, reason)
                # Probe again soon, or at once if the process dies meanwhile.
                await asyncio.wait([exited], timeout=min(0.1, max(0.0, deadline - time.monotonic())))
        finally:
            exited.cancel()

    async def _monitor(self, child: _Child) -> None:
        delay = self._backoff.initial
        while child.proc is not None:
            returncode = await child.proc.wait()
            if self._stopping:
                return
            _signal_group(child, signal.SIGKILL, even_if_exited=True)  # its orphans, if any
            if time.monotonic() - child.started_at >= self._backoff.reset_after:
                delay = self._backoff.initial
            log = self.log_path(child.spec.name)
            self._notify(ChildEvent("exited", child.spec.name, child.proc.pid, returncode, delay, log))
            await asyncio.sleep(delay)
            delay = min(delay * self._backoff.factor, self._backoff.maximum)
            child.restarts += 1
            # A failed spawn leaves the dead process in place: the next round waits again.
            with contextlib.suppress(StartupError):
                await self._spawn(child)


async def _probe(health: HealthCheck, deadline: float) -> bool:
    try:
        async with asyncio.timeout(max(0.05, min(1.0, deadline - time.monotonic()))):
            return await health.probe()
    except TimeoutError:
        return False


def _running(proc: asyncio.subprocess.Process | None) -> bool:
    return proc is not None and proc.returncode is None


def _signal_group(child: _Child, sig: signal.Signals, *, even_if_exited: bool = False) -> None:
    # The child leads its own process group (start_new_session), so its pid is the group id;
    # Linux does not reuse a pid while a group of that id still has members.
    if child.proc is None or not (even_if_exited or _running(child.proc)):
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(child.proc.pid, sig)


async def _wait_exit(children: Sequence[_Child], timeout: float) -> None:
    waits = [asyncio.ensure_future(c.proc.wait()) for c in children if _running(c.proc) and c.proc]
    if not waits:
        return
    _done, pending = await asyncio.wait(waits, timeout=max(0.0, timeout))
    for task in pending:
        task.cancel()


def tail(path: Path, lines: int = 20) -> str:
    """The last `lines` lines of a log file (or why there are none)."""
    try:
        with path.open("rb") as file:
            file.seek(max(0, file.seek(0, os.SEEK_END) - 8192))
            return "\n".join(file.read().decode(errors="replace").splitlines()[-lines:])
    except OSError as error:
        return f"(no log: {error})"


def _setpriv_for(name: str) -> str:
    setpriv = shutil.which("setpriv", path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
    if setpriv is None:
        raise FileNotFoundError(f"running {name} as another account needs setpriv (util-linux)")
    return setpriv


async def _past_setpriv(pid: int, setpriv: str, timeout_s: float = 2.0) -> None:
    """Waits until `setpriv` has set the child's parent-death signal and exec'd the child itself.

    The signal is set by setpriv once it runs, some time after the spawn returns: a supervisor
    killed in between would leave the child running for good (setpriv does not check whether its
    parent is still there). Once the process runs another program, the signal is set."""
    own = os.path.realpath(setpriv)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if os.readlink(f"/proc/{pid}/exe") != own:
                return
        except OSError:
            return  # gone already (or not ours to read): nothing to wait for
        await asyncio.sleep(0.001)

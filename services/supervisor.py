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
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import aiohttp
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


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


@dataclass
class _Child:
    spec: ProcessSpec
    proc: asyncio.subprocess.Process | None = None
    started_at: float = 0.0
    restarts: int = 0
    monitor: asyncio.Task[None] | None = None
    pids: list[int] = field(default_factory=list)


class Supervisor:
    """Runs `stages` of processes: each stage starts once the previous one is healthy, and the
    stages stop in reverse order (within a stage, the last listed stops first).

    Each child runs in its own process group (so signals reach its own children too), with
    stdin closed and stdout/stderr appended to `<log_dir>/<name>.log`; `env` is added to the
    environment it inherits. With `die_with_parent` (Linux, util-linux `setpriv`), a child gets
    SIGTERM should the supervisor itself be killed without a chance to stop it.
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
        self._stopping = False
        self._stopped = asyncio.Event()
        setpriv = shutil.which("setpriv") if die_with_parent and sys.platform == "linux" else None
        # setpriv sets the parent-death signal, then execs the child: same pid, nothing in between.
        self._prefix = [setpriv, "--pdeathsig", "SIGTERM", "--"] if setpriv else []

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
                    raise StartupError(child.spec.name, reason, self.log_path(child.spec.name))
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
                    _signal_group(child, signal.SIGTERM)
                reserve = 0.5 * (len(self._stages) - 1 - remaining)
                await _wait_exit(children, deadline - reserve - time.monotonic())
            for child in running:
                # Also the grandchildren of one that exited meanwhile (seconds ago: its pid, the
                # group's id, cannot have been handed out again yet).
                _signal_group(child, signal.SIGKILL, even_if_exited=True)
            await _wait_exit(running, 2.0)
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
        log_path = self.log_path(child.spec.name)
        child.started_at = time.monotonic()
        with log_path.open("ab") as log:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            log.write(f"--- {stamp} starting: {shlex.join(child.spec.argv)}\n".encode())
            log.flush()
            try:
                if shutil.which(child.spec.argv[0]) is None:  # setpriv would only exit 127
                    raise FileNotFoundError(f"no such program: {child.spec.argv[0]}")
                child.proc = await asyncio.create_subprocess_exec(
                    *self._prefix,
                    *child.spec.argv,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=log,
                    stderr=asyncio.subprocess.STDOUT,
                    env={**self._env, **child.spec.env},
                    start_new_session=True,  # its own group: Ctrl-C reaches us only; we order the stop
                )
            except OSError as error:
                log.write(f"--- could not start: {error}\n".encode())
                raise StartupError(child.spec.name, f"could not start: {error}", log_path) from error
        child.pids.append(child.proc.pid)
        self._notify(ChildEvent("started", child.spec.name, child.proc.pid, log=log_path))

    async def _wait_healthy(self, child: _Child, deadline: float) -> None:
        assert child.proc is not None
        proc, health, name = child.proc, child.spec.health, child.spec.name
        exited = asyncio.ensure_future(proc.wait())
        try:
            while True:
                if proc.returncode is not None:
                    reason = f"exited with code {proc.returncode} before it became healthy"
                    raise StartupError(name, reason, self.log_path(name))
                if health is None or await _probe(health, deadline):
                    return
                if time.monotonic() >= deadline:
                    reason = f"did not become healthy within {self._start_timeout:g}s ({health.describe()})"
                    raise StartupError(name, reason, self.log_path(name))
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

"""The supervisor against tiny real child processes: health, restart with backoff, and stop."""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import time
from pathlib import Path

import aiohttp
import pytest

from shared.logs import RotatingFile
from tests.conftest import free_port
from tests.support import eventually
from tools.cli.supervisor import (
    Backoff,
    ChildEvent,
    GrpcHealth,
    HttpHealth,
    ProcessSpec,
    StartupError,
    Supervisor,
)

# Serves GET /healthz on argv[1]; with argv[2], first starts a grandchild (sleep, in the child's
# process group) and writes the grandchild's pid to argv[2].
HTTP_CHILD = """
import http.server, subprocess, sys
if len(sys.argv) > 2:
    grandchild = subprocess.Popen(["sleep", "60"])
    open(sys.argv[2], "w").write(str(grandchild.pid))
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/healthz" else 404)
        self.end_headers()
    def log_message(self, *args):
        pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
"""

GRPC_CHILD = """
import sys
from concurrent import futures
import grpc
from grpc_health.v1 import health, health_pb2_grpc
server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
server.add_insecure_port(f"127.0.0.1:{sys.argv[1]}")
server.start()
server.wait_for_termination()
"""

# Prints argv[1] numbered lines of ~90 bytes, one line on stderr, then `done`, and stays up.
CHATTY_CHILD = """
import sys, time
for n in range(int(sys.argv[1])):
    print(f"line {n:06d} " + "x" * 80, flush=True)
print("a line on stderr", file=sys.stderr, flush=True)
print("done", flush=True)
time.sleep(60)
"""

# Writes 4 MiB to stdout, then creates the file argv[1], and stays up.
LOUD_CHILD = """
import sys, time
for _ in range(64):
    sys.stdout.buffer.write(b"y" * 65535 + b"\\n")
    sys.stdout.flush()
open(sys.argv[1], "w").close()
time.sleep(60)
"""

STUBBORN_CHILD = """
import signal, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
time.sleep(60)
"""


def python(code: str, *args: str) -> list[str]:
    return [sys.executable, "-c", code, *args]


def gone(pid: int) -> bool:
    """Whether no process has this pid any more (a zombie counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


async def wait_gone(pids: list[int], timeout: float = 5.0) -> None:
    """Bounded wait for processes reparented to init, which we cannot await directly."""
    async with asyncio.timeout(timeout):
        while not all(gone(pid) for pid in pids):  # noqa: ASYNC110 - no event exists for this
            await asyncio.sleep(0.02)


async def test_starts_stages_serves_and_stops_everything(tmp_path: Path) -> None:
    web_port, second_port, grpc_port = free_port(), free_port(), free_port()
    grandchild_file = tmp_path / "grandchild.pid"
    stages = [
        [ProcessSpec("rpc", python(GRPC_CHILD, str(grpc_port)), GrpcHealth(f"127.0.0.1:{grpc_port}"))],
        [
            ProcessSpec(
                "web", python(HTTP_CHILD, str(web_port)), HttpHealth(f"http://127.0.0.1:{web_port}/healthz")
            ),
            ProcessSpec(
                "parent",
                python(HTTP_CHILD, str(second_port), str(grandchild_file)),
                HttpHealth(f"http://127.0.0.1:{second_port}/healthz"),
            ),
            ProcessSpec("stubborn", python(STUBBORN_CHILD)),
        ],
    ]
    supervisor = Supervisor(stages, tmp_path / "logs", stop_timeout=1.0, notify=lambda _event: None)
    try:
        await supervisor.start()
        assert set(supervisor.pids()) == {"rpc", "web", "parent", "stubborn"}
        url = f"http://127.0.0.1:{web_port}/healthz"
        async with aiohttp.ClientSession() as session, session.get(url) as response:
            assert response.status == 200
        grandchild = int(grandchild_file.read_text())
        assert not gone(grandchild)
    finally:
        started = time.monotonic()
        await supervisor.stop()
        took = time.monotonic() - started
    # The stubborn child ignores SIGTERM: it is killed once the stop timeout is spent.
    assert took < 4.0
    assert supervisor.pids() == {}
    await wait_gone([*supervisor.all_pids(), grandchild])
    assert (tmp_path / "logs" / "web.log").read_text().startswith("--- ")
    await supervisor.stop()  # idempotent


async def test_restarts_a_dying_child_with_backoff(tmp_path: Path) -> None:
    events: asyncio.Queue[ChildEvent] = asyncio.Queue()
    dies = python("import sys, time; time.sleep(0.1); sys.exit(3)")
    backoff = Backoff(initial=0.05, factor=2.0, maximum=0.2, reset_after=30.0)
    supervisor = Supervisor(
        [[ProcessSpec("flaky", dies)]], tmp_path / "logs", backoff=backoff, notify=events.put_nowait
    )
    try:
        await supervisor.start()
        exits: list[ChildEvent] = []
        async with asyncio.timeout(20):
            while len(exits) < 4:
                event = await events.get()
                if event.kind == "exited":
                    exits.append(event)
        assert [event.returncode for event in exits] == [3, 3, 3, 3]
        assert [event.delay for event in exits] == [0.05, 0.1, 0.2, 0.2]
        assert "flaky" in str(exits[0]) and "restarting in" in str(exits[0])
        assert supervisor.restarts()["flaky"] >= 3
        assert len(set(supervisor.all_pids())) >= 4
    finally:
        await supervisor.stop()
    await wait_gone(supervisor.all_pids())


async def test_startup_failure_names_the_process_and_shows_its_log(tmp_path: Path) -> None:
    crash = python("import sys; print('boom: no config'); sys.exit(2)")
    port = free_port()
    supervisor = Supervisor(
        [[ProcessSpec("broken", crash, HttpHealth(f"http://127.0.0.1:{port}/healthz"))]],
        tmp_path / "logs",
        notify=lambda _event: None,
    )
    with pytest.raises(StartupError) as raised:
        await supervisor.start()
    await supervisor.stop()
    assert raised.value.name == "broken"
    assert "exited with code 2" in str(raised.value)
    assert "boom: no config" in str(raised.value)


async def test_startup_times_out_when_never_healthy(tmp_path: Path) -> None:
    port = free_port()
    sleeper = python("import time; time.sleep(60)")
    supervisor = Supervisor(
        [[ProcessSpec("silent", sleeper, HttpHealth(f"http://127.0.0.1:{port}/healthz"))]],
        tmp_path / "logs",
        start_timeout=0.5,
        notify=lambda _event: None,
    )
    try:
        with pytest.raises(StartupError, match=r"silent did not become healthy within 0\.5s"):
            await supervisor.start()
    finally:
        await supervisor.stop()
    await wait_gone(supervisor.all_pids())


async def test_children_die_with_a_killed_supervisor(tmp_path: Path) -> None:
    # A supervisor in a process of its own, SIGKILLed: it cannot stop its children itself.
    script = (
        "import asyncio, sys; from pathlib import Path; "
        "from tools.cli.supervisor import ProcessSpec, Supervisor\n"
        "async def main():\n"
        "    sleeper = ProcessSpec('sleeper', [sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        "    supervisor = Supervisor([[sleeper]], Path(sys.argv[1]))\n"
        "    await supervisor.start()\n"
        "    print(supervisor.pids()['sleeper'], flush=True)\n"
        "    await asyncio.sleep(60)\n"
        "asyncio.run(main())\n"
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, str(tmp_path / "logs"), stdout=asyncio.subprocess.PIPE
    )
    assert process.stdout is not None
    async with asyncio.timeout(20):
        child = int(await process.stdout.readline())
    assert not gone(child)
    process.kill()
    await process.wait()
    await wait_gone([child])


async def test_missing_executable_is_a_startup_error(tmp_path: Path) -> None:
    supervisor = Supervisor(
        [[ProcessSpec("ghost", [str(tmp_path / "no-such-program")])]],
        tmp_path / "logs",
        notify=lambda _event: None,
    )
    with pytest.raises(StartupError, match="ghost could not start"):
        await supervisor.start()
    await supervisor.stop()


async def test_a_startup_traceback_on_stderr_is_in_the_error(tmp_path: Path) -> None:
    crash = python("raise RuntimeError('no config for you')")
    port = free_port()
    supervisor = Supervisor(
        [[ProcessSpec("broken", crash, HttpHealth(f"http://127.0.0.1:{port}/healthz"))]],
        tmp_path / "logs",
        notify=lambda _event: None,
    )
    with pytest.raises(StartupError) as raised:
        await supervisor.start()
    await supervisor.stop()
    assert "Traceback" in str(raised.value) and "RuntimeError: no config for you" in str(raised.value)


async def test_a_child_log_is_rotated_by_size_keeping_the_newest_lines(tmp_path: Path) -> None:
    supervisor = Supervisor(
        [[ProcessSpec("chatty", python(CHATTY_CHILD, "500"))]],
        tmp_path / "logs",
        log_max_bytes=8192,
        log_backups=2,
        notify=lambda _event: None,
    )
    log = tmp_path / "logs" / "chatty.log"
    try:
        await supervisor.start()
        await eventually(lambda: log.exists() and log.read_bytes().endswith(b"done\n"), timeout_s=20)
    finally:
        await supervisor.stop()
    files = [log.with_name("chatty.log.2"), log.with_name("chatty.log.1"), log]
    assert sorted(path.name for path in log.parent.iterdir()) == sorted(path.name for path in files)
    assert all(0 < path.stat().st_size <= 8192 for path in files), [p.stat().st_size for p in files]
    lines = [line for path in files for line in path.read_text().splitlines()]
    numbers = [int(line.split()[1]) for line in lines if line.startswith("line ")]
    # The newest lines, oldest first, none lost or split between the files kept.
    assert numbers == list(range(numbers[0], 500)) and numbers[0] > 0
    assert lines[-2:] == ["a line on stderr", "done"]


async def test_a_log_that_cannot_be_written_never_blocks_the_child(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    disk = threading.Event()  # the disk is stuck until set
    write = RotatingFile.write

    def stuck(self: RotatingFile, data: bytes) -> None:
        disk.wait(20)
        write(self, data)

    monkeypatch.setattr(RotatingFile, "write", stuck)
    finished = tmp_path / "finished"
    supervisor = Supervisor(
        [[ProcessSpec("loud", python(LOUD_CHILD, str(finished)))]],
        tmp_path / "logs",
        notify=lambda _event: None,
    )
    log = tmp_path / "logs" / "loud.log"
    try:
        await supervisor.start()
        # 4 MiB through a 64 KiB pipe while nothing reaches the disk.
        await eventually(finished.exists, timeout_s=20)
        disk.set()
        await eventually(lambda: log.exists() and b"bytes of output dropped" in log.read_bytes(), 20)
    finally:
        disk.set()
        await supervisor.stop()
    assert log.read_bytes().startswith(b"--- ")

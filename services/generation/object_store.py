"""The artifact store in a bucket of an S3-compatible object store (AWS S3, SeaweedFS, MinIO, R2...).

The client is obstore 0.12 (Rust's object_store; one wheel) rather than aiobotocore 3.10:
multipart uploads with their abort, ranged reads streamed in chunks and presigned URLs are single
calls of it, where aiobotocore leaves the part loop, the abort and the re-chunking to us (and pins
botocore, whose python-dateutil<3 would downgrade this tree's 4). Measured against the SeaweedFS of
the tests (tests/support/seaweedfs.py), three runs timing each call with time.perf_counter: 10 MB
put / get, obstore 70-150 / 20-104 ms, aiobotocore 122-183 / 37-51 ms; 100 objects of 20 kB put /
got one by one, 136-163 / 101-117 ms against 248-293 / 172-213 ms; 100 puts at once, 67-100 ms
against 134-202 ms; the import (`python -c "import resource, time; t = time.perf_counter(); import
obstore; print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"`, and
`aiobotocore.session` likewise), 6-19 ms and +5 MiB against 225-353 ms and +34 MiB.

Keys are `<prefix><id[:2]>/<id>`, the local store's fan-out. Writes are atomic for readers: a
PUT, or for outputs larger than a part a multipart upload, whose object appears whole when it is
completed; one that fails, or whose caller is cancelled, is aborted (its parts deleted). A crash
mid-upload leaves parts that no reader sees: a bucket lifecycle rule
(AbortIncompleteMultipartUpload) deletes those. A missing object is `NotFound`; a store that is
down, unreachable or refuses our credentials is `Unavailable` (after retrying for
RENDERFLOW_ARTIFACT_S3_RETRY_S). Credentials must allow listing the bucket (s3:ListBucket), or S3
answers 403 rather than 404 for a missing key.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import hashlib
import re
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import obstore
from obstore.exceptions import BaseError as ObstoreError
from obstore.exceptions import NotFoundError as ObstoreNotFound
from obstore.store import S3Store
from yarl import URL

from services.generation.artifacts import CHUNK, StoredArtifact
from services.generation.validation import is_valid_id
from shared.errors import NotFound, Unavailable, ValidationFailed
from shared.settings import ConfigError, Env

if TYPE_CHECKING:
    from obstore import Attributes, GetOptions, GetResult
    from obstore.store import ClientConfig, RetryConfig, S3Config

MIN_PART_BYTES: Final = 5 * 1024 * 1024
"""S3's smallest part (but the last) of a multipart upload."""
MAX_PART_BYTES: Final = 5 * 1024 * 1024 * 1024
MAX_PRESIGN_S: Final = 7 * 86400
"""The longest a SigV4 presigned URL may be valid."""
PARTS_IN_FLIGHT: Final = 2
"""Parts of one upload sent at once: what an upload holds beyond the caller's bytes."""
ABORT_WAIT_S: Final = 5.0
"""How long a cancelled upload waits for its multipart upload to be aborted before giving up (the
parts then stay for the lifecycle rule)."""
REQUEST_CAP: Final = timedelta(hours=6)
"""The longest one request may last: a stream read by a slow client lasts as long as it reads. A
stalled one fails sooner, by the read timeout."""
COPY_CHUNK: Final = 1024 * 1024

_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_PREFIX_SEGMENT = re.compile(r"^[A-Za-z0-9!_.*'()=-]+$")
_S3_CODE = re.compile(r"<Code>([^<]{1,64})</Code>")
_RANGE_NOT_SATISFIABLE = re.compile(r"status code: 416\b|\(InvalidRange\)")
_SETTINGS = (
    "RENDERFLOW_ARTIFACT_S3_ENDPOINT",
    "RENDERFLOW_ARTIFACT_S3_REGION",
    "RENDERFLOW_ARTIFACT_S3_PREFIX",
    "RENDERFLOW_ARTIFACT_S3_PATH_STYLE",
    "RENDERFLOW_ARTIFACT_S3_PART_BYTES",
    "RENDERFLOW_ARTIFACT_S3_PRESIGN_S",
    "RENDERFLOW_ARTIFACT_S3_CONNECT_TIMEOUT_S",
    "RENDERFLOW_ARTIFACT_S3_TIMEOUT_S",
    "RENDERFLOW_ARTIFACT_S3_RETRY_S",
)


@dataclass(frozen=True)
class ObjectStoreSettings:
    """Outputs in a bucket of an S3-compatible store rather than in RENDERFLOW_ARTIFACT_DIR."""

    bucket: str
    """RENDERFLOW_ARTIFACT_S3_BUCKET: the bucket holding outputs; set, outputs are stored there
    rather than in RENDERFLOW_ARTIFACT_DIR (the bucket must exist)."""
    endpoint: str = ""
    """RENDERFLOW_ARTIFACT_S3_ENDPOINT: the store's URL, e.g. `http://seaweedfs:8333`; empty: AWS S3
    (of the region)."""
    region: str = "us-east-1"
    """RENDERFLOW_ARTIFACT_S3_REGION: the bucket's region, which requests are signed for; default
    AWS_REGION (or AWS_DEFAULT_REGION) when set, else `us-east-1`."""
    prefix: str = ""
    """RENDERFLOW_ARTIFACT_S3_PREFIX: where in the bucket outputs go, e.g. `renders/` (a bucket
    shared with others); empty: at its root."""
    path_style: bool = False
    """RENDERFLOW_ARTIFACT_S3_PATH_STYLE: address the bucket in the path (`<endpoint>/<bucket>/<key>`,
    as most S3-compatible servers want) rather than in the host name (`<bucket>.<endpoint>`, AWS's
    virtual-hosted style); default true when RENDERFLOW_ARTIFACT_S3_ENDPOINT is set, else false."""
    part_bytes: int = 8 * 1024 * 1024
    """RENDERFLOW_ARTIFACT_S3_PART_BYTES: outputs larger than this are uploaded in parts of this size
    (at least 5 MiB, S3's minimum), two at a time."""
    presign_s: float = 3600.0
    """RENDERFLOW_ARTIFACT_S3_PRESIGN_S: how long a presigned URL of an output is valid, by default (at
    most 7 days; with temporary credentials, at most as long as they are)."""
    connect_timeout_s: float = 5.0
    """RENDERFLOW_ARTIFACT_S3_CONNECT_TIMEOUT_S: how long connecting to the store may take."""
    timeout_s: float = 30.0
    """RENDERFLOW_ARTIFACT_S3_TIMEOUT_S: a request waiting this long for the store's next bytes has
    stalled and fails (it is retried)."""
    retry_s: float = 10.0
    """RENDERFLOW_ARTIFACT_S3_RETRY_S: how long a request failing for a transient reason (the store
    down, a 5xx, a reset) is retried before the store counts as unavailable (0: not retried)."""
    access_key_id: str | None = field(default=None, repr=False)
    """AWS_ACCESS_KEY_ID: with AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN for temporary ones), the
    credentials; unset, the usual AWS chain finds them (web identity, container or instance role)."""
    secret_access_key: str | None = field(default=None, repr=False)
    """AWS_SECRET_ACCESS_KEY: the secret of AWS_ACCESS_KEY_ID; never logged."""
    session_token: str | None = field(default=None, repr=False)
    """AWS_SESSION_TOKEN: the token of temporary credentials."""

    @classmethod
    def from_env(cls, env: Env) -> ObjectStoreSettings | None:
        """The settings, or None when RENDERFLOW_ARTIFACT_S3_BUCKET is not set (outputs are then
        files); ConfigError names the variable at fault."""
        bucket = env.optional("RENDERFLOW_ARTIFACT_S3_BUCKET")
        if bucket is None:
            stray = [name for name in _SETTINGS if env.optional(name) is not None]
            if stray:
                raise ConfigError(
                    f"RENDERFLOW_ARTIFACT_S3_BUCKET must be set when {', '.join(stray)} is: "
                    "outputs are stored in that bucket (unset them to store outputs as files)"
                )
            return None
        if not _BUCKET.fullmatch(bucket) or ".." in bucket:
            raise ConfigError(
                "RENDERFLOW_ARTIFACT_S3_BUCKET must be a bucket name (3 to 63 lowercase letters, digits, "
                f"dots and hyphens), got {bucket!r}"
            )
        endpoint = env.str("RENDERFLOW_ARTIFACT_S3_ENDPOINT", "").rstrip("/")
        if endpoint:
            url = URL(endpoint)
            if url.scheme not in ("http", "https") or not url.host or url.query_string or url.fragment:
                raise ConfigError(
                    "RENDERFLOW_ARTIFACT_S3_ENDPOINT must be an http(s) URL such as http://seaweedfs:8333, "
                    f"got {endpoint!r}"
                )
        access_key_id = env.optional("AWS_ACCESS_KEY_ID")
        secret_access_key = env.optional("AWS_SECRET_ACCESS_KEY")
        if (access_key_id is None) != (secret_access_key is None):
            given = "AWS_ACCESS_KEY_ID" if access_key_id is not None else "AWS_SECRET_ACCESS_KEY"
            # Never echo either value.
            raise ConfigError(
                "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY must be set together, or neither (the AWS "
                f"chain then finds credentials); only {given} is"
            )
        region = (
            env.optional("RENDERFLOW_ARTIFACT_S3_REGION")
            or env.optional("AWS_REGION")
            or env.optional("AWS_DEFAULT_REGION")
            or cls.region
        )
        part_bytes = env.int("RENDERFLOW_ARTIFACT_S3_PART_BYTES", cls.part_bytes, minimum=MIN_PART_BYTES)
        _at_most("RENDERFLOW_ARTIFACT_S3_PART_BYTES", part_bytes, MAX_PART_BYTES)
        presign_s = env.float("RENDERFLOW_ARTIFACT_S3_PRESIGN_S", cls.presign_s, minimum=1.0)
        _at_most("RENDERFLOW_ARTIFACT_S3_PRESIGN_S", presign_s, MAX_PRESIGN_S)
        return cls(
            bucket=bucket,
            endpoint=endpoint,
            region=region,
            prefix=_prefix(env.str("RENDERFLOW_ARTIFACT_S3_PREFIX", "")),
            path_style=env.bool("RENDERFLOW_ARTIFACT_S3_PATH_STYLE", bool(endpoint)),
            part_bytes=part_bytes,
            presign_s=presign_s,
            connect_timeout_s=env.float(
                "RENDERFLOW_ARTIFACT_S3_CONNECT_TIMEOUT_S", cls.connect_timeout_s, minimum=0.01
            ),
            timeout_s=env.float("RENDERFLOW_ARTIFACT_S3_TIMEOUT_S", cls.timeout_s, minimum=0.01),
            retry_s=env.float("RENDERFLOW_ARTIFACT_S3_RETRY_S", cls.retry_s, minimum=0.0),
            access_key_id=access_key_id,
            secret_access_key=secret_access_key,
            session_token=env.optional("AWS_SESSION_TOKEN"),
        )


def _at_most(name: str, value: float, maximum: float) -> None:
    if value > maximum:
        raise ConfigError(f"{name} must be at most {maximum:g}, got {value:g}")


def _prefix(raw: str) -> str:
    """`raw` as a key prefix: its segments joined by `/`, with one at the end ("" for none)."""
    segments = [s for s in raw.strip("/").split("/")] if raw.strip("/") else []
    for segment in segments:
        if not _PREFIX_SEGMENT.fullmatch(segment) or segment in (".", ".."):
            raise ConfigError(
                "RENDERFLOW_ARTIFACT_S3_PREFIX must be path segments of letters, digits and !_.*'()=- "
                f"separated by single slashes, got {raw!r}"
            )
    return "".join(f"{s}/" for s in segments)


FILE_READ_BYTES = 1024 * 1024


class _Parts:
    """The caller's bytes in parts, without copies, or a file's read a part at a time (never whole),
    hashed as the upload reads them; `stop()` makes the next read fail, which aborts the multipart
    upload reading it."""

    def __init__(self, data: bytes | Path, part_bytes: int) -> None:
        self._view = memoryview(data) if isinstance(data, bytes) else None
        self._file = data.open("rb") if isinstance(data, Path) else None
        self.size = len(data) if isinstance(data, bytes) else data.stat().st_size
        self._part_bytes = part_bytes
        self._position = 0
        self._stopped = False
        self.digest = hashlib.sha256()

    def stop(self) -> None:
        self._stopped = True

    def close(self) -> None:
        if self._file is not None:
            self._file.close()

    def __iter__(self) -> Iterator[memoryview | bytes]:
        return self

    def __next__(self) -> memoryview | bytes:
        if self._stopped:
            raise _Cancelled("the upload was cancelled")
        if self._position >= self.size:
            raise StopIteration
        if self._file is not None:  # read where the upload's thread asks: not on the event loop
            # A MiB at a time: obstore gathers its parts from them, so only its buffers are whole parts.
            part: memoryview | bytes = self._file.read(FILE_READ_BYTES)
            if not part:
                raise StopIteration
        else:
            assert self._view is not None
            part = self._view[self._position : self._position + self._part_bytes]
        self._position += len(part)
        self.digest.update(part)
        return part


class _Cancelled(Exception):
    """Raised into a multipart upload whose caller was cancelled, so that it is aborted."""


class S3ArtifactStore:
    """Outputs as objects of one bucket, named `<prefix><id[:2]>/<id>`. Holds no connection until
    used; one instance serves every task of a process."""

    def __init__(self, settings: ObjectStoreSettings) -> None:
        self._settings = settings
        config: S3Config = {
            "region": settings.region,
            "virtual_hosted_style_request": not settings.path_style,
        }
        if settings.endpoint:
            config["endpoint"] = settings.endpoint
        if settings.access_key_id is not None and settings.secret_access_key is not None:
            config["access_key_id"] = settings.access_key_id
            config["secret_access_key"] = settings.secret_access_key
            if settings.session_token is not None:
                config["session_token"] = settings.session_token
        client: ClientConfig = {
            "allow_http": settings.endpoint.startswith("http://"),
            "connect_timeout": timedelta(seconds=settings.connect_timeout_s),
            "read_timeout": timedelta(seconds=settings.timeout_s),
            "timeout": REQUEST_CAP,
        }
        retry: RetryConfig = {
            "max_retries": 10 if settings.retry_s > 0 else 0,
            "retry_timeout": timedelta(seconds=settings.retry_s),
            "backoff": {
                "init_backoff": timedelta(milliseconds=100),
                "max_backoff": timedelta(seconds=2),
                "base": 2,
            },
        }
        self._store = S3Store(settings.bucket, config=config, client_options=client, retry_config=retry)

    def __repr__(self) -> str:
        where = self._settings.endpoint or f"AWS S3 {self._settings.region}"
        return f"S3ArtifactStore({where}, bucket={self._settings.bucket!r}, prefix={self._settings.prefix!r})"

    def key(self, render_id: str) -> str:
        """The object of a render's output (ids are checked so they cannot leave the prefix)."""
        if not is_valid_id(render_id):
            raise ValueError(f"not a render id: {render_id!r}")
        return f"{self._settings.prefix}{render_id[:2]}/{render_id}"

    async def put(
        self, render_id: str, data: bytes | Path, content_type: str | None = None
    ) -> StoredArtifact:
        """Stores `data` (or the file it names, read a part at a time) as the render's output,
        replacing any whole; `content_type` is what the store answers a presigned URL with."""
        parts = await asyncio.to_thread(_Parts, data, self._settings.part_bytes)
        try:
            return await self._put(render_id, parts, content_type)
        finally:
            parts.close()

    async def _put(self, render_id: str, parts: _Parts, content_type: str | None) -> StoredArtifact:
        key = self.key(render_id)
        part_bytes = self._settings.part_bytes
        attributes: Attributes | None = {"Content-Type": content_type} if content_type else None
        multipart = parts.size > part_bytes
        upload = asyncio.ensure_future(
            obstore.put_async(
                self._store,
                key,
                parts,
                attributes=attributes,
                use_multipart=multipart,
                chunk_size=part_bytes,
                max_concurrency=PARTS_IN_FLIGHT,
            )
        )
        if not multipart:
            # One PUT: cancelling it drops the request, and the object is stored whole or not at all.
            with self._errors("store the output of", render_id, missing_is_unavailable=True):
                await upload
            return StoredArtifact(parts.size, parts.digest.hexdigest())
        upload.add_done_callback(_retrieve)
        try:
            with self._errors("store the output of", render_id, missing_is_unavailable=True):
                await asyncio.shield(upload)
        except asyncio.CancelledError:
            # Dropping the upload would leave its parts behind: fail its next read instead, which
            # aborts it, and wait (a little) for that.
            parts.stop()
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(upload), ABORT_WAIT_S)
            raise
        return StoredArtifact(parts.size, parts.digest.hexdigest())

    async def size(self, render_id: str) -> int:
        """The size of the render's output (a HEAD); NotFound when there is none."""
        key = self.key(render_id)
        with self._errors("find the output of", render_id):
            meta = await obstore.head_async(self._store, key)
        return meta["size"]

    async def read(self, render_id: str, offset: int = 0, length: int = 0) -> AsyncIterator[bytes]:
        """The bytes from `offset`, `length` of them (0 = to the end), in chunks of 64 KiB, from one
        ranged GET streamed as it is read."""
        if offset < 0 or length < 0:
            raise ValidationFailed.field("offset" if offset < 0 else "length", "must not be negative")
        pending = b""
        async for piece in self._stream(render_id, offset, length, CHUNK):
            data = pending + piece if pending else piece
            view = memoryview(data)
            start = 0
            while len(data) - start >= CHUNK:
                yield bytes(view[start : start + CHUNK])
                start += CHUNK
            pending = bytes(view[start:])
        if pending:
            yield pending

    async def get(self, render_id: str) -> bytes:
        """The whole output of a render (for references)."""
        key = self.key(render_id)
        with self._errors("read the output of", render_id):
            result = await obstore.get_async(self._store, key)
            return bytes(await result.bytes_async())

    async def delete(self, render_id: str) -> None:
        """Deletes the render's output, if it is there."""
        key = self.key(render_id)
        with contextlib.suppress(NotFound), self._errors("delete the output of", render_id):
            await obstore.delete_async(self._store, key)

    @asynccontextmanager
    async def local_copy(self, render_id: str) -> AsyncIterator[Path]:
        """A file holding a copy of the render's output, for readers that need a file (ffmpeg
        seeking in a video), deleted on leaving; NotFound when there is no output."""
        directory = Path(await asyncio.to_thread(tempfile.mkdtemp, prefix="renderflow-artifact-"))
        try:
            path = directory / render_id
            file = await asyncio.to_thread(path.open, "wb")
            try:
                async for piece in self._stream(render_id, 0, 0, COPY_CHUNK):
                    await asyncio.to_thread(file.write, piece)
            finally:
                await asyncio.to_thread(file.close)
            yield path
        finally:
            await asyncio.to_thread(shutil.rmtree, directory, True)

    async def presigned_url(self, render_id: str, expires_s: float | None = None) -> tuple[str, datetime]:
        """A URL that GETs the render's output without credentials until the time returned
        (RENDERFLOW_ARTIFACT_S3_PRESIGN_S by default); it does not check that the output exists."""
        key = self.key(render_id)
        seconds = self._settings.presign_s if expires_s is None else expires_s
        if not 1 <= seconds <= MAX_PRESIGN_S:
            raise ValidationFailed.field("expires_s", f"must be between 1 and {MAX_PRESIGN_S} seconds")
        expires_in = timedelta(seconds=int(seconds))
        expires_at = datetime.now(UTC) + expires_in  # taken first: the URL lives at least this long
        with self._errors("sign a URL of", render_id):
            url = await obstore.sign_async(self._store, "GET", key, expires_in)
        return url, expires_at

    def scoped(self, name: str) -> S3ArtifactStore:
        """The objects under `<prefix><name>/` (another kind of file: uploads), on this store's client."""
        scoped = copy.copy(self)
        scoped._settings = replace(self._settings, prefix=f"{self._settings.prefix}{name}/")
        return scoped

    async def check(self) -> None:
        """Returns when the store answers and holds the bucket (a GET of a key that need not exist);
        Unavailable says why not. For a readiness check, or at start-up."""
        probe = f"{self._settings.prefix}.renderflow-check"
        # NotFound: the store answered, and of a key, not of the bucket (a missing bucket is
        # Unavailable): the probe need not exist.
        with contextlib.suppress(NotFound), self._errors("reach", f"bucket {self._settings.bucket}"):
            await obstore.get_async(self._store, probe, options={"range": (0, 1)})

    async def close(self) -> None:
        """Lets obstore's threads hand back what they finished: a process that exits within a few
        milliseconds of its last call may otherwise abort (a thread still waiting for the GIL to
        resolve that call's future is ended by the interpreter's finalization, which aborts the
        process; PyO3/pyo3-async-runtimes#40). Call it once on shutdown, after the last use."""
        await asyncio.sleep(0.05)

    async def _stream(self, render_id: str, offset: int, length: int, chunk: int) -> AsyncIterator[bytes]:
        """The range's bytes as the store sends them, in pieces of at least `chunk` (but the last)."""
        key = self.key(render_id)
        result = await self._get(render_id, key, offset, length)
        if result is None:
            return
        with self._errors("read the output of", render_id):
            async for piece in result.stream(min_chunk_size=chunk):
                yield piece

    async def _get(self, render_id: str, key: str, offset: int, length: int) -> GetResult | None:
        """The GET of the range, or None when it is empty (`offset` at the end)."""
        options: GetOptions = {}
        if offset or length:
            options["range"] = (offset, offset + length) if length else {"offset": offset}
        try:
            with self._errors("read the output of", render_id):
                return await obstore.get_async(self._store, key, options=options)
        except Unavailable as exc:
            if "range" not in options or not _RANGE_NOT_SATISFIABLE.search(exc.message):
                raise
            # An empty object, or a range from its end or beyond it, is not satisfiable (416): say
            # what the local store says of it.
            total = await self.size(render_id)
            if offset > total:
                raise ValidationFailed.field("offset", f"is beyond the end ({total} bytes)") from None
            if offset == total:
                return None
            raise

    @contextlib.contextmanager
    def _errors(self, doing: str, render_id: str, *, missing_is_unavailable: bool = False) -> Iterator[None]:
        """obstore's errors as Renderflow's: NotFound for a missing object, Unavailable for the rest
        (said briefly: obstore's own messages hold the whole response)."""
        try:
            yield
        except (FileNotFoundError, ObstoreNotFound) as exc:
            code = _code(exc)
            if missing_is_unavailable or code == "NoSuchBucket":
                raise Unavailable(
                    f"the artifact store could not {doing} {render_id}: {_brief(exc)}"
                ) from None
            raise NotFound(
                f"render {render_id} has no stored output" + (f" ({code})" if code else "")
            ) from None
        except (ObstoreError, OSError) as exc:
            raise Unavailable(f"the artifact store could not {doing} {render_id}: {_brief(exc)}") from None


def _code(exc: BaseException) -> str:
    match = _S3_CODE.search(str(exc))
    return match.group(1) if match else ""


def _brief(exc: BaseException) -> str:
    """The first line of an obstore error without the response body it quotes, and S3's error code."""
    first = str(exc).split("\n", 1)[0]
    first = first.split(": <?xml", 1)[0].rstrip(": ")
    code = _code(exc)
    brief = f"{type(exc).__name__}: {first[:400]}"
    return f"{brief} ({code})" if code else brief


def _retrieve(upload: asyncio.Future[Any]) -> None:
    """Marks the outcome of an upload as seen, whoever awaited it (an abandoned one's error is
    expected, not news)."""
    if not upload.cancelled():
        upload.exception()

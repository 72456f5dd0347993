"""H.264 MP4 encoding, probing and last-frame decoding with the ffmpeg binary that the
imageio-ffmpeg wheel ships.

ffmpeg runs as a subprocess fed raw RGB frames on stdin, so encoding never holds the event loop
or the GIL; killing it is how an encode is cancelled.
"""

from __future__ import annotations

import asyncio
import functools
import io
import os
import re
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import imageio_ffmpeg  # type: ignore[import-untyped]  # no stubs, no py.typed
from PIL import Image

from services.generation.backends import PermanentBackendError

_STDERR_KEPT = 4096
_NICENESS = 10
_STREAM = re.compile(
    r"Stream #\S+.*?: Video: (?P<codec>\w+)[^,]*, (?P<pix>[a-z0-9]+)(?:\([^)]*\))?, (?P<w>\d+)x(?P<h>\d+)"
)
_DURATION = re.compile(r"Duration: (\d+):(\d+):(\d+(?:\.\d+)?)")
_FRAMES = re.compile(r"frame=\s*(\d+)")
# How far before its end a video's last frame is looked for: a frame falls within it at any frame
# rate of 1 fps or more (as renders have).
_TAIL_S = 2.0


@functools.cache
def ffmpeg() -> str:
    """The path of the bundled ffmpeg; PermanentBackendError when there is none for this platform."""
    try:
        return str(imageio_ffmpeg.get_ffmpeg_exe())
    except RuntimeError as exc:
        raise PermanentBackendError(f"no ffmpeg binary is available: {exc}", "no_encoder") from exc


@dataclass(frozen=True)
class VideoInfo:
    """What ffmpeg reads from a video file: its first video stream and its container."""

    codec: str
    pix_fmt: str
    width: int
    height: int
    duration_s: float
    frames: int


class Encoder:
    """One running ffmpeg process that turns the RGB frames written to it into an MP4 file.

    Frames go down a pipe written from a worker thread: writing megabytes per frame from the
    event loop (an asyncio pipe transport copies them into its buffer) would stall it.
    """

    def __init__(self, process: asyncio.subprocess.Process, sink: io.FileIO, path: Path) -> None:
        self._process = process
        self._sink = sink
        self._path = path
        self._stderr = bytearray()
        assert process.stderr is not None
        self._reader = asyncio.create_task(self._keep_stderr(process.stderr))

    async def _keep_stderr(self, stream: asyncio.StreamReader) -> None:
        # Read all the time: a full stderr pipe would stall ffmpeg and with it our writes.
        while chunk := await stream.read(4096):
            self._stderr = (self._stderr + chunk)[-_STDERR_KEPT:]

    async def _failed(self) -> PermanentBackendError:
        code = await self._process.wait()
        await self._reader
        detail = self._stderr.decode(errors="replace").strip().splitlines()[-1:] or ["no message"]
        return PermanentBackendError(
            f"video encoding failed (ffmpeg exit {code}): {detail[0]}", "encode_failed"
        )

    async def write(self, chunks: Iterable[bytes]) -> None:
        """Sends raw RGB bytes (e.g. one frame, band by band), producing and writing them in a
        thread that waits, without the GIL, while ffmpeg catches up."""
        try:
            await asyncio.to_thread(self._send, chunks)
        except BrokenPipeError:
            raise await self._failed() from None

    def _send(self, chunks: Iterable[bytes]) -> None:
        for chunk in chunks:
            view = memoryview(chunk)
            while view:
                view = view[self._sink.write(view) or 0 :]

    async def close(self) -> None:
        """Kills ffmpeg if it is still running and waits for it to be gone. A thread still
        writing fails on the dead pipe (or on the closed file) and ends."""
        if self._process.returncode is None:
            with suppress(ProcessLookupError):
                self._process.kill()
        await self._process.wait()
        await self._reader
        with suppress(OSError):
            self._sink.close()

    async def finish(self) -> Path:
        """Ends the input, waits for ffmpeg to write the file, and returns where it is."""
        self._sink.close()
        if await self._process.wait() != 0:
            raise await self._failed()
        await self._reader
        return self._path


@asynccontextmanager
async def encoding(width: int, height: int, fps: int, output: Path | None = None) -> AsyncIterator[Encoder]:
    """An Encoder for frames of `width` x `height` (both even) at `fps`, writing `output` (by
    default a file of its own, removed on exit); on exit (cancellation included) ffmpeg is killed
    if still running."""
    workdir = Path(await asyncio.to_thread(tempfile.mkdtemp, prefix="renderflow-video-"))
    path = output or workdir / "out.mp4"
    # bitexact and no metadata: the same frames give the same bytes (x264 is deterministic too).
    args = [
        *("-hide_banner", "-nostdin", "-nostats", "-loglevel", "error"),
        *("-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width}x{height}", "-r", str(fps), "-i", "-"),
        *("-c:v", "libx264", "-preset", "veryfast", "-pix_fmt", "yuv420p"),
        *("-movflags", "+faststart", "-fflags", "+bitexact", "-flags:v", "+bitexact"),
        *("-map_metadata", "-1", "-f", "mp4", "-y", str(path)),
    ]
    encoder = None
    read_end, write_end = os.pipe()
    sink = io.FileIO(write_end, "w")
    try:
        try:
            process = await asyncio.create_subprocess_exec(
                ffmpeg(),
                *args,
                stdin=read_end,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
            )
        finally:
            os.close(read_end)  # ffmpeg has its own copy; ours would keep the pipe open
        with suppress(OSError):
            # Before ffmpeg starts its encoding threads (they inherit it): the worker's event
            # loop, which keeps leases alive, comes before an encode when the cores are busy.
            os.setpriority(os.PRIO_PROCESS, process.pid, _NICENESS)
        encoder = Encoder(process, sink, path)
        yield encoder
    finally:
        if encoder is not None:
            await encoder.close()
        sink.close()
        await asyncio.to_thread(shutil.rmtree, workdir, True)


async def probe(data: bytes | Path) -> VideoInfo:
    """Codec, pixel format, size, duration and frame count of the first video stream of `data`, or
    of the file it names (read by ffmpeg, which demuxes every packet); PermanentBackendError if it
    is not a video."""
    workdir = Path(await asyncio.to_thread(tempfile.mkdtemp, prefix="renderflow-probe-"))
    try:
        path = data if isinstance(data, Path) else workdir / "in"
        if not isinstance(data, Path):
            await asyncio.to_thread(path.write_bytes, data)
        returncode, stderr = await _run_ffmpeg(
            ["-i", str(path), "-map", "0:v:0", "-c", "copy", "-f", "null", "-"], stderr=True
        )
    finally:
        await asyncio.to_thread(shutil.rmtree, workdir, True)
    text = stderr.decode(errors="replace")
    stream, duration, frames = _STREAM.search(text), _DURATION.search(text), _FRAMES.findall(text)
    if returncode != 0 or stream is None or duration is None or not frames:
        raise PermanentBackendError("the output is not a readable video", "bad_output")
    hours, minutes, seconds = duration.groups()
    return VideoInfo(
        codec=stream["codec"],
        pix_fmt=stream["pix"],
        width=int(stream["w"]),
        height=int(stream["h"]),
        duration_s=int(hours) * 3600 + int(minutes) * 60 + float(seconds),
        frames=int(frames[-1]),
    )


async def last_frame(path: Path) -> bytes:
    """The last frame of the video file at `path`, as PNG; PermanentBackendError (reason
    `undecodable_video`) when ffmpeg cannot decode one.

    Bounded whatever the video's length: ffmpeg seeks to its last seconds, decodes from the
    keyframe before them and writes each frame over the one before (`-update`), so one frame is
    kept. (Not imageio-ffmpeg's frame reader: it forks with a preexec_fn, which crashes a process
    running gRPC's threads, as the worker does.)
    """
    workdir = Path(await asyncio.to_thread(tempfile.mkdtemp, prefix="renderflow-frame-"))
    try:
        frame = workdir / "last.ppm"  # raw RGB with a header: nothing to compress per frame
        # A frame rate under 1 fps (a video from elsewhere) may have none in the tail: all of it then.
        for tail in (["-sseof", f"-{_TAIL_S:g}"], []):
            args = [*tail, "-i", str(path), "-map", "0:v:0", "-update", "1", "-c:v", "ppm", "-y", str(frame)]
            if (await _run_ffmpeg(["-loglevel", "error", *args]))[0] != 0:
                raise PermanentBackendError("the video cannot be decoded", "undecodable_video")
            if await asyncio.to_thread(frame.exists):
                return await asyncio.to_thread(_png, frame)
        raise PermanentBackendError("the video has no frames", "undecodable_video")
    finally:
        await asyncio.to_thread(shutil.rmtree, workdir, True)


async def _run_ffmpeg(args: list[str], *, stderr: bool = False) -> tuple[int, bytes]:
    """Runs ffmpeg to its end (killed if cancelled): its exit code, and what it wrote to stderr
    when asked for."""
    process = await asyncio.create_subprocess_exec(
        ffmpeg(),
        *("-hide_banner", "-nostdin", *args),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE if stderr else asyncio.subprocess.DEVNULL,
    )
    try:
        _, written = await process.communicate()
        return process.returncode or 0, written or b""
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


def _png(path: Path) -> bytes:
    out = io.BytesIO()
    with Image.open(path) as image:
        image.convert("RGB").save(out, "PNG", compress_level=1)
    return out.getvalue()

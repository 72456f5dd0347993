"""`rf`: Renderflow from a terminal. Submit a render and watch it live (queued with its place and
ETA, then its phases and steps, with the time so far), follow or list renders, cancel them, run a
batch from a JSON-lines file; `--json` for scripts.

Configuration: RENDERFLOW_URL, RENDERFLOW_API_KEY, RENDERFLOW_PROJECT, or the file
`~/.config/renderflow/config.toml` (see renderflow_client.config).

Exit codes: 0 succeeded; 1 failed; 2 bad usage; 3 cancelled or expired; 4 still running when
`--timeout` ran out; 5 the API refused or could not be reached; 130 interrupted, the render left
running.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
from collections.abc import Sequence
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table
from rich.text import Text

from renderflow_client.aio import AsyncRenderflow
from renderflow_client.errors import RenderflowError, ValidationError, WaitTimeout
from renderflow_client.models import Render, RenderEvent

OK, FAILED, USAGE, CANCELLED, TIMED_OUT, API_ERROR, INTERRUPTED = 0, 1, 2, 3, 4, 5, 130
EXIT_BY_STATUS = {"succeeded": OK, "failed": FAILED, "cancelled": CANCELLED, "expired": CANCELLED}
BATCH_SIZE = 32
"""Renders per batch request: under the API's 64, and under the default rate limit's burst (40),
which a batch larger than it is refused for."""
PIPE_WIDTH = 200
"""The width of tables printed to a pipe or a file."""
POLL_S = 1.0
"""How often a queued render's place and ETA are asked for (events do not carry them)."""


class Watch:
    """What the display shows of one render, kept up to date from its events and its state."""

    def __init__(self, render: Render, started: float) -> None:
        self.render = render
        self.status = render.status
        self.phase = ""
        self.progress = render.progress
        self.message = ""
        self.started = started
        self.ended_at: float | None = None

    def apply(self, event: RenderEvent) -> None:
        if event.type == "phase":
            self.phase = event.phase or ""
        elif event.type == "progress" and event.progress is not None:
            self.progress = event.progress
        elif event.type in ("queued", "started"):
            self.status, self.phase = ("queued" if event.type == "queued" else "running"), ""
            self.message = event.message or ""
        else:
            self.status = event.type
        if event.terminal:
            self.ended_at = time.monotonic()
            self.message = event.error.message if event.error else ""

    def line(self, *, width: int = 0) -> Text:
        elapsed = (self.ended_at or time.monotonic()) - self.started
        text = Text()
        text.append(f"{self.render.id[:8]}  ", style="dim")
        if self.status == "queued":
            text.append("queued", style="yellow")
            position, eta = self.render.queue_position, self.render.eta_s
            if position is not None:
                text.append(f" · {'next' if position == 0 else f'{position} ahead'}")
            if eta is not None:
                text.append(f" · ETA {eta:.0f} s")
            if self.message:
                text.append(f" · {self.message}", style="dim")
        elif self.status == "running":
            steps = int(self.render.params.get("steps") or 0)
            text.append(self.phase or "started", style="cyan")
            if self.phase == "generation" and steps:
                done = min(steps, round(self.progress * steps))
                filled = round(20 * self.progress)
                text.append(f" · step {done}/{steps} ")
                text.append("━" * filled, style="cyan")
                text.append("─" * (20 - filled), style="dim")
                text.append(f" {self.progress:4.0%}")
        else:
            style = "green" if self.status == "succeeded" else "red"
            text.append(self.status, style=style)
            if self.message:
                text.append(f" · {self.message}")
        text.append(f"  {_clock(elapsed)}", style="dim")
        return text


class _Still:
    """What stands for a live display where there is none (not a terminal, or `--json`): updates
    go nowhere; the outcome is printed as lines."""

    def __enter__(self) -> _Still:
        return self

    def __exit__(self, *exc_info: object) -> None:
        return None

    def update(self, renderable: object) -> None:
        return None


def _live(renderable: Any, *, console: Console, refresh_per_second: float, enabled: bool) -> Live | _Still:
    return Live(renderable, console=console, refresh_per_second=refresh_per_second) if enabled else _Still()


def _clock(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    return f"{minutes}:{seconds:02d}"


# The commands


async def render_command(
    client: AsyncRenderflow, args: argparse.Namespace, out: Console, err: Console
) -> int:
    params = dict(_param(text) for text in args.param)
    submitted = await client.submit(
        args.prompt,
        project=args.project,
        kind=args.kind,
        params=params,
        negative_prompt=args.negative,
        reference=await _reference(client, args.reference, args.required),
        priority=args.priority,
    )
    if not args.json:
        err.print(f"render {submitted.id} queued ({submitted.kind}, project {submitted.project})")
    return await follow(client, submitted, args, out, err)


async def watch_command(client: AsyncRenderflow, args: argparse.Namespace, out: Console, err: Console) -> int:
    return await follow(client, await client.get(args.id), args, out, err)


async def follow(
    client: AsyncRenderflow, render: Render, args: argparse.Namespace, out: Console, err: Console
) -> int:
    """Follows the render live until it ends (or `--timeout`), then writes its output where asked."""
    watch = Watch(render, time.monotonic())
    args.render_id = render.id  # for the interrupt's question
    live = _live(watch.line(), console=err, refresh_per_second=8, enabled=err.is_terminal and not args.json)
    with live:

        async def on_event(event: RenderEvent) -> None:
            watch.apply(event)
            live.update(watch.line())
            if not err.is_terminal and not args.json and event.type in ("queued", "started", "phase"):
                err.print(watch.line())

        async def place_and_eta() -> None:
            while True:
                await asyncio.sleep(POLL_S)
                if watch.status in ("queued", "running"):
                    with contextlib.suppress(RenderflowError):  # the display waits for the next one
                        watch.render = await client.get(render.id)
                        live.update(watch.line())

        poller = asyncio.create_task(place_and_eta())
        try:
            final = await client.wait(render.id, timeout=args.timeout, on_event=on_event)
        finally:
            poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await poller
        watch.render = final
        watch.status = final.status
        live.update(watch.line())
    return await finish(client, final, args, out, err)


async def finish(
    client: AsyncRenderflow, render: Render, args: argparse.Namespace, out: Console, err: Console
) -> int:
    saved: Path | None = None
    if render.succeeded and render.output is not None and getattr(args, "output", None) is not None:
        saved = Path(await client.download(render, args.output))  # type: ignore[arg-type]
    if args.json:
        out.print_json(json.dumps({**render.raw, **({"saved_to": str(saved)} if saved else {})}))
    elif render.succeeded and render.output is not None:
        output = render.output
        what = f"{output.width}x{output.height} {output.content_type}, {output.bytes / 1000:.0f} kB"
        err.print(f"[green]✓[/] {render.id} succeeded ({what})" + (f" → {saved}" if saved else ""))
    else:
        error = render.error
        detail = f": {error.code}/{error.reason}: {error.message}" if error else ""
        err.print(f"[red]✗[/] {render.id} {render.status}{detail}")
    return EXIT_BY_STATUS.get(render.status, FAILED)


async def get_command(client: AsyncRenderflow, args: argparse.Namespace, out: Console, err: Console) -> int:
    render = await client.get(args.id, download_url=args.download_url)
    if args.json:
        out.print_json(json.dumps(render.raw))
        return OK
    table = Table.grid(padding=(0, 2))
    for name in (
        "id",
        "status",
        "kind",
        "project",
        "prompt",
        "progress",
        "queue_position",
        "eta_s",
        "attempts",
        "trace_id",
    ):
        value = render.raw.get(name)
        if value is not None:
            table.add_row(Text(name, style="dim"), Text(str(value)))
    if render.output:
        table.add_row(
            Text("output", style="dim"), Text(f"{render.output.content_type}, {render.output.bytes} bytes")
        )
        if render.output.download_url:
            table.add_row(Text("download_url", style="dim"), Text(render.output.download_url))
    if render.error:
        table.add_row(
            Text("error", style="dim"),
            Text(f"{render.error.code}/{render.error.reason}: {render.error.message}"),
        )
    out.print(table)
    return OK


async def list_command(client: AsyncRenderflow, args: argparse.Namespace, out: Console, err: Console) -> int:
    renders = client.list(project=args.project, status=args.status, kind=args.kind, limit=args.limit)
    if args.json:
        async for render in renders:
            out.print(json.dumps(render.raw), soft_wrap=True)
        return OK
    table = Table(box=None, header_style="dim")
    table.add_column("id", no_wrap=True, min_width=36)
    for name in ("status", "kind", "prompt", "created"):
        table.add_column(name, no_wrap=True, overflow="ellipsis")
    async for render in renders:
        created = render.created_at.strftime("%Y-%m-%d %H:%M:%S") if render.created_at else ""
        table.add_row(render.id, render.status, render.kind, render.prompt[:48], created)
    out.print(table)
    return OK


async def cancel_command(
    client: AsyncRenderflow, args: argparse.Namespace, out: Console, err: Console
) -> int:
    render = await client.cancel(args.id)
    if args.json:
        out.print_json(json.dumps(render.raw))
    else:
        err.print(f"{render.id} {render.status}" + (" (stopping)" if render.status == "running" else ""))
    return OK


async def batch_command(client: AsyncRenderflow, args: argparse.Namespace, out: Console, err: Console) -> int:
    """Submits every line of the file (a render request as JSON, or a bare prompt) in batches of up
    to 64, follows them all with one line each, downloads their outputs, and sums them up."""
    items = _batch_items(Path(args.file))
    started = time.monotonic()
    renders: list[Render] = []
    for first in range(0, len(items), BATCH_SIZE):
        chunk = [await client.render_request(**item) for item in items[first : first + BATCH_SIZE]]
        renders.extend((await client.batch(chunk)).renders)
    watches = {render.id: Watch(render, started) for render in renders}

    def board() -> Table:
        table = Table.grid(padding=(0, 1))
        for number, watch in enumerate(watches.values(), 1):
            table.add_row(
                Text(f"{number:>3}", style="dim"), watch.line(), Text(watch.render.prompt[:40], style="dim")
            )
        return table

    live = _live(board(), console=err, refresh_per_second=4, enabled=err.is_terminal and not args.json)
    with live:

        async def follow_one(render: Render) -> None:
            async def on_event(event: RenderEvent) -> None:
                watches[render.id].apply(event)
                live.update(board())

            final = await client.wait(render.id, timeout=args.timeout, on_event=on_event)
            watches[render.id].render = final
            watches[render.id].status = final.status
            if final.succeeded and args.output_dir:
                await client.download(final, Path(args.output_dir))

        limit = asyncio.Semaphore(32)  # streams open at once, well under the per-key cap

        async def bounded(render: Render) -> None:
            async with limit:
                await follow_one(render)

        async with asyncio.TaskGroup() as tasks:
            for render in renders:
                tasks.create_task(bounded(render))
        live.update(board())
    counts: dict[str, int] = {}
    for watch in watches.values():
        counts[watch.status] = counts.get(watch.status, 0) + 1
    summary = ", ".join(f"{count} {status}" for status, count in sorted(counts.items()))
    if args.json:
        for watch in watches.values():
            out.print(json.dumps(watch.render.raw), soft_wrap=True)
    err.print(f"{len(renders)} renders: {summary} in {time.monotonic() - started:.1f} s")
    if counts.get("failed"):
        return FAILED
    return CANCELLED if len(renders) != counts.get("succeeded", 0) else OK


def _batch_items(path: Path) -> list[dict[str, Any]]:
    items = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError:
            item = line.strip()
        if isinstance(item, str):
            item = {"prompt": item}
        if not isinstance(item, dict) or "prompt" not in item:
            raise SystemExit(
                f"rf: {path}:{number}: not a render request (an object with a prompt, or a prompt)"
            )
        items.append(item)
    if not items:
        raise SystemExit(f"rf: {path}: no renders in it")
    return items


def _param(text: str) -> tuple[str, Any]:
    name, sep, raw = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"--param takes name=value, got {text!r}")
    try:
        return name, json.loads(raw)
    except json.JSONDecodeError:
        return name, raw


async def _reference(client: AsyncRenderflow, given: str | None, required: bool) -> dict[str, Any] | None:
    """`--reference`: a URL as it is, a file uploaded first."""
    if given is None:
        return None
    if given.startswith(("http://", "https://")):
        return {"url": given, "required": required}
    path = Path(given)
    if not path.is_file():
        raise SystemExit(f"rf: --reference {given}: neither an http(s) URL nor a file")
    return {"upload_id": (await client.upload(path)).id, "required": required}


COMMANDS = {
    "render": render_command,
    "watch": watch_command,
    "get": get_command,
    "ls": list_command,
    "cancel": cancel_command,
    "batch": batch_command,
}


def parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", help="the gateway (default: RENDERFLOW_URL, or http://127.0.0.1:8080)")
    common.add_argument("--project", help="the project (default: RENDERFLOW_PROJECT)")
    common.add_argument("--json", action="store_true", help="print JSON on stdout, for scripts")
    top = argparse.ArgumentParser(
        prog="rf", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = top.add_subparsers(dest="command", required=True, metavar="COMMAND")

    render = commands.add_parser(
        "render", parents=[common], help="submit a render, show its progress, save its output"
    )
    render.add_argument("prompt")
    render.add_argument("--kind", choices=["image", "video"], default="image")
    render.add_argument(
        "--param", action="append", default=[], metavar="NAME=VALUE", help="width=512, steps=20, ..."
    )
    render.add_argument("--negative", metavar="TEXT", help="what to keep out of it")
    render.add_argument("--reference", metavar="URL|FILE", help="an image to start from (a file is uploaded)")
    render.add_argument("--required", action="store_true", help="fail if the reference cannot be had")
    render.add_argument("--priority", type=int)
    render.add_argument(
        "-o", "--output", metavar="PATH", default=".", help="where to save it (default: here, as ID.ext)"
    )
    render.add_argument("--timeout", type=float, metavar="S", help="stop waiting after S seconds (exit 4)")

    watch = commands.add_parser("watch", parents=[common], help="follow a render live until it ends")
    watch.add_argument("id")
    watch.add_argument("-o", "--output", metavar="PATH", help="also save its output")
    watch.add_argument("--timeout", type=float, metavar="S")

    get = commands.add_parser("get", parents=[common], help="show a render")
    get.add_argument("id")
    get.add_argument("--download-url", action="store_true", help="with a presigned link to its output")

    ls = commands.add_parser("ls", parents=[common], help="list your renders, newest first")
    ls.add_argument("--status", choices=["queued", "running", "succeeded", "failed", "cancelled", "expired"])
    ls.add_argument("--kind", choices=["image", "video"])
    ls.add_argument("--limit", type=int, default=20)

    cancel = commands.add_parser("cancel", parents=[common], help="cancel a render")
    cancel.add_argument("id")

    batch = commands.add_parser(
        "batch", parents=[common], help="submit and follow every render of a JSON-lines file"
    )
    batch.add_argument("file", metavar="FILE.jsonl")
    batch.add_argument("--output-dir", metavar="DIR", help="save each output there, as ID.ext")
    batch.add_argument("--timeout", type=float, metavar="S")
    return top


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    # Lines are not wrapped for a pipe or a file (a script reads them whole), tables not squeezed.
    wide = None if sys.stdout.isatty() else PIPE_WIDTH
    out = Console(soft_wrap=True, width=wide, highlight=False)
    err = Console(stderr=True, soft_wrap=True, highlight=False)
    try:
        return asyncio.run(_run(args, out, err))
    except KeyboardInterrupt:
        return _interrupted(args, err)
    except ValidationError as exc:
        fields = "; ".join(f"{e.field}: {e.message}" for e in exc.errors)
        err.print(
            f"[red]rf:[/] {exc.message}" + (f" ({fields})" if fields and fields not in exc.message else "")
        )
        return API_ERROR
    except WaitTimeout as exc:
        err.print(f"rf: {exc.message}; it goes on: rf watch {exc.render.id}")
        return TIMED_OUT
    except RenderflowError as exc:
        err.print(f"[red]rf:[/] {exc}")
        return API_ERROR
    except ValueError as exc:  # a call the client refused before sending it (no project, ...)
        err.print(f"[red]rf:[/] {exc}")
        return USAGE


async def _run(args: argparse.Namespace, out: Console, err: Console) -> int:
    async with AsyncExitStack() as stack:
        client = await stack.enter_async_context(AsyncRenderflow(args.url, project=args.project))
        return await COMMANDS[args.command](client, args, out, err)
    raise AssertionError("unreachable")


def _interrupted(args: argparse.Namespace, err: Console) -> int:
    """Ctrl-C while following a render: leave it running (the default), or cancel it."""
    render_id = getattr(args, "render_id", None)
    if render_id is None:
        return INTERRUPTED
    answer = ""
    if sys.stdin.isatty():
        try:
            answer = input(f"\nrender {render_id} goes on. Cancel it instead? [y/N] ").strip().lower()
        except (EOFError, KeyboardInterrupt):
            answer = ""
    if answer in ("y", "yes"):

        async def cancel() -> str:
            async with AsyncRenderflow(args.url, project=args.project) as client:
                return (await client.cancel(render_id)).status

        err.print(f"render {render_id}: {asyncio.run(cancel())}")
        return CANCELLED
    err.print(f"render {render_id} left running: rf watch {render_id}")
    return INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())

"""The `rf` command against the real stack: in a pseudo-terminal (pexpect) the live display shows
the render queued, then its phases and steps, and the end; the file it writes is a valid PNG or
MP4; Ctrl-C offers to leave the render running or cancel it; exit codes mean something; `--json`
is for scripts."""

from __future__ import annotations

import asyncio
import fcntl
import io
import json
import os
import re
import signal
import struct
import subprocess
import sys
import termios
from dataclasses import dataclass
from pathlib import Path

import pexpect
import pytest
from pexpect import fdpexpect
from PIL import Image

from tests.client.conftest import Account

RF = str(Path(sys.executable).parent / "rf")
ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b[()][A-Z0-9]|\r")


def environment(account: Account) -> dict[str, str]:
    return {
        **os.environ,
        "RENDERFLOW_URL": account.url,
        "RENDERFLOW_API_KEY": account.api_key,
        "RENDERFLOW_PROJECT": account.project,
        "TERM": "xterm-256color",
        "XDG_CONFIG_HOME": "/nonexistent",
    }


@dataclass
class Terminal:
    """`rf` in a pseudo-terminal of 30 x 120: the program sees a terminal on stdin, stdout and
    stderr; the test reads the screen's stream and types. Started with subprocess (fork and exec in
    C): a fork that runs Python before its exec, as pexpect.spawn's does, may crash in a process
    running gRPC's threads, as this one does."""

    process: subprocess.Popen[bytes]
    screen: fdpexpect.fdspawn

    async def expect(self, pattern: str) -> None:
        await asyncio.to_thread(self.screen.expect, pattern)

    def interrupt(self) -> None:
        """Ctrl-C: the terminal would send SIGINT to its foreground process, this one."""
        self.process.send_signal(signal.SIGINT)

    def type(self, line: str) -> None:
        os.write(self.screen.child_fd, f"{line}\n".encode())

    async def until_exit(self) -> tuple[str, int]:
        """Everything the command printed (escape sequences removed), and its exit status."""
        await asyncio.to_thread(self.screen.expect, pexpect.EOF)
        status = await asyncio.to_thread(self.process.wait, 30)
        return ANSI.sub("", self.screen.before or ""), status


def spawn(account: Account, *args: str, cwd: Path) -> Terminal:
    main, attached = os.openpty()
    fcntl.ioctl(attached, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 120, 0, 0))
    process = subprocess.Popen(
        [RF, *args], stdin=attached, stdout=attached, stderr=attached, env=environment(account), cwd=cwd
    )
    os.close(attached)
    return Terminal(process, fdpexpect.fdspawn(main, encoding="utf-8", timeout=30))


async def run(account: Account, *args: str, cwd: Path) -> tuple[int, str, str]:
    """`rf` without a terminal: exit status, stdout, stderr."""
    process = await asyncio.create_subprocess_exec(
        RF,
        *args,
        env=environment(account),
        cwd=cwd,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_render_shows_its_progress_live_and_writes_a_png(account: Account, tmp_path: Path) -> None:
    child = spawn(
        account,
        "render",
        "a lighthouse at dusk",
        "--param",
        "steps=30",
        "--param",
        "width=96",
        "-o",
        "out.png",
        cwd=tmp_path,
    )
    screen, status = await child.until_exit()

    assert status == 0, screen
    assert re.search(r"render [0-9a-f-]{36} queued \(image, project demo\)", screen)
    assert "queued" in screen and "generation" in screen
    steps = [int(n) for n in re.findall(r"step (\d+)/30", screen)]
    assert steps and steps == sorted(steps) and max(steps) >= 20, screen  # redrawn as it went
    assert re.search(r"✓ [0-9a-f-]{36} succeeded \(96x\d+ image/png, \d+ kB\) → out\.png", screen)
    assert re.search(r"\d:\d\d", screen)  # the time so far
    with Image.open(tmp_path / "out.png") as image:
        assert image.format == "PNG" and image.width == 96


async def test_render_of_a_video_writes_an_mp4(account: Account, tmp_path: Path) -> None:
    params = [
        "--param",
        "duration_s=1",
        "--param",
        "fps=8",
        "--param",
        "steps=4",
        "--param",
        "width=64",
        "--param",
        "height=64",
    ]
    child = spawn(account, "render", "waves", "--kind", "video", *params, "-o", "waves.mp4", cwd=tmp_path)
    screen, status = await child.until_exit()

    assert status == 0, screen
    assert "video/mp4" in screen
    assert (tmp_path / "waves.mp4").read_bytes()[4:8] == b"ftyp"


async def interrupted(account: Account, tmp_path: Path, answer: str) -> tuple[str, int]:
    """A slow render interrupted once its steps show, the question answered with `answer`: what
    the terminal showed, and the exit status."""
    terminal = spawn(account, "render", "slow", "--param", "steps=150", cwd=tmp_path)
    await terminal.expect(r"step \d+/150")
    terminal.interrupt()
    await terminal.expect(r"Cancel it instead\? \[y/N\]")
    terminal.type(answer)
    return await terminal.until_exit()


async def test_ctrl_c_leaves_the_render_running_unless_asked_to_cancel(
    account: Account, tmp_path: Path
) -> None:
    left_screen, left_status = await interrupted(account, tmp_path, "")
    left_id = re.search(r"render ([0-9a-f-]{36}) left running", left_screen)
    cancelled_screen, cancelled_status = await interrupted(account, tmp_path, "y")

    assert left_status == 130 and left_id, left_screen
    code, out, _ = await run(account, "get", left_id.group(1), "--json", cwd=tmp_path)
    assert code == 0 and json.loads(out)["status"] in ("running", "succeeded")
    assert cancelled_status == 3 and re.search(r"render [0-9a-f-]{36}: (cancelled|running)", cancelled_screen)
    await run(account, "cancel", left_id.group(1), cwd=tmp_path)


@pytest.mark.parametrize(
    ("args", "status", "said"),
    [
        (["render", "x", "--param", "steps=150", "--timeout", "0.5"], 4, "it goes on: rf watch"),
        (
            ["render", "x", "--reference", "http://127.0.0.1:9/none.png", "--required"],
            1,
            "reference_fetch_failed",
        ),
        (["render", "x", "--param", "width=99999"], 5, "params.width"),
        (["render", "x", "--project", "nope"], 5, "code not_found"),
        (["render"], 2, "the following arguments are required: prompt"),
        (["get", "no-such-render"], 5, "code not_found"),
    ],
    ids=["timeout", "failed", "invalid", "unknown-project", "usage", "missing"],
)
async def test_exit_codes_say_how_it_ended(
    account: Account, tmp_path: Path, args: list[str], status: int, said: str
) -> None:
    code, _, err = await run(account, *args, cwd=tmp_path)
    assert code == status, err
    assert said in err.lower() or said in err, err


async def test_json_for_scripts_and_the_other_commands(account: Account, tmp_path: Path) -> None:
    code, out, _ = await run(account, "render", "scripted", "--json", "-o", str(tmp_path), cwd=tmp_path)
    render = json.loads(out)
    listed_code, listed, _ = await run(account, "ls", "--json", cwd=tmp_path)
    table_code, table, _ = await run(account, "ls", cwd=tmp_path)
    get_code, shown, _ = await run(account, "get", render["id"], cwd=tmp_path)
    watch_code, watched, _ = await run(account, "watch", render["id"], "--json", cwd=tmp_path)

    assert code == 0 and render["status"] == "succeeded"
    assert Path(render["saved_to"]) == tmp_path / f"{render['id']}.png"
    assert listed_code == 0 and [json.loads(line)["id"] for line in listed.splitlines()] == [render["id"]]
    assert table_code == 0 and render["id"] in table and "succeeded" in table
    assert get_code == 0 and render["id"] in shown and "image/png" in shown
    assert watch_code == 0 and json.loads(watched)["id"] == render["id"]


async def test_batch_follows_each_render_and_sums_them_up(account: Account, tmp_path: Path) -> None:
    lines = [
        json.dumps({"prompt": f"tile {n}", "params": {"width": 64, "height": 64, "steps": 5}})
        for n in range(4)
    ]
    (tmp_path / "tiles.jsonl").write_text("\n".join([*lines, "a bare prompt", ""]))
    (tmp_path / "out").mkdir()
    child = spawn(account, "batch", "tiles.jsonl", "--output-dir", "out", cwd=tmp_path)
    screen, status = await child.until_exit()

    assert status == 0, screen
    assert "5 renders: 5 succeeded" in screen
    assert len(re.findall(r"tile \d", screen)) >= 4
    saved = sorted((tmp_path / "out").glob("*.png"))
    assert len(saved) == 5
    with Image.open(io.BytesIO(saved[0].read_bytes())) as image:
        assert image.format == "PNG"

"""`python -m gateway` serves, then stops cleanly on SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import aiohttp

from shared.service_auth import new_service_token
from tests.conftest import free_port


async def test_the_process_serves_and_stops_on_sigterm(tmp_path: Path) -> None:
    port = free_port()
    env = {
        **os.environ,
        "RENDERFLOW_GATEWAY_PORT": str(port),
        "RENDERFLOW_RUN_DIR": str(tmp_path),
        "RENDERFLOW_METADATA_ADDR": f"127.0.0.1:{free_port()}",
        "RENDERFLOW_GENERATION_ADDR": f"127.0.0.1:{free_port()}",
        "RENDERFLOW_SERVICE_TOKEN": new_service_token(),
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", env=env, stderr=asyncio.subprocess.PIPE
    )
    try:

        async def healthy() -> None:
            async with aiohttp.ClientSession() as http:
                while True:
                    try:
                        async with http.get(f"http://127.0.0.1:{port}/healthz") as response:
                            if response.status == 200:
                                return
                    except aiohttp.ClientConnectionError:
                        await asyncio.sleep(0.05)

        await asyncio.wait_for(healthy(), 20)
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 10) == 0
        assert process.stderr is not None
        logs = (await process.stderr.read()).decode()
        assert '"message": "shutting down"' in logs and "Traceback" not in logs
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()

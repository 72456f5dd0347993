"""A real Prometheus for tests: Debian's `prometheus` binary on a free port, scraping the given
`/metrics` URLs every second into a temporary TSDB, queried through its HTTP API; or a skip that
says why there is none (apt-get install prometheus).

    async with serving_prometheus({"gateway": f"{base}/metrics"}, tmp_path) as prometheus:
        await prometheus.wait_for_scrapes_after(time.time())
        series = await prometheus.query('sum by (http_route) (rate(...[30s]))')

Everything here awaits: the stack it scrapes usually serves `/metrics` on the test's own event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest
import yaml

from tests.conftest import free_port

SCRAPE_INTERVAL_S = 1.0
READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0


class QueryError(Exception):
    """Prometheus refused a query (bad PromQL, an evaluation error): its errorType and error."""


@dataclass
class Prometheus:
    """A running Prometheus: its base URL and an HTTP session to query it with."""

    base: str
    http: aiohttp.ClientSession
    log: Path
    """What the process wrote (stdout and stderr), for failure messages."""

    async def query(self, expr: str) -> list[dict[str, Any]]:
        """The instant vector (or scalar, as one sample) `expr` evaluates to now; QueryError when
        Prometheus rejects it."""
        async with self.http.get(f"{self.base}/api/v1/query", params={"query": expr}) as response:
            body = await response.json(content_type=None)
        if body.get("status") != "success":
            raise QueryError(f"{body.get('errorType')}: {body.get('error')}")
        data = body["data"]
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": data["result"]}]
        result: list[dict[str, Any]] = data["result"]
        return result

    async def wait_for_scrapes_after(self, moment: float, scrapes: int = 2, timeout_s: float = 20.0) -> None:
        """Waits, bounded, until every target has been scraped `scrapes` times since `moment`
        (epoch seconds) and was up each time: every series that existed then has that many samples
        since, enough for `rate` over a window that reaches back to `moment`."""
        wanted = moment + (scrapes - 1) * SCRAPE_INTERVAL_S + 0.05
        deadline = time.monotonic() + timeout_s
        last: object = None
        while time.monotonic() < deadline:
            ups = await self.query("up")
            last = ups
            if ups and all(float(s["value"][1]) == 1 and float(s["value"][0]) > wanted for s in ups):
                return
            await asyncio.sleep(0.2)
        pytest.fail(f"Prometheus did not scrape every target {scrapes} times in {timeout_s:g} s: up = {last}")


def scrape_config(targets: Mapping[str, str]) -> dict[str, Any]:
    """A Prometheus configuration scraping each `/metrics` URL every second, as job `name`."""
    jobs = []
    for name, url in targets.items():
        parts = urlsplit(url)
        jobs.append(
            {
                "job_name": name,
                "scheme": parts.scheme,
                "metrics_path": parts.path,
                "static_configs": [{"targets": [parts.netloc]}],
            }
        )
    interval = f"{SCRAPE_INTERVAL_S:g}s"
    return {
        "global": {"scrape_interval": interval, "scrape_timeout": interval, "evaluation_interval": interval},
        "scrape_configs": jobs,
    }


@asynccontextmanager
async def serving_prometheus(targets: Mapping[str, str], work_dir: Path) -> AsyncIterator[Prometheus]:
    """A Prometheus of our own on a free port scraping `targets` (job name: `/metrics` URL) every
    second, its data and configuration under `work_dir`; stopped after. A skip when the binary is
    not installed."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("prometheus is not installed (apt-get install prometheus): dashboard queries untested")
    work_dir.mkdir(parents=True, exist_ok=True)
    config = work_dir / "prometheus.yml"
    config.write_text(yaml.safe_dump(scrape_config(targets), sort_keys=False))
    log = work_dir / "prometheus.log"
    port = free_port()
    with log.open("wb") as output:
        process = await asyncio.create_subprocess_exec(
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={work_dir / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
            await _wait_ready(process, http, base, log)
            yield Prometheus(base, http, log)
    finally:
        with contextlib.suppress(ProcessLookupError):  # it may have exited already
            process.terminate()
        try:
            await asyncio.wait_for(process.wait(), STOP_TIMEOUT_S)
        except TimeoutError:
            process.kill()
            await process.wait()


async def _wait_ready(
    process: asyncio.subprocess.Process, http: aiohttp.ClientSession, base: str, log: Path
) -> None:
    """Waits, bounded, until `/-/ready` answers 200; fails with the log when the process exits."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.returncode is not None:
            pytest.fail(f"prometheus exited with {process.returncode}:\n{log.read_text(errors='replace')}")
        try:
            async with http.get(f"{base}/-/ready") as response:
                if response.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.1)
    pytest.fail(f"prometheus was not ready in {READY_TIMEOUT_S:g} s:\n{log.read_text(errors='replace')}")

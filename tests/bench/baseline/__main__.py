"""`python -m tests.bench.baseline --database-url URL [--port 0] [--step-ms 100]`: serve the seed-design
baseline in a process of its own; prints `listening on <port>` once it serves, stops on SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import tempfile
from pathlib import Path

from shared.lifecycle import wait_for_shutdown_signal
from tests.bench.baseline.app import BaselineSettings, running


async def serve(settings: BaselineSettings) -> None:
    async with running(settings) as port:
        print(f"listening on {port}", flush=True)
        await wait_for_shutdown_signal()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--database-url", required=True)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--step-ms", type=float, default=0.0)
    parser.add_argument("--artifact-dir", type=Path)
    args = parser.parse_args()
    artifact_dir = args.artifact_dir or Path(tempfile.mkdtemp(prefix="baseline-artifacts-"))
    asyncio.run(serve(BaselineSettings(args.database_url, artifact_dir, args.step_ms, port=args.port)))


if __name__ == "__main__":
    main()

"""Process lifecycle for the entry points: run a service until the signal to shut down."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager

from shared.logs import setup_logging
from shared.resource_metrics import measure_event_loop_lag
from shared.settings import Env, run_dir
from shared.telemetry import setup_telemetry

log = logging.getLogger(__name__)

GC_THRESHOLDS = (20_000, 50, 100)
"""The collector's thresholds while serving (CPython's are 700, 10, 10). A request allocates a few
thousand container objects, nearly all freed by reference counting. Measured under 64 submitting
clients (about 8,000 submits): at the default, the gateway and generation each collected about 900
times, 7 or 8 of them over the whole heap, 0.6-0.75 s in all; tuned and with start-up's objects
frozen, 7-15 times and 0.08-0.19 s."""


def tune_gc() -> None:
    """Once the process is set up: what start-up built (modules, schemas, the app) is moved out of the
    collector's sight for good (`gc.freeze`), and collections run less often."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


async def wait_for_shutdown_signal() -> signal.Signals:
    """Returns when the process gets SIGTERM or SIGINT (a second one is not caught again)."""
    loop = asyncio.get_running_loop()
    received: asyncio.Future[signal.Signals] = loop.create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, _resolve, received, sig)
    try:
        return await received
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


def _resolve(future: asyncio.Future[signal.Signals], sig: signal.Signals) -> None:
    if not future.done():
        future.set_result(sig)


def run_process(
    service: str,
    env: Env,
    serving: Callable[[], AbstractAsyncContextManager[object]],
    *,
    log_level: str = "INFO",
    metrics_port: int = 0,
) -> None:
    """The whole life of a Renderflow process: JSON logs, telemetry, `serving()` entered until
    SIGTERM or SIGINT, then left (which drains), and the telemetry flushed last."""
    setup_logging(service, log_level)
    telemetry = setup_telemetry(service, env, run_dir(env), metrics_port=metrics_port)

    async def serve() -> None:
        lag = asyncio.create_task(measure_event_loop_lag(), name="event-loop-lag")
        try:
            async with serving():
                tune_gc()
                received = await wait_for_shutdown_signal()
                log.info("shutting down", extra={"signal": received.name})
        finally:
            lag.cancel()

    try:
        asyncio.run(serve())
    finally:
        telemetry.shutdown()

"""The `renderflow` command: run the whole stack on this machine, run one worker, or administer users."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from shared.errors import RenderflowError
from shared.service_auth import new_service_token
from shared.settings import SERVICE_TOKEN, Addresses, ConfigError, Env, run_dir, service_token
from tools.cli.supervisor import (
    LOG_BACKUPS,
    LOG_MAX_BYTES,
    ChildEvent,
    GrpcHealth,
    HttpHealth,
    ProcessSpec,
    StartupError,
    Supervisor,
)
from tools.embedded_pg.server import EmbeddedPostgres, EmbeddedPostgresError, ServerCommand

DEFAULT_PG_PORT = 54329
"""RENDERFLOW_LOCAL_PG_PORT: the port of the embedded PostgreSQL (when DATABASE_URL is not set)."""
METRICS_BASE_PORT = 9100
"""RENDERFLOW_LOCAL_METRICS_BASE_PORT: `/metrics` of metadata, imagefetch, generation on base+1..3, of
worker n on base+10+n (the gateway serves it on its own port); 0 turns them off."""
WORKERS = 2
"""RENDERFLOW_LOCAL_WORKERS: the worker processes `renderflow run` starts."""
STOP_TIMEOUT = 9.0
"""Seconds for every process to stop; PostgreSQL, last, has what the services leave (and at least
the half second the supervisor keeps for each stage after the first to stop)."""


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `renderflow` console script; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["trace-report"]:
        # The report tool has its own options; hand it the rest of the command line.
        from tools.tracereport.cli import main as trace_report

        return trace_report(argv[1:])
    args = _parser().parse_args(argv)
    env = Env()
    try:
        if args.command == "run":
            return asyncio.run(_run(env))
        if args.command == "worker":
            from services.generation.worker import main as worker_main

            worker_main()
            return 0
        return asyncio.run(_admin(args, env))
    except (ConfigError, EmbeddedPostgresError, RenderflowError) as error:
        print(f"renderflow: {error}", file=sys.stderr)
        return 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="renderflow", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser(
        "run",
        help="run the whole stack here (embedded PostgreSQL unless DATABASE_URL is set)",
    )
    commands.add_parser("worker", help="run one generation worker in the foreground")
    commands.add_parser(
        "trace-report",
        add_help=False,
        help="latency per route, phase budgets, slowest traces, error causes from exported spans",
    )
    admin = commands.add_parser("admin", help="users and API keys, in the local stack's database")
    actions = admin.add_subparsers(dest="action", required=True, metavar="ACTION")
    create = actions.add_parser("create-user", help="create a user and print its first API key")
    create.add_argument("name")
    list_keys = actions.add_parser("list-keys", help="list a user's API keys")
    list_keys.add_argument("name")
    revoke = actions.add_parser("revoke-key", help="revoke an API key by its id")
    revoke.add_argument("key_id")
    return parser


def renderflow_stages(env: Env, python: str = sys.executable) -> list[list[ProcessSpec]]:
    """Renderflow's processes, in start order: each service once the one before it is healthy,
    then the workers and the gateway (which stop first, in reverse)."""
    addresses = Addresses.from_env(env)
    workers = env.int("RENDERFLOW_LOCAL_WORKERS", WORKERS, minimum=0)
    metrics_base = env.int("RENDERFLOW_LOCAL_METRICS_BASE_PORT", METRICS_BASE_PORT, minimum=0)

    def module(
        name: str, module: str, health: GrpcHealth | HttpHealth | None, metrics_offset: int = 0
    ) -> ProcessSpec:
        port = metrics_base + metrics_offset if metrics_base and metrics_offset else 0
        return ProcessSpec(name, (python, "-m", module), health, {"RENDERFLOW_METRICS_PORT": str(port)})

    return [
        [module("metadata", "services.metadata", GrpcHealth(addresses.metadata), 1)],
        [module("imagefetch", "services.imagefetch", GrpcHealth(addresses.imagefetch), 2)],
        [module("generation", "services.generation", GrpcHealth(addresses.generation), 3)],
        [
            *(
                module(f"worker-{n}", "services.generation.worker", None, 10 + n)
                for n in range(1, workers + 1)
            ),
            module("gateway", "gateway", HttpHealth(f"{gateway_url(env)}/healthz")),
        ],
    ]


def postgres_spec(server: ServerCommand) -> ProcessSpec:
    """The embedded PostgreSQL as a supervised child, asked to stop by SIGINT: a fast shutdown
    (SIGTERM would wait for every client to leave)."""
    return ProcessSpec(
        "postgres",
        server.argv,
        server.ready,
        server.env,
        inherit_env=False,  # the caller's PG* variables must not reach the server
        cwd=server.cwd,
        run_as=server.run_as,
        stop_signal=signal.SIGINT,
    )


def _service_metrics(env: Env) -> str:
    base = env.int("RENDERFLOW_LOCAL_METRICS_BASE_PORT", METRICS_BASE_PORT, minimum=0)
    return f"; services on ports {base + 1}-{base + 3}, worker n on {base + 10}+n" if base else ""


def gateway_url(env: Env) -> str:
    """Where the gateway is reached (a wildcard listen address is reached on loopback)."""
    host = env.str("RENDERFLOW_GATEWAY_HOST", "127.0.0.1")
    port = env.int("RENDERFLOW_GATEWAY_PORT", 8080, minimum=1)
    if host in {"0.0.0.0", "::", "*"}:
        host = "127.0.0.1"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


async def _run(env: Env) -> int:
    """`renderflow run`: PostgreSQL (unless DATABASE_URL), the services, the dev user; until a signal.

    The embedded PostgreSQL is the first supervised process, restarted like the others. One that
    already serves its data directory (started by hand, or by an earlier run that crashed) is not
    ours: it is used as it is, never restarted or stopped.
    """
    directory = run_dir(env)
    directory.mkdir(parents=True, exist_ok=True)
    stop_requested = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop_requested.set)
    # Settings errors surface before anything starts.
    stages = renderflow_stages(env)
    token = run_service_token(env, directory)
    log_max_bytes = env.int("RENDERFLOW_LOCAL_LOG_MAX_BYTES", LOG_MAX_BYTES, minimum=0)
    log_backups = env.int("RENDERFLOW_LOCAL_LOG_BACKUPS", LOG_BACKUPS, minimum=1)
    database_url = env.optional("DATABASE_URL")
    postgres: EmbeddedPostgres | None = None
    if database_url is None:
        port = env.int("RENDERFLOW_LOCAL_PG_PORT", DEFAULT_PG_PORT, minimum=1)
        postgres = EmbeddedPostgres(directory / "pg", port=port)
        print(f"Starting PostgreSQL in {directory / 'pg'} on port {port} ...", flush=True)
    try:
        if postgres is not None:
            server = await asyncio.to_thread(postgres.prepare)
            database_url = postgres.url
            if server is None:
                print(f"PostgreSQL already runs there ({database_url}): used, and left running.", flush=True)
            else:
                stages.insert(0, [postgres_spec(server)])
        if stop_requested.is_set() or database_url is None:
            return 0
        child_env = {"DATABASE_URL": database_url, "RENDERFLOW_RUN_DIR": str(directory), SERVICE_TOKEN: token}
        # Children flush each line, so their logs are current when a tail is shown.
        child_env["PYTHONUNBUFFERED"] = "1"
        supervisor = Supervisor(
            stages,
            directory / "logs",
            env=child_env,
            stop_timeout=STOP_TIMEOUT,
            notify=_notice,
            log_max_bytes=log_max_bytes,
            log_backups=log_backups,
        )
        try:
            return await _serve(env, supervisor, database_url, directory, stop_requested)
        finally:
            print("Stopping ...", flush=True)
            await supervisor.stop()
    finally:
        if postgres is not None:  # only lets go of the data directory: the server was never its own
            await asyncio.to_thread(postgres.stop)


async def _serve(
    env: Env, supervisor: Supervisor, database_url: str, directory: Path, stop_requested: asyncio.Event
) -> int:
    starting = asyncio.create_task(supervisor.start())
    stopping = asyncio.create_task(stop_requested.wait())
    try:
        await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():
            return 0  # interrupted while starting: stop() in the caller cleans up
        try:
            starting.result()
            api_key = await _dev_api_key(env, database_url, directory)
        except StartupError as error:
            print(f"renderflow: {error}", file=sys.stderr, flush=True)
            return 1
        print(
            "\nRenderflow is running.\n"
            f"  gateway:   {gateway_url(env)}\n"
            f"  API key:   {api_key}   (Authorization: Bearer <key>)\n"
            f"  database:  {database_url}\n"
            f"  logs:      {directory / 'logs'}/<process>.log\n"
            f"  metrics:   {gateway_url(env)}/metrics{_service_metrics(env)}\n"
            "Ctrl-C to stop.",
            flush=True,
        )
        await stopping
        return 0
    finally:
        for task in (starting, stopping):
            task.cancel()
        await asyncio.gather(starting, stopping, return_exceptions=True)


async def _dev_api_key(env: Env, database_url: str, directory: Path) -> str:
    """RENDERFLOW_LOCAL_API_KEY: the development user's API key (default: one made at the first run and
    kept in `<run dir>/dev-api-key`).

    Ensure the development user; its key is RENDERFLOW_LOCAL_API_KEY, else the one kept in
    `<run_dir>/dev-api-key` by an earlier run, else a new one (kept there, mode 600)."""
    from services.metadata.admin import ensure_dev_user

    key_file = directory / "dev-api-key"
    wanted = env.optional("RENDERFLOW_LOCAL_API_KEY")
    if wanted is None and key_file.exists():
        wanted = key_file.read_text().strip() or None
    api_key = await ensure_dev_user(database_url, wanted)
    _write_secret(key_file, api_key)
    return api_key


def run_service_token(env: Env, directory: Path) -> str:
    """RENDERFLOW_SERVICE_TOKEN, else a new random one for this run; every child gets it, and
    `<run_dir>/service-token` (mode 600) keeps it for calling a service by hand."""
    token = service_token(env) if env.optional(SERVICE_TOKEN) else new_service_token()
    _write_secret(directory / "service-token", token)
    return token


def _write_secret(path: Path, secret: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as file:
        os.fchmod(fd, 0o600)  # the mode of an existing file is not changed by O_CREAT
        file.write(secret + "\n")


def _notice(event: ChildEvent) -> None:
    if event.kind == "exited":
        print(f"renderflow: {event}", file=sys.stderr, flush=True)


async def _admin(args: argparse.Namespace, env: Env) -> int:
    """`renderflow admin ...` against the local stack's database (started for the command if
    it is not up, and stopped again)."""
    from services.metadata import admin

    database_url = env.optional("DATABASE_URL")
    postgres: EmbeddedPostgres | None = None
    if database_url is None:
        port = env.int("RENDERFLOW_LOCAL_PG_PORT", DEFAULT_PG_PORT, minimum=1)
        postgres = EmbeddedPostgres(run_dir(env) / "pg", port=port)
        database_url = await asyncio.to_thread(postgres.ensure_running)
    try:
        if args.action == "create-user":
            user_id, api_key = await admin.create_user(database_url, args.name)
            print(f"created user {args.name!r} (id {user_id}); its API key, shown only now:")
            print(api_key)
        elif args.action == "list-keys":
            _print_table(await admin.list_keys(database_url, args.name))
        else:
            await admin.revoke_key(database_url, args.key_id)
            print(f"revoked key {args.key_id}")
        return 0
    finally:
        if postgres is not None:
            with contextlib.suppress(EmbeddedPostgresError):
                await asyncio.to_thread(postgres.stop)


def _print_table(keys: Sequence[Mapping[str, object]]) -> None:
    columns = ["id", "prefix", "created", "revoked"]
    rows = [columns, *([_cell(key, column) for column in columns] for key in keys)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(columns))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    if not keys:
        print("(no keys)")


def _cell(key: Mapping[str, object], column: str) -> str:
    value = key.get(column, key.get(f"{column}_at"))
    return "-" if value is None or value is False else str(value)


if __name__ == "__main__":
    sys.exit(main())

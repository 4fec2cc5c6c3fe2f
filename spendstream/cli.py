"""The `spendstream` command. Each sub-command imports its module lazily so `--help` stays fast."""

from __future__ import annotations

import json
import sys
from typing import Annotated

import typer

from stream_processors.stages import STAGES

app = typer.Typer(
    help="Spendstream: track what AI agent fleets spend on model APIs.",
    no_args_is_help=True,
    add_completion=False,
)
keys_app = typer.Typer(help="Manage API keys (stored hashed in ClickHouse).", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
users_app = typer.Typer(help="Manage people and their organisations (see docs/identity.md).", no_args_is_help=True)
app.add_typer(users_app, name="users")
collectors_app = typer.Typer(help="Provider usage/cost collectors (docs/collectors.md).", no_args_is_help=True)
app.add_typer(collectors_app, name="collectors")


def _settings():
    from pydantic import ValidationError

    from spendstream.settings import Settings

    try:
        return Settings()
    except ValidationError as exc:
        for err in exc.errors():
            field = "SPENDSTREAM_" + "__".join(str(p).upper() for p in err["loc"])
            typer.echo(f"invalid setting {field}: {err['msg']} (got {err.get('input')!r})", err=True)
        raise typer.Exit(2) from None


@app.command("check-config")
def check_config() -> None:
    """Validate the configuration and print the effective values (secrets masked)."""
    s = _settings()
    data = json.loads(s.model_dump_json())
    data["_derived"] = {
        "kafka_bootstrap": s.kafka_bootstrap,
        "kafka_embedded": s.kafka.embedded,
        "clickhouse_url": s.clickhouse_url,
        "clickhouse_embedded": s.clickhouse.embedded,
    }
    typer.echo(json.dumps(data, indent=2))


@app.command("embedded-kafka")
def embedded_kafka(port: Annotated[int, typer.Option(help="listen port")] = 9092) -> None:
    """Run the embedded Kafka-compatible broker (Tansu, memory only) in the foreground."""
    from spendstream.embedded.kafka import run_forever

    run_forever(_settings(), port)


@app.command("embedded-clickhouse")
def embedded_clickhouse(
    port: Annotated[int, typer.Option(help="listen port")] = 8123,
    path: Annotated[str | None, typer.Option(help="chDB data directory")] = None,
    host: Annotated[str, typer.Option(help="listen address")] = "127.0.0.1",
) -> None:
    """Serve ClickHouse's HTTP interface on top of chDB (embedded ClickHouse)."""
    from spendstream.embedded.clickhouse_server import run_forever

    s = _settings()
    run_forever(host=host, port=port, path=path or s.clickhouse.data_path)


@app.command()
def migrate(
    dry_run: Annotated[bool, typer.Option("--dry-run", help="print what would be applied")] = False,
    cluster: Annotated[str | None, typer.Option(help="apply the derived ON CLUSTER schema")] = None,
) -> None:
    """Apply clickhouse/schema/*.sql in order; refuses if an applied file was edited."""
    from spendstream.migrate import main as migrate_main

    sys.exit(migrate_main(_settings(), dry_run=dry_run, cluster=cluster))


@app.command()
def dev(
    demo: Annotated[bool, typer.Option("--demo", help="also run a traffic simulator")] = False,
) -> None:
    """Start the whole stack on the embedded broker and ClickHouse, supervised; Ctrl-C stops it."""
    from spendstream.devstack import run_dev

    sys.exit(run_dev(demo=demo))


@app.command()
def gateway() -> None:
    """Run the ingest gateway (FastAPI)."""
    from ingest_gateway.main import run

    run(_settings())


@app.command("query-api")
def query_api() -> None:
    """Run the query API and dashboard (FastAPI)."""
    from query_api.main import run

    run(_settings())


@app.command()
def processors(
    stages: Annotated[str, typer.Option(help=f"comma list of stages: {','.join(STAGES)} (default all)")] = ",".join(
        STAGES
    ),
) -> None:
    """Run the Faust stream processors (one worker process)."""
    from stream_processors.main import run

    run(_settings(), [s.strip() for s in stages.split(",") if s.strip()])


@keys_app.command("create")
def keys_create(
    tenant: Annotated[str, typer.Option(help="tenant the key belongs to")],
    scopes: Annotated[str, typer.Option(help="comma list of ingest,read,admin,keys")] = "ingest",
    name: Annotated[str, typer.Option(help="label for the key")] = "",
    as_json: Annotated[bool, typer.Option("--json", help='print {"id","key","tenant","scopes"}')] = False,
) -> None:
    """Create an API key; the secret is printed once and only its hash is stored."""
    from spendstream.keys import cli_create

    cli_create(_settings(), tenant=tenant, scopes=scopes, name=name, as_json=as_json)


@users_app.command("create")
def users_create(
    email: Annotated[str, typer.Option(help="the person's e-mail address (their login)")],
    org: Annotated[str, typer.Option(help="organisation (tenant) id; created when new")],
    role: Annotated[str, typer.Option(help="owner, admin, member or viewer")] = "owner",
    name: Annotated[str, typer.Option(help="display name (default: the e-mail's local part)")] = "",
    org_name: Annotated[str, typer.Option(help="name of a new organisation (default: its id)")] = "",
    password_stdin: Annotated[bool, typer.Option("--password-stdin", help="read the password from stdin")] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help='print {"user_id","email","org","role","created_user"}')
    ] = False,
) -> None:
    """Create a user (or take an existing one) and give them a role in an organisation (bootstrap)."""
    from spendstream.identity.bootstrap import cli_create

    password = sys.stdin.readline().rstrip("\n") if password_stdin else None
    if password is None and sys.stdin.isatty():
        password = typer.prompt("password (for a new account)", hide_input=True, default="", show_default=False)
    cli_create(_settings(), email, org, role, name, password or None, org_name, as_json)


@collectors_app.command("run")
def collectors_run(
    once: Annotated[bool, typer.Option("--once", help="run every provider's job now and exit")] = False,
) -> None:
    """Run the collectors on their schedules (OpenAI every 6 h at :10, Anthropic hourly at :05)."""
    import logging

    from spendstream.collectors.registry import PROVIDERS
    from spendstream.collectors.service import run_provider, run_service

    settings = _settings()
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not settings.secret_keys.get_secret_value():
        typer.echo("SPENDSTREAM_SECRET_KEYS is needed to open the stored admin keys", err=True)
        raise typer.Exit(2)
    if not once:
        run_service(settings)
        return
    runs = [r for provider in PROVIDERS for r in run_provider(settings, provider, trigger="manual")]
    for r in runs:
        typer.echo(f"{r['connection_id']} {r['dataset']}: {r['status']} {r['buckets']} buckets {r['error']}".rstrip())
    raise typer.Exit(1 if any(r["status"] == "error" for r in runs) else 0)


@collectors_app.command("backfill")
def collectors_backfill(
    connection: Annotated[str, typer.Option(help="connection id (GET /v1/provider-connections)")],
    days: Annotated[int, typer.Option(min=1, max=90, help="days back from now")] = 30,
    dataset: Annotated[str, typer.Option(help="usage, costs or all")] = "all",
) -> None:
    """Collect up to 90 days of a connection's reports now, with a progress bar."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from spendstream.clickhouse import get_client
    from spendstream.collectors.connections import load_open_connections
    from spendstream.collectors.registry import PROVIDERS
    from spendstream.collectors.runner import collect, options_from_settings
    from spendstream.collectors.service import keyring_of

    settings = _settings()
    client = get_client(settings)
    try:
        found, failed = load_open_connections(client, keyring_of(settings), ids=[connection])
        if not found:
            typer.echo(
                f"no live connection {connection!r}" + (" (its key cannot be opened)" if failed else ""), err=True
            )
            raise typer.Exit(2)
        conn = found[0]
        chosen = [d for d in PROVIDERS[conn.provider].datasets if dataset in ("all", d.kind)]
        if not chosen:
            typer.echo("dataset must be usage, costs or all", err=True)
            raise typer.Exit(2)
        errors = 0
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()) as bar:
            for d in chosen:
                task = bar.add_task(f"{conn.provider} {d.kind}", total=None)
                run = collect(
                    client,
                    conn,
                    d,
                    options_from_settings(settings),
                    trigger="backfill",
                    backfill_days=days,
                    progress=lambda done, total, task=task: bar.update(task, completed=done, total=total),
                )
                bar.update(task, description=f"{conn.provider} {d.kind}: {run['status']} {run['rows']} rows")
                if run["status"] != "ok":
                    errors += 1
                    bar.console.print(f"[red]{d.kind}: {run['error']}[/red]")
        raise typer.Exit(1 if errors else 0)
    finally:
        client.close()


@app.command()
def simulate(
    rate: Annotated[float, typer.Option(help="target events/s (0 = as fast as possible)")] = 200.0,
    duration: Annotated[float, typer.Option(help="seconds to run (0 = until --events)")] = 0.0,
    events: Annotated[int, typer.Option(help="events to send (0 = until --duration)")] = 0,
    batch: Annotated[int, typer.Option(help="events per request (1 = single posts)")] = 50,
    tenants: Annotated[int, typer.Option(help="number of tenants (one API key each, see --api-key)")] = 1,
    projects: int = 3,
    agents: int = 10,
    users: int = 20,
    runaway: Annotated[bool, typer.Option(help="one agent sends half of all traffic")] = False,
    record: Annotated[
        str | None, typer.Option(help="append every acknowledged event here (NDJSON), the truth of the run")
    ] = None,
    gateway_url: Annotated[str | None, typer.Option(envvar="SPENDSTREAM_GATEWAY_URL")] = None,
    api_key: Annotated[
        str | None, typer.Option(envvar="SPENDSTREAM_API_KEY", help="API key; comma-separate one per tenant")
    ] = None,
    progress: Annotated[bool, typer.Option(help="live progress bar")] = True,
    seed: Annotated[int, typer.Option(help="random seed of the fleet")] = 7,
    burst_every: Annotated[
        float, typer.Option(help="every this many seconds, 2 s at 4x the rate (0 = no bursts)")
    ] = 0.0,
) -> None:
    """Send realistic fleet traffic to the gateway, with a live progress bar."""
    from spendstream.simulate import run_cli

    sys.exit(
        run_cli(
            rate=rate,
            duration=duration,
            events=events,
            batch=batch,
            tenants=tenants,
            projects=projects,
            agents=agents,
            users=users,
            runaway=runaway,
            record=record,
            gateway_url=gateway_url,
            api_key=api_key,
            progress=progress,
            seed=seed,
            burst_every=burst_every,
        )
    )


if __name__ == "__main__":
    app()

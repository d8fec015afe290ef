"""The services and the machine: services up/status/down, doctor, setup."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence

import click

from ..report import console, err_console
from ..services import SERVICE_NAMES
from .base import (
    EXIT_FAIL,
    main,
)


@main.group()
def services() -> None:
    """Keep a warm set of services for faster runs (up, status, down)."""


@services.command("up")
@click.argument("names", nargs=-1, type=click.Choice(SERVICE_NAMES))
@click.option("--backend", type=click.Choice(["auto", "local", "docker"]), default=None)
def services_up(names: Sequence[str], backend: str | None) -> None:
    """Start NAMES (default: all four) and leave them running for later runs."""
    from ..services.manager import ServiceSet, resolve_backend_name

    warm = ServiceSet.warm_set(resolve_backend_name(backend))
    for name in names or SERVICE_NAMES:
        with err_console.status(f"starting {name}…"):
            endpoint = warm.ensure([name])[name]
        console.print(f"[green]✓[/] {name:<9} {endpoint.host}:{endpoint.port} "
                      f"({endpoint.backend})")


@services.command("status")
@click.option("--json", "as_json", is_flag=True)
def services_status(as_json: bool) -> None:
    """Show the warm services and whether they answer."""
    from ..services.manager import leftovers, make_backend, read_state, read_state_backend

    rows = []
    for state in leftovers():
        backend = make_backend(read_state_backend(state), tied_to_parent=False)
        for name, ep in read_state(state).items():
            kind = "warm" if state.name.startswith("warm-") else "left by a crashed run"
            rows.append({"service": name, "backend": ep.backend, "host": ep.host,
                         "port": ep.port, "alive": backend.alive(ep), "kind": kind})
    if as_json:
        click.echo(json.dumps({"version": 1, "services": rows}, indent=2))
        return
    if not rows:
        console.print("no warm services (start them with: labrunner services up)")
    for row in rows:
        status = "[green]up[/]" if row["alive"] else "[red]down[/]"
        console.print(f"{row['service']:<9} {row['host']}:{row['port']:<6} "
                      f"{row['backend']:<7} {status} [dim]{row['kind']}[/]")


@services.command("down")
def services_down() -> None:
    """Stop the warm services and anything a crashed run left behind."""
    from ..services.manager import clean_leftovers

    stopped = clean_leftovers()
    console.print(f"stopped {len(stopped)} service(s)" +
                  (f": {', '.join(stopped)}" if stopped else ""))


@main.command()
@click.option("--json", "as_json", is_flag=True)
def doctor(as_json: bool) -> None:
    """What was found (with versions), what is missing and the command that installs it."""
    from ..doctor import checks

    found = checks()
    if as_json:
        click.echo(json.dumps([c.__dict__ for c in found], indent=2))
    else:
        for check in found:
            sign = "[green]✓[/]" if check.ok else "[red]✗[/]"
            console.print(f"{sign} {check.name:<18} {check.detail}")
            if check.remedy:
                console.print(f"   [yellow]fix:[/] {check.remedy}")
        not_ready = [c.name for c in found if not c.ok]
        console.print("[green]everything ready[/]" if not not_ready
                      else f"[red]not ready:[/] {', '.join(not_ready)}")
    sys.exit(0 if all(c.ok for c in found) else EXIT_FAIL)


@main.command()
@click.option("--kafka/--no-kafka", default=True, help="Fetch the Kafka broker jars (Maven).")
def setup(kafka: bool) -> None:
    """Fetch what the local backend needs once (the Kafka 4.3.1 jars through Maven)."""
    if kafka:
        from ..services.kinds import kafka as local_kafka

        with err_console.status(f"fetching Kafka {local_kafka.KAFKA_VERSION} jars via Maven…"):
            libs = local_kafka.fetch_jars()
        console.print(f"[green]✓[/] Kafka jars in {libs}")

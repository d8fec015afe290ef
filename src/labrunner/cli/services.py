"""The services and the machine: services up/status/down, doctor, setup."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path

import click

from ..errors import LabrunnerError
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
@click.option("--workspace", "workspace_dir", type=click.Path(path_type=Path),
              help="Whose set (default: the workspace here or above, else this checkout).")
def services_up(names: Sequence[str], backend: str | None,
                workspace_dir: Path | None) -> None:
    """Start NAMES (default: all) at once for this workspace and keep them running (no
    idle deadline) until 'labrunner services down'."""
    from ..services.manager import resolve_backend_name
    from ..services.warm_admin import pin_warm_set
    from ..session import warm_owner

    owner = warm_owner(workspace_dir)
    wanted = list(names or SERVICE_NAMES)
    service_set, startup = pin_warm_set(
        resolve_backend_name(backend), owner, wanted,
        on_start=lambda n: err_console.print(f"[dim]starting {n}…[/]"))
    for name in wanted:
        if name in startup.errors:
            console.print(f"[red]✗[/] {name:<9} {startup.errors[name]}")
            continue
        endpoint = service_set.endpoints[name]
        took = (f"started in {startup.durations[name]:.1f} s" if name in startup.durations
                else "already up")
        console.print(f"[green]✓[/] {name:<9} {endpoint.host}:{endpoint.port} "
                      f"({endpoint.backend}, {took})")
    console.print(f"[dim]kept for {owner} until: labrunner services down[/]")
    if startup.errors:
        sys.exit(EXIT_FAIL)


@services.command("status")
@click.option("--json", "as_json", is_flag=True)
def services_status(as_json: bool) -> None:
    """Show the warm services: whose, whether they answer, until when they stay warm."""
    import time

    from ..services.warm import expire_due
    from ..services.warm_admin import status_rows

    expire_due()
    rows = status_rows()
    if as_json:
        click.echo(json.dumps({"version": 2, "services": rows}, indent=2))
        return
    if not rows:
        console.print("no warm services (a run keeps what it starts for a while; "
                      "'labrunner services up' keeps them until 'services down')")
    for row in rows:
        status = "[green]up[/]" if row["alive"] else "[red]down[/]"
        if row["pinned"]:
            until = "until services down"
        elif row["idle_deadline"] is not None:
            stamp = time.strftime("%H:%M:%S", time.localtime(row["idle_deadline"]))
            until = f"idle deadline {stamp} (in {row['idle_left']:.0f} s)"
        else:
            until = ""
        used = f", in use by run {', '.join(map(str, row['users']))}" if row["users"] else ""
        console.print(f"{row['service']:<9} {row['host']}:{row['port']:<6} "
                      f"{row['backend']:<7} {status} [dim]{row['kind']}"
                      f"{' of ' + row['owner'] if row['owner'] else ''} {until}{used}[/]")


@services.command("down")
def services_down() -> None:
    """Stop the warm services and anything a crashed run left behind; a set a live run
    uses is kept (and said so)."""
    from ..services.manager import clean

    report = clean()
    console.print(f"stopped {len(report.stopped)} service(s)" +
                  (f": {', '.join(report.stopped)}" if report.stopped else ""))
    if report.cleared:
        console.print(f"[dim]cleared the records of {len(report.cleared)} service(s) that "
                      f"had already stopped: {', '.join(report.cleared)}[/]")
    for why in report.kept:
        console.print(f"[yellow]kept[/] {why}")


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
        # Once, and again only when the jars or the JVM change: the broker then starts
        # from an AppCDS archive (a JVM start without it still works, only slower).
        with err_console.status("making the Kafka broker's AppCDS archive…"):
            try:
                archive = local_kafka.build_cds_archive()
            except LabrunnerError as exc:
                archive = None
                err_console.print(f"[yellow]no AppCDS archive:[/] {exc}")
        if archive is not None:
            console.print(f"[green]✓[/] Kafka AppCDS archive {archive}")

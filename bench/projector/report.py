"""What the projector bench prints and writes: the figures, their ratios, the tables."""

from __future__ import annotations

import sys
from typing import Any

from rich.console import Console
from rich.table import Table

from bench.projector.run import Run
from bench.reconciler import (
    machine_table,
)

TARGET = 0.80
"""The projector applies at least 80% of the raw batched-upsert rate."""


console = Console(width=None if sys.stdout.isatty() else 120)


def projector_figures(run: Run, events: int, batch_size: int) -> dict[str, Any]:
    m = run.metrics
    batches = m.get("kessai_projector_batch_seconds_count", 0.0)
    return {
        "seconds": round(run.seconds, 3),
        "startup_seconds": round(run.startup_seconds, 3),
        "apply_seconds": round(run.apply_seconds, 3),
        "applied_in_window": run.applied_in_window,
        "cpu_seconds": round(run.cpu_seconds, 2),
        "apply_cpu_seconds": round(run.apply_cpu_seconds, 2),
        "peak_rss_mib": run.peak_rss_mib,
        "batches": int(batches),
        "mean_batch_records": round(events / batches, 1) if batches else None,
        "batch_transaction_seconds": round(m.get("kessai_projector_batch_seconds_sum", 0.0), 2),
        "applied": int(m.get("kessai_projector_events_applied_total", 0)),
        "duplicates": int(m.get("kessai_projector_duplicates_total", 0)),
        "parked": int(m.get("kessai_projector_parked_total", 0)),
        "dead_letters": int(m.get("kessai_projector_dead_letters_total", 0)),
        "batch_size_setting": batch_size,
    }


def figures(report: dict[str, Any], run: Run, events: int) -> list[dict[str, Any]]:
    before, after = report["baseline_before"], report["baseline_after"]
    rates = [events / b["seconds"] for b in (before, after)]
    mean_rate = sum(rates) / len(rates)
    report["baseline_events_per_second"] = round(mean_rate)

    def row(
        name: str,
        seconds: float,
        count: int,
        cpu: float,
        server: float | None,
        rss: float | None,
    ) -> dict[str, Any]:
        # None when nothing was applied after the first batch seen (a run of one batch).
        rate = count / seconds if count and seconds > 0 else None
        return {
            "name": name,
            "seconds": round(seconds, 3),
            "events": count,
            "events_per_second": None if rate is None else round(rate),
            "ratio": None if rate is None else round(rate / mean_rate, 3),
            "cpu_seconds": round(cpu, 2),
            "server_cpu_seconds": None if server is None else round(server, 2),
            "peak_rss_mib": rss,
        }

    figures = [
        row("raw batched upserts (before)", before["seconds"], events,
            before["client_cpu_seconds"], before["server_cpu_seconds"], None),
        row("projector, first batch to last", run.apply_seconds, run.applied_in_window,
            run.apply_cpu_seconds, run.apply_server_cpu_seconds, run.peak_rss_mib),
        row("projector, from process start", run.seconds, events, run.cpu_seconds,
            run.server_cpu_seconds, run.peak_rss_mib),
        row("raw batched upserts (after)", after["seconds"], events,
            after["client_cpu_seconds"], after["server_cpu_seconds"], None),
    ]  # fmt: skip
    report["ratio"] = figures[1]["ratio"]
    report["ratio_from_start"] = figures[2]["ratio"]
    report["target_met"] = None if report["ratio"] is None else report["ratio"] >= TARGET
    return figures


def show(report: dict[str, Any]) -> None:
    m, s, d = report["machine"], report["settings"], report["data"]
    about = machine_table(m)
    about.add_row(
        "data",
        f"{d['events']:,} events ({d['payments']:,} payments, {d['refunds']:,} refunds, "
        f"{d['merchants']:,} merchants, {s['days']} days) on {s['partitions']} partitions",
    )
    pre = report["preload"]
    about.add_row(
        "preload",
        f"built in {pre['build_seconds']} s, published in {pre['publish_seconds']} s "
        f"({pre['publish_events_per_second']:,}/s); broker peak RSS "
        f"{report['broker_peak_rss_mib']} MiB",
    )
    p = report["projector"]
    about.add_row(
        "projector",
        f"batch size {s['batch_size']}: {p['batches']:,} batches, {p['mean_batch_records']} "
        f"records each on average, {p['batch_transaction_seconds']} s in batch transactions; "
        f"started in {p['startup_seconds']:.2f} s",
    )
    console.print(about)
    table = Table(title=f"projector over {d['events']:,} preloaded events")
    for column in (
        "what", "seconds", "events", "events/s", "of baseline rate", "CPU s", "mysqld CPU s",
        "peak RSS MiB",
    ):  # fmt: skip
        table.add_column(column, justify="left" if column == "what" else "right")
    for f in report["figures"]:
        table.add_row(
            f["name"],
            f"{f['seconds']:.2f}",
            f"{f['events']:,}",
            "-" if f["events_per_second"] is None else f"{f['events_per_second']:,}",
            "-" if f["ratio"] is None else f"{f['ratio']:.2f}",
            f"{f['cpu_seconds']:.1f}",
            "-" if f["server_cpu_seconds"] is None else f"{f['server_cpu_seconds']:.1f}",
            "-" if f["peak_rss_mib"] is None else f"{f['peak_rss_mib']:.0f}",
        )
    console.print(table)
    console.print(
        "CPU s: the projector process's, or this process's for the raw upserts (the driver "
        "building the statements)."
        + (
            " SQLite runs inside those processes: its work is in their CPU; no server CPU."
            if str(m["database"]).startswith("SQLite")
            else ""
        )
    )
    targets = Table(title="the projector against the target")
    for column in ("figure", "measured", "target", "met"):
        targets.add_column(column)
    ratio, met = report["ratio"], report["target_met"]
    targets.add_row(
        "events/s, projector / raw batched upserts",
        ("- (one batch: no rate)" if ratio is None else f"{ratio:.2f}")
        + f" ({report['ratio_from_start']:.2f} from process start)",
        f">= {TARGET:.2f}",
        "-" if met is None else "[green]yes[/green]" if met else "[red]no[/red]",
    )
    targets.add_row(
        "peak RSS of the projector process", f"{p['peak_rss_mib']} MiB", "(no target)", ""
    )
    check = report["check"]
    targets.add_row(
        "read side equals what the events imply",
        "yes" if check["passed"] else "no",
        "yes",
        "[green]yes[/green]" if check["passed"] else "[red]no[/red]",
    )
    console.print(targets)

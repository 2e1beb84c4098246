"""``python -m bench.projector``: prepare, publish, measure, check, report, clean up."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Annotated, Any

import orjson
import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from bench.projector.baseline import (
    UpsertBatch,
    differences,
    new_read_database,
    raw_upserts,
    read_side,
    row_differences,
    upsert_batches,
)
from bench.projector.dataset import Expected, Prepared, prepare
from bench.projector.report import TARGET, console, figures, projector_figures, show
from bench.projector.run import Run, run_projector
from bench.projector.topic import create_topic, publish
from bench.reconciler import (
    DEFAULT_DB_URL,
    Shape,
    merchant_zones,
)
from bench.serving import memory_kib
from bench.stores import Stores, temporary_home
from kessai.broker import EmbeddedBroker, free_port, log_ends
from kessai.settings import Settings

# -- the command -------------------------------------------------------------------------------


def main(
    events: Annotated[int, typer.Option(min=1, help="Events preloaded on the topic.")] = 1_000_000,
    db_url: Annotated[
        str,
        typer.Option(
            help="Server URL (no database; the bench creates its databases), or 'sqlite' (or "
            "sqlite:///DIR) for the embedded default: SQLite files in a temporary directory."
        ),
    ] = DEFAULT_DB_URL,
    json_path: Annotated[
        Path | None, typer.Option("--json", help="Write the figures here as JSON.")
    ] = None,
    batch_size: Annotated[
        int | None,
        typer.Option(min=1, help="KESSAI_PROJECTOR_BATCH_SIZE, also the baseline's batch."),
    ] = None,
    partitions: Annotated[
        int | None, typer.Option(min=1, help="Topic partitions (default: the setting).")
    ] = None,
    days: Annotated[int, typer.Option(min=1, help="Days the payments are spread over.")] = 30,
    seed: Annotated[int, typer.Option(help="Seed of the data set.")] = 7,
    timeout: Annotated[
        float, typer.Option(min=1, help="Longest the projector may take, in seconds.")
    ] = 3600.0,
    profile: Annotated[
        Path | None,
        typer.Option(help="py-spy output for the projector (.svg, .json, or collapsed stacks)."),
    ] = None,
) -> None:
    """Benchmark the projector on a preloaded topic against raw batched upserts of its rows."""
    options = Options(**locals())  # every parameter, by name
    handlers = {s: signal.signal(s, _interrupt) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        measure(options)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


@dataclass(frozen=True, slots=True)
class Options:
    """The command line's choices (see ``main``)."""

    events: int
    db_url: str
    json_path: Path | None
    batch_size: int | None
    partitions: int | None
    days: int
    seed: int
    timeout: float
    profile: Path | None


def measure(o: Options) -> None:
    """Preload, baseline, projector, check, baseline again, report; clean up whatever happens."""
    settings = Settings()
    name = f"kessai_bench_{uuid.uuid4().hex[:10]}"
    shape = Shape(events=o.events, seed=o.seed, days=o.days)
    home = temporary_home(o.db_url, "kessai-bench-projector-")
    stores = Stores(o.db_url, home)
    bench = Bench(
        options=o,
        settings=settings,
        name=name,
        home=home,
        stores=stores,
        zones=merchant_zones(shape),
        batch_size=o.batch_size or settings.projector_batch_size,
        partitions=o.partitions or settings.topic_partitions,
        mysqld=stores.server_pid(),
    )
    report = bench.report
    broker = EmbeddedBroker(free_port(), log_path=home / "broker.log")
    try:
        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=True,
        ) as progress:
            broker.start()
            prepared = bench.preload(broker, shape, progress)
            batches = upsert_batches(prepared.effects, bench.batch_size)
            prepared.effects = []
            report["baseline_before"] = bench.baseline(
                "baseline (before)", "b1", batches, prepared.expected, progress
            )
            run = bench.project(broker, progress)
            report["broker_peak_rss_mib"] = _mib(memory_kib(_pid(broker), "VmHWM"))
            broker.stop()
            bench.check(prepared.expected, progress)
            # The last baseline runs with no other database of this run left on the server,
            # as the first did.
            stores.drop(f"{name}_r")
            stores.drop(f"{name}_b1")
            report["baseline_after"] = bench.baseline(
                "baseline (after)", "b2", batches, prepared.expected, progress
            )
        report["projector"] = projector_figures(run, o.events, bench.batch_size)
        report["figures"] = figures(report, run, o.events)
        report["machine"]["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
        show(report)
        if o.json_path is not None:
            o.json_path.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
            console.print(f"figures written to {o.json_path}")
    finally:
        broker.stop()
        for db in bench.created:
            with contextlib.suppress(Exception):
                stores.drop(db)
        shutil.rmtree(home, ignore_errors=True)


@dataclass(slots=True)
class Bench:
    """One run's databases and choices; each step adds its figures to ``report``."""

    options: Options
    settings: Settings
    name: str
    home: Path
    stores: Stores
    zones: dict[str, str]
    batch_size: int
    partitions: int
    mysqld: int | None
    created: list[str] = field(default_factory=list)
    report: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        o = self.options
        self.report.update(
            {
                "machine": self.stores.machine(),
                "settings": {
                    "events": o.events,
                    "batch_size": self.batch_size,
                    "partitions": self.partitions,
                    "days": o.days,
                    "seed": o.seed,
                    "default_merchant_time_zone": self.settings.default_merchant_time_zone,
                },
                "target": TARGET,
                "databases": [f"{self.name}_{suffix}" for suffix in ("b1", "r", "b2")],
                "directory": str(self.home),
            }
        )

    def preload(self, broker: EmbeddedBroker, shape: Shape, progress: Progress) -> Prepared:
        """Create the topic, build the events and publish them; the topic must then hold
        exactly ``events`` records."""
        events, topic, partitions = self.options.events, self.settings.topic, self.partitions
        asyncio.run(create_topic(broker.bootstrap, topic, partitions))
        started = time.perf_counter()
        zone = self.settings.default_merchant_time_zone
        prepared = prepare(shape, partitions, zone, progress)
        build_seconds = time.perf_counter() - started
        started = time.perf_counter()
        asyncio.run(publish(broker.bootstrap, topic, prepared.records, progress))
        publish_seconds = time.perf_counter() - started
        ends = asyncio.run(log_ends(broker.bootstrap, topic, partitions))
        if sum(ends.values()) != events:
            raise RuntimeError(f"the topic holds {sum(ends.values()):,} records, not {events:,}")
        prepared.records = []  # on the broker now
        self.report["data"] = {
            "events": events,
            "payments": prepared.payments,
            "refunds": prepared.expected.refunds,
            "merchants": prepared.merchants,
            "records_per_partition": [ends[p] for p in sorted(ends)],
            "expected": prepared.expected.as_dict(),
        }
        self.report["preload"] = {
            "build_seconds": round(build_seconds, 2),
            "publish_seconds": round(publish_seconds, 2),
            "publish_events_per_second": round(events / publish_seconds),
            "broker_rss_mib": _mib(memory_kib(_pid(broker), "VmRSS")),
        }
        console.print(
            f"built {events:,} events in {build_seconds:.1f} s, published them in "
            f"{publish_seconds:.1f} s ({events / publish_seconds:,.0f}/s)"
        )
        return prepared

    def baseline(
        self,
        label: str,
        suffix: str,
        batches: list[UpsertBatch],
        expected: Expected,
        progress: Progress,
    ) -> dict[str, Any]:
        """The raw batched upserts into a new read database, checked against the events."""
        task = progress.add_task(label, total=None)
        try:
            database = f"{self.name}_{suffix}"
            new_read_database(self.stores, database, self.zones, self.created)
            measured = raw_upserts(self.stores, database, batches, self.mysqld)
            wrong = differences(read_side(self.stores, database), expected)
            if wrong:
                raise RuntimeError(f"{label}: the raw upserts are wrong: {wrong}")
            return measured
        finally:
            progress.remove_task(task)

    def project(self, broker: EmbeddedBroker, progress: Progress) -> Run:
        """The real projector into a new read database, until it has applied every event."""
        read_db = f"{self.name}_r"
        read_url = new_read_database(self.stores, read_db, self.zones, self.created)
        metrics_port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("KESSAI_")}
        env.update(
            {
                "KESSAI_HOME": str(self.home),
                "KESSAI_READ_DB_URL": read_url,
                "KESSAI_KAFKA_BOOTSTRAP": broker.bootstrap,
                "KESSAI_TOPIC": self.settings.topic,
                "KESSAI_TOPIC_PARTITIONS": str(self.partitions),
                "KESSAI_PROJECTOR_BATCH_SIZE": str(self.batch_size),
                "KESSAI_PROJECTOR_GROUP_ID": f"{self.name}-projector",
                "KESSAI_PROJECTOR_METRICS_PORT": str(metrics_port),
                "KESSAI_DEFAULT_MERCHANT_TIME_ZONE": self.settings.default_merchant_time_zone,
                "KESSAI_LOG_LEVEL": "WARNING",
            }
        )
        return run_projector(
            env=env,
            stores=self.stores,
            database=read_db,
            topic=self.settings.topic,
            total=self.options.events,
            metrics_port=metrics_port,
            mysqld=self.mysqld,
            timeout=self.options.timeout,
            profile=self.options.profile,
            log=self.home / "projector.log",
            progress=progress,
        )

    def check(self, expected: Expected, progress: Progress) -> None:
        """The projector's read database holds what the events imply, row for row the first
        baseline's; raises otherwise."""
        read_db = f"{self.name}_r"
        task = progress.add_task("checking the read database", total=None)
        found = read_side(self.stores, read_db)
        wrong = differences(found, expected)
        rows = row_differences(self.stores, read_db, f"{self.name}_b1")
        progress.remove_task(task)
        self.report["check"] = {
            "found": found,
            "differences": wrong,
            "rows_differing_from_baseline": rows,
            "passed": not wrong and not any(rows.values()),
        }
        if wrong or any(rows.values()):
            raise RuntimeError(
                f"the projector's read database is wrong: {wrong}; rows that differ from "
                f"the raw upserts': {rows}"
            )


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _pid(broker: EmbeddedBroker) -> int:
    assert broker.process is not None
    return broker.process.pid


def _mib(kib: int | None) -> float | None:
    return None if kib is None else round(kib / 1024, 1)


def cli() -> None:
    typer.run(main)

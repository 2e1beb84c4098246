"""The whole benchmark suite in one command: ``python -m bench`` (``make bench``).

``python -m bench [--size quick|full] [--db-url URL | --db-url sqlite] [--out DIR]
[--only writes --only queries ...]``

``ratelimit`` needs Redis at 127.0.0.1:6379 (``make services``), also with ``--db-url sqlite``.

Runs each benchmark of ``bench/`` in its own process, one after the other (they would
otherwise measure each other), each writing its JSON into ``--out``; then prints one table of
the headline figures against the targets and writes them to ``DIR/suite.json``. Every figure
is a ratio to a baseline measured in the same run as well as an absolute number; each
benchmark prints its own full table as it goes. ``--size quick`` (a few minutes) checks that
everything runs; ``--size full`` gives the figures of ``docs/BENCHMARKS.md`` (about an hour
with the 1,000,000-row data sets; queries at 10,000,000 payments are a separate run, see there).

``--db-url sqlite`` runs every benchmark on the embedded default (SQLite files in a temporary
directory, under DIR with ``--db-url sqlite:///DIR``; the embedded broker), with baselines on
SQLite too (the stdlib ``sqlite3`` driver where the server path uses PyMySQL). Exit code 0 when
every benchmark ran and passed its own checks, 1 when one failed.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import orjson
import typer
from rich.console import Console
from rich.table import Table

from bench.reconciler import DEFAULT_DB_URL

console = Console(width=None if sys.stdout.isatty() else 120)

SIZES: dict[str, dict[str, list[str]]] = {
    "quick": {
        "writes": ["--seconds", "5", "--warmup", "1"],
        "projector": ["--events", "20000"],
        "queries": ["--payments", "20000", "--seconds", "2", "--warmup", "0.5"],
        "reconciler": ["--events", "20000"],
        "overload": ["--seconds", "5", "--capacity-seconds", "3", "--warmup", "1"],
        "ratelimit": ["--seconds", "5", "--warmup", "1"],
    },
    "full": {
        "writes": ["--seconds", "10", "--warmup", "2"],
        "projector": ["--events", "1000000"],
        "queries": ["--payments", "1000000"],
        "reconciler": ["--events", "1000000"],
        "overload": [],
        "ratelimit": [],
    },
}


Row = tuple[str, str, str, bool | None]
"""(figure, measured, target, met: None when the figure has no target)."""


def _get(data: Any, *path: str | int) -> Any:
    for step in path:
        if isinstance(data, dict) and isinstance(step, str):
            data = data.get(step)
        elif isinstance(data, list) and isinstance(step, int) and -len(data) <= step < len(data):
            data = data[step]
        else:
            return None
    return data


def _num(value: Any, fmt: str = ",.0f", unit: str = "") -> str:
    return "-" if value is None else f"{value:{fmt}}{unit}"


def writes_rows(r: dict[str, Any]) -> list[Row]:
    ratio = _get(r, "ratios", "kessai_vs_bare")
    p99 = _get(r, "kessai", "latency_ms", "p99")
    lag = _get(r, "kessai", "end_to_end", "lag_ms", "p99")
    rows: list[Row] = [
        (
            "writes: create-payment / bare FastAPI POST",
            f"{_num(ratio, '.2f')} ({_num(_get(r, 'kessai', 'ok_per_second'))}/s)",
            ">= 0.70",
            ratio is not None and ratio >= 0.70,
        ),
        (
            f"writes: p99 at {_get(r, 'settings', 'connections')} connections",
            _num(p99, ".1f", " ms"),
            "< 50 ms",
            p99 is not None and p99 < 50,
        ),
    ]
    if lag is not None or _get(r, "kessai", "end_to_end") is not None:
        rows.append(
            (
                "writes: end-to-end lag p99 (until the query API shows it)",
                _num(lag, ",.0f", " ms"),
                "< 1,000 ms",
                lag is not None and lag < 1000,
            )
        )
    peaks = [("command API", _get(r, "kessai", "memory", "peak_rss_mib_max"))]
    for name, memory in (_get(r, "kessai", "end_to_end", "memory") or {}).items():
        peaks.append((name, _get(memory, "peak_rss_mib_max")))
    for name, peak in peaks:
        rows.append(
            (
                f"peak RSS: {name}",
                _num(peak, ".0f", " MiB"),
                "< 200 MB",
                peak is not None and peak < 190.7,
            )
        )
    return rows


def projector_rows(r: dict[str, Any]) -> list[Row]:
    ratio = _get(r, "ratio")
    rss = _get(r, "projector", "peak_rss_mib")
    rate = _get(r, "figures", 1, "events_per_second")
    return [
        (
            "projector: applied events/s / raw batched upserts",
            f"{_num(ratio, '.2f')} ({_num(rate)}/s)",
            ">= 0.80",
            ratio is not None and ratio >= 0.80,
        ),
        (
            "peak RSS: projector",
            _num(rss, ".0f", " MiB"),
            "< 200 MB",
            rss is not None and rss < 190.7,
        ),
    ]


def queries_rows(r: dict[str, Any]) -> list[Row]:
    """The targets against the p99 at a stated rate (open loop); the saturation figures
    (closed loop over all connections: req/s against bare, p99) beside them, without target."""
    rows: list[Row] = []
    payments = _get(r, "data", "payments")
    connections = _get(r, "settings", "connections")
    runs = [run for run in _get(r, "runs") or [] if run.get("group") in ("summary", "list")]
    opened = [o for o in _get(r, "open_loop") or [] if o.get("group") in ("summary", "list")]
    for group, target in (("summary", 20.0), ("list", 30.0)):
        mine = [o for o in opened if o["group"] == group]
        worst = max(mine, key=lambda o: o["api"]["latency_ms"]["p99"], default=None)
        p99 = _get(worst, "api", "latency_ms", "p99")
        bare = _get(worst, "bare", "latency_ms", "p99")
        rows.append(
            (
                f"queries: {group} p99 at a stated rate, worst kind, {_num(payments)} payments",
                f"{_num(p99, '.1f', ' ms')} at {_num(_get(worst, 'rate'))}/s "
                f"({_get(worst, 'name')}; bare {_num(bare, '.1f', ' ms')})",
                f"< {target:g} ms (at 10,000,000)",
                None if p99 is None else p99 < target and bool(_get(worst, "sustained")),
            )
        )
        saturated = [run for run in runs if run["group"] == group]
        slowest = min(saturated, key=lambda run: run["per_second"], default=None)
        worst_p99 = max((run["latency_ms"]["p99"] for run in saturated), default=None)
        rows.append(
            (
                f"queries: {group} saturated ({connections} connections), slowest kind",
                f"{_num(_get(slowest, 'per_second'))}/s, "
                f"{_num(_get(slowest, 'rate_vs_bare'), '.2f')} x bare ({_get(slowest, 'name')}); "
                f"worst p99 {_num(worst_p99, '.1f', ' ms')}",
                "",
                None,
            )
        )
    rss = _get(r, "memory", "query_api", "peak_rss_mib_max")
    rows.append(
        (
            "peak RSS: query API",
            _num(rss, ".0f", " MiB"),
            "< 200 MB",
            rss is not None and rss < 190.7,
        )
    )
    return rows


def reconciler_rows(r: dict[str, Any]) -> list[Row]:
    figures = _get(r, "figures") or []
    incremental = next(
        (f for f in figures if str(f.get("name", "")).startswith("incremental")), None
    )
    seconds = _get(incremental, "seconds")
    events = _get(r, "data", "events") or _get(incremental, "events")
    return [
        (
            f"reconciler: incremental, {_num(events)} new events",
            f"{_num(seconds, '.1f', ' s')} "
            f"({_num(_get(incremental, 'ratio'), '.2f')} x reading them)",
            "< 30 s (at 1,000,000)",
            None if seconds is None else seconds < 30,
        )
    ]


def overload_rows(r: dict[str, Any]) -> list[Row]:
    factor = _get(r, "settings", "factor")
    p99 = _get(r, "shedding", "admitted_latency_ms", "p99")
    base_p99 = _get(r, "baseline", "admitted_latency_ms", "p99")
    timeouts = _get(r, "shedding", "client_timeouts")
    share = _get(r, "shedding", "refusals_with_retry_after")
    return [
        (
            f"overload: admitted p99 at {_num(factor, 'g')}x capacity, open loop",
            f"{_num(p99, ',.1f', ' ms')} (without shedding {_num(base_p99, ',.1f', ' ms')})",
            "< 100 ms",
            p99 is not None and p99 < 100,
        ),
        (
            "overload: client time-outs",
            f"{_num(timeouts)} (without shedding {_num(_get(r, 'baseline', 'client_timeouts'))})",
            "0",
            timeouts == 0,
        ),
        (
            "overload: refusals that are 503/429 with Retry-After",
            "-" if share is None else f"{share:.1%}",
            "all",
            share is None or share == 1.0,
        ),
        *proxied_rows(r),
    ]


def proxied_rows(r: dict[str, Any]) -> list[Row]:
    """With ``--proxy``: the same targets behind nginx."""
    if _get(r, "proxied") is None:
        return []
    p99 = _get(r, "proxied", "admitted_latency_ms", "p99")
    timeouts = _get(r, "proxied", "client_timeouts")
    share = _get(r, "proxied", "refusals_with_retry_after")
    return [
        (
            "overload behind nginx: admitted p99",
            f"{_num(p99, ',.1f', ' ms')} (capacity through nginx "
            f"{_num(_get(r, 'ratios', 'capacity_through_proxy'), '.2f')} x direct)",
            "< 100 ms",
            p99 is not None and p99 < 100,
        ),
        ("overload behind nginx: client time-outs", _num(timeouts), "0", timeouts == 0),
        (
            "overload behind nginx: refusals that are 503/429 with Retry-After",
            "-" if share is None else f"{share:.1%}",
            "all",
            share is None or share == 1.0,
        ),
    ]


def ratelimit_rows(r: dict[str, Any]) -> list[Row]:
    limit = _get(r, "settings", "limit_per_second")
    passed = _get(r, "limited", "passed_per_second")
    ratio = _get(r, "ratios", "passed_per_second_vs_limit")
    bound = _get(r, "ratios", "bound_vs_limit")
    share = _get(r, "limited", "limited_with_retry_after_and_remaining_0")
    vacuous = bool(_get(r, "ratios", "vacuous"))
    return [
        (
            f"rate limit: {_num(limit)}/s per key, {_get(r, 'settings', 'connections')} "
            "connections, let through",
            f"{_num(passed, ',.1f')}/s ({_num(ratio, '.3f')} x the limit; capacity without it "
            f"{_num(_get(r, 'unlimited', 'ok_per_second'))}/s)",
            f"<= {_num(bound, '.2f')} x (the window's slack)",
            None if ratio is None or bound is None or vacuous else ratio <= bound,
        ),
        (
            "rate limit: refusals that are 429 with Retry-After and Remaining 0",
            "-" if share is None else f"{share:.1%}",
            "all",
            share is None or share == 1.0,
        ),
    ]


HEADLINES: dict[str, Callable[[dict[str, Any]], list[Row]]] = {
    "writes": writes_rows,
    "projector": projector_rows,
    "queries": queries_rows,
    "reconciler": reconciler_rows,
    "overload": overload_rows,
    "ratelimit": ratelimit_rows,
}


def main(
    size: Annotated[
        str, typer.Option(help="quick (minutes) or full (the documented sizes).")
    ] = "quick",
    db_url: Annotated[
        str,
        typer.Option(help="Server URL (no database), or 'sqlite' for the embedded default."),
    ] = DEFAULT_DB_URL,
    out: Annotated[Path, typer.Option(help="Directory for the JSON of every benchmark.")] = Path(
        "bench-results"
    ),
    only: Annotated[
        list[str] | None, typer.Option(help="Run only these benchmarks (repeat).")
    ] = None,
) -> None:
    """Run every benchmark, then print the headline figures against the targets."""
    if size not in SIZES:
        raise typer.BadParameter(f"--size must be one of {', '.join(SIZES)}")
    names = [n for n in SIZES[size] if not only or n in only]
    sqlite = db_url == "sqlite" or db_url.startswith("sqlite")
    out.mkdir(parents=True, exist_ok=True)
    outcome: dict[str, Any] = {"size": size, "db_url": db_url, "benchmarks": {}}
    rows: list[Row] = []
    failed = False
    for name in names:
        path = out / f"{name}.json"
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        argv = [sys.executable, "-m", f"bench.{name}", *SIZES[size][name]]
        argv += ["--db-url", db_url, "--json", str(path)]
        console.rule(f"bench.{name}")
        started = time.perf_counter()
        code = subprocess.call(argv)
        seconds = round(time.perf_counter() - started, 1)
        if code != 0 or not path.exists():
            console.print(f"[red]{name} failed (exit code {code})[/red]")
            outcome["benchmarks"][name] = {
                "status": f"failed: exit code {code}",
                "seconds": seconds,
            }
            failed = True
            continue
        report = orjson.loads(path.read_bytes())
        mine = HEADLINES[name](report)
        rows += mine
        outcome["benchmarks"][name] = {
            "status": "ok",
            "seconds": seconds,
            "json": str(path),
            "headlines": [
                {"figure": f, "measured": m, "target": t, "met": ok} for f, m, t, ok in mine
            ],
        }
    table = Table(title=f"kessai benchmark suite ({size}, {'SQLite' if sqlite else db_url})")
    for column in ("figure", "measured", "target", "met"):
        table.add_column(column)
    for figure, measured, target, met in rows:
        table.add_row(
            figure,
            measured,
            target,
            "" if met is None else "[green]yes[/green]" if met else "[red]no[/red]",
        )
    console.print(table)
    (out / "suite.json").write_bytes(orjson.dumps(outcome, option=orjson.OPT_INDENT_2))
    console.print(f"figures written to {out}/")
    if failed:
        raise typer.Exit(1)


def cli() -> None:
    typer.run(main)


if __name__ == "__main__":
    cli()

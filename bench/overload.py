"""The command API driven at ten times what it can serve: shed, or queued until clients time out.

``python -m bench.overload [--factor 10] [--seconds 10] [--connections 512] [--workers 2]
[--timeout 10] [--pin 0:1] [--proxy [--proxy-max-in-flight 8] [--proxy-refund-in-flight 2]]
[--client python|wrk] [--users 10000] [--db-url mysql+pymysql://root@127.0.0.1:3306 |
--db-url sqlite] [--json out.json]``

1. Creates fresh databases, a ``payments:write`` key and a ``wallets:write`` key as
   ``bench/writes.py`` does. The payments of every run are balance payments by ``--users``
   payers: the first server served tops up every payer's wallet before its warm-up
   (``bench.drive.fund_payers``), so none is 402.
2. The baseline: serves the real command API (``kessai command-api --workers N``; rate limits
   out of the way) with shedding out of the way (``KESSAI_OVERLOAD_MAX_IN_FLIGHT=10000``) and
   measures its capacity: closed loop over ``--capacity-connections`` for
   ``--capacity-seconds`` after ``--warmup``, campaign traffic (``kessai loadgen``): answered
   2xx per second. Then drives it open loop at ``--factor`` times that capacity for
   ``--seconds`` over ``--connections`` keep-alive connections (``kessai_cli/loadgen.py``:
   latency counts from when a request was due). A client gives up on a request after
   ``--timeout`` seconds: an answer that late, or a request still unsent that long after it
   was due, is a client time-out.
3. Serves the same API on the same databases with its load-shedding settings as configured
   (``KESSAI_OVERLOAD_*`` of this process's environment, the defaults otherwise), warms it up
   and drives it with the same open loop at the same rate.
4. With ``--proxy``: nginx in front of the API (``bench/proxy.py``, the server block of
   ``deploy/nginx/command-api.conf.template``), on the server's CPUs. Its cost at normal load:
   on the baseline server, the same closed loop again through nginx with its bounds out of the
   way (capacity through the proxy against capacity direct). Its effect: the API with shedding
   as configured behind nginx bounding what it holds (``--proxy-max-in-flight`` requests,
   ``--proxy-refund-in-flight`` more for refunds), driven with the same open loop.
5. One open loop each, the baseline first, a minute apart: compare the columns of one
   run, never figures across runs (the machine is shared, and each run grows the database).
6. Reports for each: the admitted (2xx) requests' p50/p99, the refusals' (5xx and 429; other
   4xx are answers about the request, counted apart) p50/p99, client
   time-outs, the share of refusals that are 503 or 429 with ``Retry-After`` (a client can
   act on them), and payments committed whose 201 the client never saw (the write store's
   count against the 201s received); the ratios of the two, against the targets (admitted p99
   < 100 ms, no time-out, every refusal with Retry-After). Drops the databases.

Unpinned, client and server share the machine's cores: the client takes CPU from the server,
and at ten times the capacity it may not keep up itself; its CPU and the rate it actually sent
are reported so that shows. ``--pin SERVER:CLIENT`` (``taskset -c`` CPU lists, e.g. ``0:1``
with ``--workers 1`` on two cores) runs the server on the first CPUs and this process, the
client, on the others, so neither takes the other's CPU (the database server stays where it
is; nginx goes with the server). ``--client wrk`` sends the open loop with wrk instead of this
process (``bench/wrk_loop.py``, ``bench/overload.lua``): at ten times a core's capacity the
Python client on one core is the limit, wrk is not. The table and the JSON come from
``bench/overload_report.py``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import os
import signal
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import Progress, TaskID, TextColumn, TimeElapsedColumn

from bench.drive import fund_payers
from bench.openloop import open_loop
from bench.overload_report import TARGETS, ratios, show
from bench.proxy import UNBOUNDED as PROXY_UNBOUNDED
from bench.proxy import Proxy, nginx_binary, proxied
from bench.reconciler import DEFAULT_DB_URL
from bench.serving import Served, interrupt, served, served_env
from bench.stores import Stores, finish, prepare_stores, scalar_of, scratch, temporary_home
from bench.writes import console
from bench.wrk_loop import wrk_binary, wrk_open_loop
from kessai.auth import PAYMENTS_WRITE, WALLETS_WRITE
from kessai.broker import free_port
from kessai_cli import loadgen


class Client(enum.StrEnum):
    python = "python"
    wrk = "wrk"


UNBOUNDED = "10000"
"""``KESSAI_OVERLOAD_MAX_IN_FLIGHT`` of the baseline: a bound the run never reaches."""
COUNT_PAYMENTS = "SELECT COUNT(*) FROM events WHERE event_type = 'PaymentCaptured'"


@dataclasses.dataclass
class Bench:
    """What every phase of one run shares: the keys, the settings, where the servers run."""

    key: str
    wallets_key: str
    home: Path
    settings: dict[str, Any]
    server_cpus: str | None
    payments: Callable[[], int]
    progress: Progress
    task: TaskID
    funding: dict[str, Any] | None = None
    """What funding the payers' wallets did (the first server does it)."""

    def say(self, text: str) -> None:
        self.progress.update(self.task, description=text)

    @contextlib.contextmanager
    def api(self, label: str, env: dict[str, str]) -> Iterator[Served]:
        """The command API, pinned to the server's CPUs if asked, the payers' wallets funded
        (by the first one), warmed up."""
        port = free_port()
        argv = [sys.executable, "-m", "kessai_cli", "command-api", "--host", "127.0.0.1"]
        argv += ["--port", str(port), "--workers", str(self.settings["workers"])]
        if self.server_cpus is not None:
            argv = ["taskset", "-c", self.server_cpus, *argv]
        with served(argv, env, port, self.home / f"{label}.log") as api:
            if self.funding is None:
                self.say(f"{label}: funding the payers' wallets")
                payers = loadgen.payers(loadgen.Mix(users=self.settings["users"]))
                self.funding = fund_payers(api.url, self.wallets_key, payers)
            if self.settings["warmup_seconds"] > 0:
                self.say(f"{label}: warming up")
                self.closed_loop(
                    api.url, self.settings["warmup_seconds"], self.settings["seed"] + 1
                )
            yield api

    def proxy(
        self, upstream: Served, max_in_flight: int, refund_in_flight: int
    ) -> contextlib.AbstractContextManager[Proxy]:
        """nginx in front of ``upstream``, on the server's CPUs."""
        return proxied(
            self.home,
            listen_port=free_port(),
            upstream_port=upstream.port,
            max_in_flight=max_in_flight,
            refund_in_flight=refund_in_flight,
            cpus=self.server_cpus,
        )

    def closed_loop(self, url: str, seconds: float, seed: int) -> loadgen.Result:
        plan = loadgen.Run(
            url, self.key, connections=self.settings["capacity_connections"], duration=seconds
        )
        return loadgen.run_sync(plan, loadgen.Mix(seed=seed, users=self.settings["users"]))

    def capacity(self, url: str) -> dict[str, Any]:
        """2xx answers per second, closed loop."""
        closed = self.closed_loop(url, self.settings["capacity_seconds"], self.settings["seed"] + 2)
        ok = sum(v for k, v in closed.by_status.items() if 200 <= k < 300)
        return {
            "ok_per_second": round(ok / closed.elapsed, 1),
            "latency_ms": closed.summary()["latency_ms"],
            "by_status": {str(k): v for k, v in closed.by_status.items()},
        }

    def flood(self, label: str, url: str, rate: float, cpu: Callable[[], float]) -> dict[str, Any]:
        """The open loop at ``rate``; ``cpu`` is the server side's CPU seconds so far."""
        s = self.settings
        self.say(f"{label}: open loop at {rate:,.0f}/s for {s['seconds']:g} s")
        before, cpu_before = self.payments(), cpu()
        if s["client"] == "wrk":
            figures, seen = wrk_open_loop(
                url,
                self.key,
                rate,
                s["seconds"],
                s["connections"],
                s["timeout_seconds"],
                users=s["users"],
            )
        else:
            figures, seen = open_loop(
                url,
                self.key,
                rate,
                s["seconds"],
                s["connections"],
                s["timeout_seconds"],
                s["seed"],
                users=s["users"],
            )
        figures["server_cpu_seconds"] = round(cpu() - cpu_before, 2)
        figures["payments_committed_unseen"] = settled(self.payments) - before - seen
        return figures


def run_baseline(bench: Bench, env: dict[str, str], proxy: bool) -> tuple[dict[str, Any], float]:
    """Capacity closed loop (with ``proxy``, then through nginx with its bounds out of the way
    and direct again),
    then the open loop at ``factor`` times it, shedding out of the way: (figures, the rate)."""
    report: dict[str, Any] = {}
    with bench.api("baseline", {**env, "KESSAI_OVERLOAD_MAX_IN_FLIGHT": UNBOUNDED}) as api:
        # The baseline measures the capacity: with shedding on, a closed loop past the bound
        # would measure the bound instead.
        bench.say("capacity: closed loop")
        report["capacity"] = bench.capacity(api.url)
        if proxy:
            with bench.proxy(api, PROXY_UNBOUNDED, PROXY_UNBOUNDED) as nginx:
                bench.say("capacity through nginx: closed loop")
                report["capacity_through_proxy"] = bench.capacity(nginx.url)
            # Direct again: the proxy's cost is against both direct runs, not a drift of the
            # machine or the database between them.
            bench.say("capacity again, direct: closed loop")
            report["capacity_again"] = bench.capacity(api.url)
        rate = report["capacity"]["ok_per_second"] * bench.settings["factor"]
        report["baseline"] = bench.flood("baseline", api.url, rate, api.cpu)
    return report, rate


def run_proxied(bench: Bench, env: dict[str, str], rate: float) -> dict[str, Any]:
    """The API with shedding as configured, behind nginx with its bounds, at ``rate``."""
    s = bench.settings
    with (
        bench.api("proxied", env) as api,
        bench.proxy(api, s["proxy_max_in_flight"], s["proxy_refund_in_flight"]) as nginx,
    ):
        proxy_before = nginx.cpu()
        figures = bench.flood("proxied", nginx.url, rate, lambda: api.cpu() + nginx.cpu())
        figures["proxy_cpu_seconds"] = round(nginx.cpu() - proxy_before, 2)
    return figures


def main(
    factor: Annotated[float, typer.Option(min=1, help="Open-loop rate / capacity.")] = 10.0,
    seconds: Annotated[float, typer.Option(min=1, help="Open-loop seconds per run.")] = 10.0,
    connections: Annotated[int, typer.Option(min=1, help="Open-loop connections.")] = 512,
    capacity_seconds: Annotated[
        float, typer.Option(min=1, help="Closed-loop seconds measuring the capacity.")
    ] = 5.0,
    capacity_connections: Annotated[
        int, typer.Option(min=1, help="Closed-loop connections measuring the capacity.")
    ] = 64,
    warmup: Annotated[float, typer.Option(min=0, help="Unmeasured seconds first.")] = 2.0,
    timeout: Annotated[
        float, typer.Option(min=0.1, help="Seconds after which a client gives up.")
    ] = 10.0,
    workers: Annotated[int, typer.Option(min=1, help="uvicorn worker processes.")] = 2,
    db_url: Annotated[
        str,
        typer.Option(help="Server URL (no database), or 'sqlite' for the embedded default."),
    ] = DEFAULT_DB_URL,
    seed: Annotated[int, typer.Option(help="Seed of the request mix.")] = 1,
    pin: Annotated[
        str | None,
        typer.Option(
            help="SERVER:CLIENT CPU lists (taskset -c syntax), e.g. 0:1: the server on the "
            "first, this process (the client) on the second, so neither takes the other's CPU."
        ),
    ] = None,
    proxy: Annotated[
        bool, typer.Option(help="Also measure nginx in front of the API (deploy/nginx/).")
    ] = False,
    proxy_max_in_flight: Annotated[
        int, typer.Option(min=1, help="nginx: requests the API may hold (all but refunds).")
    ] = 8,
    proxy_refund_in_flight: Annotated[
        int, typer.Option(min=1, help="nginx: refunds the API may hold, on top.")
    ] = 2,
    client: Annotated[
        Client,
        typer.Option(
            help="The open loop's client: this process (python), or wrk (Debian's wrk, "
            "bench/overload.lua) when one Python core cannot offer the rate."
        ),
    ] = Client.python,
    users: Annotated[
        int, typer.Option(min=1, help="Payers of the traffic, their wallets funded first.")
    ] = loadgen.USERS,
    json_path: Annotated[
        Path | None, typer.Option("--json", help="Write the figures here as JSON.")
    ] = None,
) -> None:
    """Drive the command API at a multiple of its capacity, with shedding and without."""
    server_cpus, client_cpus = pinning(pin)  # a wrong --pin is refused before anything is made
    if proxy:
        nginx_binary()  # no nginx: said before anything is made
    if client is Client.wrk:
        wrk_binary()
    settings: dict[str, Any] = {
        "factor": factor,
        "seconds": seconds,
        "connections": connections,
        "capacity_seconds": capacity_seconds,
        "capacity_connections": capacity_connections,
        "warmup_seconds": warmup,
        "timeout_seconds": timeout,
        "workers": workers,
        "seed": seed,
        "pin": pin,
        "proxy": proxy,
        "proxy_max_in_flight": proxy_max_in_flight,
        "proxy_refund_in_flight": proxy_refund_in_flight,
        "client": client.value,
        "users": users,
    }
    run(settings, db_url, server_cpus, client_cpus, json_path)


def run(
    settings: dict[str, Any],
    db_url: str,
    server_cpus: str | None,
    client_cpus: set[int] | None,
    json_path: Path | None,
) -> None:
    """One run of the bench; the databases and files it made are gone when it returns."""
    signal.signal(signal.SIGTERM, interrupt)
    home = temporary_home(db_url, "kessai-bench-overload-")
    stores = Stores(db_url, home)
    report: dict[str, Any] = {
        "machine": stores.machine(),
        "settings": settings,
        "targets": TARGETS,
        "directory": str(home),
    }
    affinity = os.sched_getaffinity(0)
    with scratch(stores, home) as created:
        try:
            if client_cpus is not None:
                os.sched_setaffinity(0, client_cpus)
            measure(report, stores, created, server_cpus)
            report["ratios"] = ratios(report)
            finish(report, show, json_path, console)
        finally:
            os.sched_setaffinity(0, affinity)


def measure(
    report: dict[str, Any], stores: Stores, created: list[str], server_cpus: str | None
) -> None:
    """Every server of the run, one after the other, their figures into ``report``."""
    settings = report["settings"]
    name = f"kessai_bench_{uuid.uuid4().hex[:10]}"
    write_db, keys_db, read_db = f"{name}_w", f"{name}_k", f"{name}_r"
    key, wallets_key = prepare_stores(
        stores,
        (write_db, keys_db, read_db),
        created,
        "bench.overload",
        PAYMENTS_WRITE,
        WALLETS_WRITE,
    )
    env = served_env(stores.home, *(stores.url(db) for db in (write_db, keys_db, read_db)))
    shedding = {k: v for k, v in os.environ.items() if k.startswith("KESSAI_OVERLOAD_")}
    env.update(shedding)  # the settings under test, defaults otherwise
    settings["shedding_env"] = shedding
    with Progress(
        TextColumn("{task.description}"), TimeElapsedColumn(), console=console, transient=True
    ) as progress:
        bench = Bench(
            key=key,
            wallets_key=wallets_key,
            home=stores.home,
            settings=settings,
            server_cpus=server_cpus,
            payments=lambda: scalar_of(stores, write_db, COUNT_PAYMENTS),
            progress=progress,
            task=progress.add_task("serving the command API", total=None),
        )
        figures, rate = run_baseline(bench, env, settings["proxy"])
        report.update(figures)
        with bench.api("shedding", env) as api:
            report["shedding"] = bench.flood("shedding", api.url, rate, api.cpu)
        if settings["proxy"]:
            report["proxied"] = run_proxied(bench, env, rate)
        report["funding"] = bench.funding


def pinning(pin: str | None) -> tuple[str | None, set[int] | None]:
    """``--pin SERVER:CLIENT``: the server's CPU list as taskset takes it, the client's CPUs."""
    if pin is None:
        return None, None
    server, sep, client = pin.partition(":")
    if not sep or not server or not client:
        raise typer.BadParameter("give SERVER:CLIENT CPU lists, e.g. 0:1", param_hint="--pin")
    cpus: set[int] = set()
    try:
        for part in client.split(","):
            first, _, last = part.partition("-")
            cpus.update(range(int(first), int(last or first) + 1))
    except ValueError:
        raise typer.BadParameter(f"not a CPU list: {client}", param_hint="--pin") from None
    return server, cpus


def settled(count: Callable[[], int], within: float = 30.0) -> int:
    """``count()`` once it stopped changing: requests the server was still working on when
    the client stopped are committed meanwhile."""
    last, deadline = count(), time.monotonic() + within
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = count()
        if now == last:
            return now
        last = now
    return last


def cli() -> None:
    typer.run(main)


if __name__ == "__main__":
    cli()

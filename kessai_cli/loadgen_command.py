"""``kessai loadgen``: campaign traffic against a running command API, and what it answered."""

from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.live import Live
from rich.table import Table

from kessai.settings import Settings
from kessai_cli import loadgen as lg
from kessai_cli.screen import console

# The options that say where the traffic goes, with which keys, and how the payers are funded:
# their help is long, so they are named here and ``loadgen``'s signature stays readable.
UrlOption = Annotated[
    str | None,
    typer.Option(help="Command API base URL. Default: KESSAI_COMMAND_API_HOST and _PORT."),
]
ApiKeyOption = Annotated[
    str | None,
    typer.Option(
        "--api-key",
        help="A payments:write key. Default: `payments` in $KESSAI_HOME/dev-keys.json.",
    ),
]
WalletsKeyOption = Annotated[
    str | None,
    typer.Option(
        "--wallets-key",
        help="A wallets:write key, to fund the payers and send the top-ups. Default: the "
        "--api-key if given (a key may hold both scopes), else `wallets` in "
        "$KESSAI_HOME/dev-keys.json.",
    ),
]
FundAmountOption = Annotated[
    int,
    typer.Option(
        min=0,
        help="Top-up (JPY) of every payer's wallet before the traffic; 0: fund nobody "
        "(the wallets hold money already).",
    ),
]


def loadgen(
    url: UrlOption = None,
    api_key: ApiKeyOption = None,
    wallets_key: WalletsKeyOption = None,
    connections: Annotated[int, typer.Option(min=1, help="Concurrent connections.")] = 64,
    requests: Annotated[
        int | None, typer.Option(min=1, help="Stop after this many requests.")
    ] = None,
    duration: Annotated[
        float | None,
        typer.Option(min=0.1, help="Stop after this many seconds (default 10 without --requests)."),
    ] = None,
    rate: Annotated[
        float | None,
        typer.Option(
            min=0.1, help="Open loop: this many requests/s (default: as fast as possible)."
        ),
    ] = None,
    merchants: Annotated[
        int,
        typer.Option(min=1, help="Merchants shop-1 ... shop-N (Zipf; shop-1 takes --hot-share)."),
    ] = 1_000,
    hot_share: Annotated[float, typer.Option(min=0.0, max=1.0)] = 0.30,
    refund_share: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="Share of requests that are refunds.")
    ] = 0.03,
    retry_share: Annotated[
        float,
        typer.Option(min=0.0, max=1.0, help="Share of client retries (same key, same body)."),
    ] = 0.01,
    top_up_share: Annotated[
        float,
        typer.Option(min=0.0, max=1.0, help="Share of requests that top up a payer's wallet."),
    ] = 0.02,
    users: Annotated[
        int, typer.Option(min=1, help="Payers u0 ... uN-1 (one device id each), funded first.")
    ] = lg.USERS,
    fund_amount: FundAmountOption = 500_000,
    seed: Annotated[int, typer.Option(help="Seed of the request mix.")] = 1,
    json_path: Annotated[
        Path | None, typer.Option("--json", help="Write the summary here as JSON.")
    ] = None,
) -> None:
    """Fund the payers' wallets, then drive campaign traffic (balance payments, refunds,
    top-ups, client retries) against a running command API and print what it answered: counts
    by status, the payments refused for want of balance (402), accepted/s, latency
    percentiles."""
    settings = Settings()
    if url is None:
        url = f"http://{settings.command_api_host}:{settings.command_api_port}"
    if requests is None and duration is None:
        duration = 10.0
    payments_key = _api_key(settings, api_key)
    needs_wallets = fund_amount > 0 or top_up_share > 0
    plan = lg.Run(
        url=url,
        api_key=payments_key,
        connections=connections,
        requests=requests,
        duration=duration,
        rate=rate,
        wallets_key=_wallets_key(settings, wallets_key, api_key) if needs_wallets else None,
    )
    mix = lg.Mix(
        merchants=merchants,
        hot_share=hot_share,
        refund_share=refund_share,
        retry_share=retry_share,
        top_up_share=top_up_share,
        users=users,
        seed=seed,
    )
    _fund_drive_and_report(plan, mix, fund_amount, json_path)


def _fund_drive_and_report(
    plan: lg.Run, mix: lg.Mix, fund_amount: int, json_path: Path | None
) -> None:
    """Fund the payers (unless ``fund_amount`` is 0), drive the traffic, print the summary
    (and write it to ``json_path``); exit 1 on connection errors or without any answer."""
    console.print(_describe(plan))
    funding = _fund(plan, mix, fund_amount) if fund_amount > 0 else None
    result = _drive(plan, mix)
    summary = result.summary()
    if funding is not None:
        summary["funding"] = funding.summary()
    console.print(_summary_table(result, summary, funding))
    if json_path is not None:
        json_path.write_text(json.dumps(summary, indent=2) + "\n")
    if result.connection_errors or not result.latencies:
        raise typer.Exit(1)


def _describe(plan: lg.Run) -> str:
    limit = f"{plan.requests:,} requests" if plan.requests else ""
    if plan.duration:
        limit += (" or " if limit else "") + f"{plan.duration:g} s"
    pace = f", {plan.rate:g} requests/s" if plan.rate else ", closed loop"
    return f"{plan.url}: {plan.connections} connections, {limit}{pace}"


def _api_key(settings: Settings, given: str | None) -> str:
    """The key given, else the development ``payments`` key that ``kessai up`` wrote."""
    api_key = given
    if api_key is None:
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            api_key = str(json.loads((settings.home / "dev-keys.json").read_text())["payments"])
    if not api_key:
        console.print(
            "[red]no API key: give --api-key (payments:write), or run `kessai up` first "
            "(it writes $KESSAI_HOME/dev-keys.json)[/red]"
        )
        raise typer.Exit(2)
    return api_key


def _wallets_key(settings: Settings, given: str | None, api_key: str | None) -> str:
    """The wallets key given, else the ``--api-key`` given, else the development ``wallets``
    key that ``kessai up`` wrote."""
    key = given or api_key
    if key is None:
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            key = str(json.loads((settings.home / "dev-keys.json").read_text())["wallets"])
    if not key:
        console.print(
            "[red]no key to fund the payers' wallets: give --wallets-key (wallets:write), run "
            "`kessai up` first (it writes $KESSAI_HOME/dev-keys.json), or --fund-amount 0 "
            "--top-up-share 0[/red]"
        )
        raise typer.Exit(2)
    return key


def _fund(plan: lg.Run, mix: lg.Mix, amount: int) -> lg.Funding:
    """Top up every payer's wallet by ``amount`` before the traffic, or stop: payments from
    wallets nobody funded would all be 402."""
    assert plan.wallets_key is not None
    with console.status(f"funding {mix.users:,} wallets with {amount:,} JPY each"):
        try:
            funding = asyncio.run(
                lg.fund(
                    plan.url,
                    plan.wallets_key,
                    lg.payers(mix),
                    amount=amount,
                    connections=plan.connections,
                    request_timeout=plan.timeout,
                )
            )
        except ValueError as exc:
            console.print(f"[red]{exc}[/red]")
            raise typer.Exit(2) from None
    console.print(_funding_line(funding))
    if not funding.complete:
        failures = ", ".join(f"{code}: {n:,}" for code, n in funding.codes.most_common())
        console.print(
            f"[red]funding failed for {funding.users - funding.funded - funding.at_limit:,} "
            f"wallets ({failures or 'no answer'}; connection errors "
            f"{funding.connection_errors:,}): a 403 means the key lacks wallets:write "
            "(--wallets-key)[/red]"
        )
        raise typer.Exit(1)
    return funding


def _funding_line(funding: lg.Funding) -> str:
    line = (
        f"funded {funding.funded:,} of {funding.users:,} wallets with {funding.amount:,} JPY "
        f"each in {funding.elapsed:.1f} s"
    )
    if funding.to_limit:
        line += f"; {funding.to_limit:,} of them only up to their limit (KESSAI_WALLET_MAX_BALANCE)"
    if funding.at_limit:
        line += f"; {funding.at_limit:,} more already full"
    return line


def _drive(plan: lg.Run, mix: lg.Mix) -> lg.Result:
    """Run the traffic with a live line of counts on the screen."""
    with Live(console=console, refresh_per_second=4, transient=True) as live:

        def on_progress(result: lg.Result, elapsed: float) -> None:
            statuses = " ".join(f"{k}:{v}" for k, v in sorted(result.by_status.items()))
            live.update(
                f"{elapsed:6.1f} s  sent {result.sent:,}  accepted {result.accepted:,} "
                f"({result.accepted / elapsed if elapsed else 0:,.0f}/s)  "
                f"errors {result.connection_errors}  {statuses}"
            )

        try:
            return lg.run_sync(plan, mix, on_progress)
        except ValueError as exc:
            console.print(f"[red]{exc}[/red]")
            raise typer.Exit(2) from None


def _summary_table(
    result: lg.Result, summary: dict[str, Any], funding: lg.Funding | None = None
) -> Table:
    table = Table(title="loadgen", show_header=False)
    if funding is not None:
        table.add_row(
            "funded users",
            f"{funding.funded + funding.at_limit:,} of {funding.users:,} "
            f"({funding.amount:,} JPY top-up each; {funding.to_limit + funding.at_limit:,} "
            "only up to their limit)",
        )
    table.add_row("sent", f"{result.sent:,} in {result.elapsed:.1f} s")
    table.add_row(
        "by status", ", ".join(f"{k}: {v:,}" for k, v in sorted(result.by_status.items())) or "-"
    )
    for kind, statuses in sorted(result.by_kind.items()):
        table.add_row(f"  {kind}", ", ".join(f"{k}: {v:,}" for k, v in sorted(statuses.items())))
    table.add_row("connection errors", f"{result.connection_errors:,}")
    table.add_row(
        "accepted",
        f"{result.accepted:,} ({result.payments:,} payments, {result.refunds:,} refunds, "
        f"{result.top_ups:,} top-ups), {result.accepted_per_second:,.0f}/s",
    )
    table.add_row("insufficient balance (402)", f"{result.insufficient_balance:,}")
    table.add_row("replayed", f"{result.replayed:,}")
    ms = summary["latency_ms"]
    table.add_row(
        "latency ms", f"p50 {ms['p50']}  p90 {ms['p90']}  p99 {ms['p99']}  max {ms['max']}"
    )
    if result.per_merchant and result.payments:
        top, count = result.per_merchant.most_common(1)[0]
        table.add_row("busiest merchant", f"{top}: {count / result.payments:.0%} of payments")
    table.add_row("client CPU", f"{result.client_cpu_seconds:.1f} s")
    return table

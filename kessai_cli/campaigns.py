"""``kessai campaigns``: campaigns created, changed, stopped and read through the command API.

Every command is one request to ``/v1/admin/campaigns`` with an ``admin`` key (``--api-key``,
else the development ``admin`` key that ``kessai up`` wrote to ``$KESSAI_HOME/dev-keys.json``):
the API decides, records and refuses; nothing here touches a database. A write sends an
Idempotency-Key (``--idempotency-key``, else a new one), so a script that sends the same
command again with the same key gets the original answer instead of a second change. A refusal
is printed with its code and each field it names, and exits 1; a command API that cannot be
reached exits 3.
"""

from __future__ import annotations

import contextlib
import json
import uuid
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

import httpx
import typer
from rich.table import Table

from kessai.settings import Settings
from kessai_cli.screen import console

campaigns_app = typer.Typer(
    help="Campaigns (cashback, welcome bonus): create, change, stop, list, show.",
    no_args_is_help=True,
)

UrlOption = Annotated[
    str | None,
    typer.Option(help="Command API base URL. Default: KESSAI_COMMAND_API_HOST and _PORT."),
]
KeyOption = Annotated[
    str | None,
    typer.Option("--api-key", help="An admin key. Default: `admin` in $KESSAI_HOME/dev-keys.json."),
]
IdempotencyOption = Annotated[
    str | None,
    typer.Option(help="Send this Idempotency-Key (to repeat a command safely). Default: new."),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print the API's answer as JSON.")]
CampaignArgument = Annotated[str, typer.Argument(help="The campaign's id.")]
TIMEOUT_SECONDS = 10.0


def _client(url: str | None, api_key: str | None) -> httpx.Client:
    settings = Settings()
    if url is None:
        url = f"http://{settings.command_api_host}:{settings.command_api_port}"
    if api_key is None:
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            api_key = str(json.loads((settings.home / "dev-keys.json").read_text())["admin"])
    if not api_key:
        console.print(
            "[red]no API key: give --api-key (admin), or run `kessai up` first "
            "(it writes $KESSAI_HOME/dev-keys.json)[/red]"
        )
        raise typer.Exit(2)
    headers = {"Authorization": f"Bearer {api_key}", "User-Agent": "kessai-cli"}
    return httpx.Client(base_url=url, headers=headers, timeout=TIMEOUT_SECONDS)


def _call(
    url: str | None,
    api_key: str | None,
    method: str,
    path: str,
    body: dict[str, Any] | None = None,
    idempotency_key: str | None = None,
) -> dict[str, Any]:
    """The API's answer to one request; a refusal is printed and exits 1."""
    headers = {}
    if method != "GET":
        headers["Idempotency-Key"] = idempotency_key or f"cli-{uuid.uuid4()}"
    with _client(url, api_key) as client:
        try:
            response = client.request(method, path, json=body, headers=headers)
        except httpx.HTTPError as exc:
            console.print(f"[red]cannot reach the command API at {client.base_url}: {exc}[/red]")
            raise typer.Exit(3) from None
    try:
        answer = response.json()
    except ValueError:
        answer = None
    if response.is_success and isinstance(answer, dict):
        return answer
    _print_refusal(response.status_code, answer)
    raise typer.Exit(1)


def _print_refusal(status: int, answer: Any) -> None:
    error = answer.get("error") if isinstance(answer, dict) else None
    if not isinstance(error, dict):
        console.print(f"[red]error {status}: the command API answered without an error body[/red]")
        return
    console.print(f"[red]error {status} {error.get('code')}[/red]: {error.get('message')}")
    details = error.get("details") or {}
    for item in details.get("errors", []):
        console.print(f"  {item.get('field')}: {item.get('message')}", markup=False)
    shown = {k: v for k, v in details.items() if k != "errors"}
    if shown:
        console.print("  " + json.dumps(shown, sort_keys=True), markup=False, highlight=False)


def _print_campaign(campaign: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(campaign, indent=2, sort_keys=True))
        return
    rules = campaign["rules"]
    table = Table(title=f"campaign {campaign['campaign_id']}", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    shown = {
        "status": campaign["status"],
        "version": campaign["version"],
        "granted": f"{campaign['granted']:,} {rules['currency']}",
        "remaining": f"{campaign['remaining']:,} {rules['currency']}",
        **rules,
        "created_at": campaign["created_at"],
        "stopped_at": campaign["stopped_at"],
        "exhausted_at": campaign["exhausted_at"],
    }
    if "actor" in campaign:
        shown["recorded"] = f"{campaign['event_type']} by {campaign['actor']}"
    for name, value in shown.items():
        if name in ("campaign_id",) or value is None:
            continue
        text = ", ".join(value) if isinstance(value, list) else str(value)
        table.add_row(name, text)
    console.print(table)


def _rules_from(file: Path | None, given: dict[str, Any]) -> dict[str, Any]:
    """The rules in ``file`` (a JSON object), with the options given on top."""
    rules: dict[str, Any] = {}
    if file is not None:
        try:
            loaded = json.loads(file.read_text())
        except (OSError, ValueError) as exc:
            console.print(f"[red]cannot read {file}: {exc}[/red]")
            raise typer.Exit(2) from None
        if not isinstance(loaded, dict):
            console.print(f"[red]{file} does not hold a JSON object[/red]")
            raise typer.Exit(2)
        rules.update(loaded)
    rules.update({name: value for name, value in given.items() if value not in (None, [])})
    return rules


@campaigns_app.command("create")
def campaigns_create(
    file: Annotated[
        Path | None, typer.Option("--file", help="The rules as a JSON object; options override.")
    ] = None,
    kind: Annotated[str | None, typer.Option(help="cashback or welcome_bonus.")] = None,
    campaign_id: Annotated[str | None, typer.Option(help="The campaign's id.")] = None,
    name: Annotated[str | None, typer.Option()] = None,
    currency: Annotated[str | None, typer.Option(help="ISO 4217, e.g. JPY.")] = None,
    budget: Annotated[int | None, typer.Option(help="In minor units.")] = None,
    starts_at: Annotated[str | None, typer.Option(help="RFC 3339 with an offset.")] = None,
    ends_at: Annotated[str | None, typer.Option(help="RFC 3339 with an offset.")] = None,
    time_zone: Annotated[str | None, typer.Option(help="Default: Asia/Tokyo.")] = None,
    rate_bp: Annotated[int | None, typer.Option(help="Cashback: 2000 = 20%.")] = None,
    cap_per_payment: Annotated[int | None, typer.Option(help="Cashback.")] = None,
    cap_per_user_month: Annotated[int | None, typer.Option(help="Cashback.")] = None,
    min_payment_amount: Annotated[int | None, typer.Option(help="Cashback.")] = None,
    method: Annotated[
        list[str] | None, typer.Option(help="Cashback: balance or card; repeat for both.")
    ] = None,
    merchant: Annotated[
        list[str] | None, typer.Option(help="Cashback: an eligible merchant; repeat. Default: all.")
    ] = None,
    amount: Annotated[int | None, typer.Option(help="Welcome bonus (JPY default: 500).")] = None,
    url: UrlOption = None,
    api_key: KeyOption = None,
    idempotency_key: IdempotencyOption = None,
    as_json: JsonOption = False,
) -> None:
    """Create a campaign from --file and/or the options (the API checks the rules)."""
    given = {
        "kind": kind,
        "campaign_id": campaign_id,
        "name": name,
        "currency": currency,
        "budget": budget,
        "starts_at": starts_at,
        "ends_at": ends_at,
        "time_zone": time_zone,
        "rate_bp": rate_bp,
        "cap_per_payment": cap_per_payment,
        "cap_per_user_month": cap_per_user_month,
        "min_payment_amount": min_payment_amount,
        "methods": method,
        "merchants": merchant,
        "amount": amount,
    }
    body = _rules_from(file, given)
    answer = _call(url, api_key, "POST", "/v1/admin/campaigns", body, idempotency_key)
    if not as_json:
        console.print(f"created campaign {answer['campaign_id']}")
    _print_campaign(answer, as_json)


@campaigns_app.command("change")
def campaigns_change(
    campaign_id: CampaignArgument,
    ends_at: Annotated[str | None, typer.Option(help="A later end (RFC 3339).")] = None,
    budget: Annotated[int | None, typer.Option(help="A higher budget (minor units).")] = None,
    url: UrlOption = None,
    api_key: KeyOption = None,
    idempotency_key: IdempotencyOption = None,
    as_json: JsonOption = False,
) -> None:
    """Move a campaign's end later and/or raise its budget (nothing else changes)."""
    body = {k: v for k, v in {"ends_at": ends_at, "budget": budget}.items() if v is not None}
    path = f"/v1/admin/campaigns/{quote(campaign_id, safe='')}"
    _print_campaign(_call(url, api_key, "PATCH", path, body, idempotency_key), as_json)


@campaigns_app.command("stop")
def campaigns_stop(
    campaign_id: CampaignArgument,
    reason: Annotated[str | None, typer.Option(help="Why, kept with the stop.")] = None,
    url: UrlOption = None,
    api_key: KeyOption = None,
    idempotency_key: IdempotencyOption = None,
    as_json: JsonOption = False,
) -> None:
    """Stop a campaign now: nothing is granted for what happens from now on."""
    body = {} if reason is None else {"reason": reason}
    path = f"/v1/admin/campaigns/{quote(campaign_id, safe='')}/stop"
    _print_campaign(_call(url, api_key, "POST", path, body, idempotency_key), as_json)


@campaigns_app.command("list")
def campaigns_list(
    url: UrlOption = None, api_key: KeyOption = None, as_json: JsonOption = False
) -> None:
    """Every campaign: status, budget, granted and remaining."""
    campaigns = _call(url, api_key, "GET", "/v1/admin/campaigns")["campaigns"]
    if as_json:
        print(json.dumps(campaigns, indent=2, sort_keys=True))
        return
    table = Table(title=f"{len(campaigns)} campaign(s)")
    for column in ("campaign", "kind", "status", "budget", "granted", "remaining", "window"):
        table.add_column(column)
    for c in campaigns:
        rules = c["rules"]
        table.add_row(
            c["campaign_id"],
            rules["kind"],
            c["status"],
            f"{rules['budget']:,} {rules['currency']}",
            f"{c['granted']:,}",
            f"{c['remaining']:,}",
            f"{rules['starts_at']} to {rules['ends_at']}",
        )
    console.print(table)


@campaigns_app.command("show")
def campaigns_show(
    campaign_id: CampaignArgument,
    url: UrlOption = None,
    api_key: KeyOption = None,
    as_json: JsonOption = False,
) -> None:
    """One campaign: its rules with every change applied, status, granted and remaining."""
    path = f"/v1/admin/campaigns/{quote(campaign_id, safe='')}"
    _print_campaign(_call(url, api_key, "GET", path), as_json)

"""`mom-service keys create|list|disable|delete`: API keys managed on the usage database itself (DATABASE_URL, migrated
first), not through the HTTP API: the same checks as the admin API, the same audit table, the actor `cli:<user>`.
Everything printed is JSON; a new key is printed once, with its record."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import sys
from typing import TYPE_CHECKING, Any

import orjson

from mom_service.config import MoMConfig, resolve_config
from mom_service.errors import ConfigError, InvalidRequest
from mom_service.settings import Settings

if TYPE_CHECKING:
    from mom_service.usage.keys import KeyStore


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    keys = commands.add_parser("keys", help="API keys in the usage database (DATABASE_URL): create, list, disable...")
    actions = keys.add_subparsers(dest="action", required=True)
    create = actions.add_parser("create", help="make a key: printed once, with its record")
    create.add_argument("--name", required=True)
    create.add_argument("--owner")
    create.add_argument("--models", help="comma-separated MoM models it may use (default: all)")
    create.add_argument("--budget-usd", help="USD per budget period")
    create.add_argument("--budget-period", choices=["day", "month"], help="UTC day or calendar month (default: month)")
    create.add_argument("--rpm", type=int, help="requests per minute")
    create.add_argument("--tpm", type=int, help="tokens per minute")
    create.add_argument("--expires-at", help="ISO 8601 or unix seconds")
    actions.add_parser("list", help="every key's record (never the key)")
    for action, text in (("disable", "disable a key (it answers 401 from then on)"), ("delete", "delete a key")):
        actions.add_parser(action, help=text).add_argument("id", help="the key's id (key_...)")


def _body(args: argparse.Namespace) -> dict[str, Any]:
    """The create options as the admin API's body (those given)."""
    body = {
        "name": args.name,
        "owner": args.owner,
        "models": [m.strip() for m in args.models.split(",") if m.strip()] if args.models is not None else None,
        "budget_usd": args.budget_usd,
        "budget_period": args.budget_period,
        "rpm_limit": args.rpm,
        "tpm_limit": args.tpm,
        "expires_at": args.expires_at,
    }
    return {name: value for name, value in body.items() if value is not None}


def _print(value: Any) -> None:
    print(orjson.dumps(value, option=orjson.OPT_INDENT_2).decode())


async def _act(store: KeyStore, args: argparse.Namespace, config: MoMConfig | None, actor: str) -> int:
    from mom_service.api.schemas.keys import key_fields, key_json

    if args.action == "create":
        assert config is not None
        key, secret = await store.create(key_fields(_body(args), config, new=True), actor)
        _print({**key_json(key), "key": secret})
        print("Keep the key now: it is not shown again.", file=sys.stderr)
        return 0
    if args.action == "list":
        _print([key_json(key) for key in await store.all()])
        return 0
    done = (
        await store.update(args.id, {"disabled": True}, actor)
        if args.action == "disable"
        else await store.delete(args.id, actor)
    )
    if not done:
        print(f"mom-service keys: no API key has the id '{args.id}'", file=sys.stderr)
        return 1
    _print(key_json(done) if not isinstance(done, bool) else {"object": "api_key", "id": args.id, "deleted": True})
    return 0


async def _run(settings: Settings, args: argparse.Namespace, config: MoMConfig | None) -> int:
    from mom_service.usage.database import UsageDatabase  # the database's libraries, for this command only
    from mom_service.usage.keys import KeyStore, KeyStoreUnavailable

    usage = UsageDatabase(settings.database_url)
    actor = f"cli:{getpass.getuser()}"
    try:
        await usage.migrate()
        return await _act(KeyStore(usage.engine), args, config, actor)
    except KeyStoreUnavailable as exc:
        print(f"mom-service keys: the database {usage.display_url} did not answer ({exc})", file=sys.stderr)
        return 1
    finally:
        await usage.dispose()


def keys_command(settings: Settings, args: argparse.Namespace) -> int:
    config: MoMConfig | None = None
    if args.action == "create":  # its MoM models are checked against the config
        try:
            config, _ = resolve_config(settings)
        except ConfigError as exc:
            print(f"Invalid config:\n{exc}", file=sys.stderr)
            return 1
    try:
        return asyncio.run(_run(settings, args, config))
    except InvalidRequest as exc:
        print(f"mom-service keys: {exc.message}", file=sys.stderr)
        return 2

"""`loraloop adapters ...`: the admin API from the command line."""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

import httpx


class AdminCallFailed(Exception):
    """One line for the operator: what the gateway answered."""


def _call(args: argparse.Namespace, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    settings = args.settings
    url = args.url or f"http://{settings.host}:{settings.port}"
    key = os.environ.get("LORALOOP_ADMIN_KEY") or (settings.admin_key and settings.admin_key.get_secret_value())
    if not key:
        raise AdminCallFailed("no admin key: set LORALOOP_ADMIN_KEY")
    try:
        resp = httpx.request(method, f"{url}{path}", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=600)
    except httpx.HTTPError as exc:
        raise AdminCallFailed(f"cannot reach the gateway at {url}: {exc}") from None
    if resp.status_code >= 400:
        try:
            message = resp.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = resp.text[:200]
        raise AdminCallFailed(f"HTTP {resp.status_code}: {message}")
    return resp.json()


def _run(args: argparse.Namespace) -> int:
    if args.action == "list":
        out = _call(args, "GET", "/admin/adapters")
        aliases = _call(args, "GET", "/admin/aliases")["data"]
        for a in out["data"]:
            where = ", ".join(f"{u}: {'loaded' if s is True else s if s else '-'}" for u, s in a["backends"].items())
            print(f"{a['name']:<24} r={a['rank']:<3} aliases={','.join(a['aliases']) or '-':<16} {where}")
        for entry in aliases:
            print(f"alias {entry['alias']} -> {entry['adapter'] or 'base'}")
        return 0
    if args.action == "register":
        out = _call(args, "POST", "/admin/adapters", {"name": args.name, "path": args.path})
    elif args.action == "unload":
        out = _call(args, "DELETE", f"/admin/adapters/{args.name}")
    else:
        target = None if args.adapter in ("base", "none", "-") else args.adapter
        out = _call(args, "PUT", f"/admin/aliases/{args.alias}", {"adapter": target})
    print(json.dumps(out))
    return 0


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except AdminCallFailed as exc:
        from deploy.cli import CommandError

        raise CommandError(str(exc)) from None


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("adapters", help="register, list, unload adapters and repoint aliases (admin API)")
    p.add_argument("--url", help="gateway URL (default: http://HOST:PORT from the settings)")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    actions.add_parser("list", help="adapters with their state on every back-end, and the aliases")
    r = actions.add_parser("register", help="validate and load an adapter directory under the adapter root")
    r.add_argument("name")
    r.add_argument("path")
    u = actions.add_parser("unload", help="unload and forget an adapter no alias uses")
    u.add_argument("name")
    pt = actions.add_parser("point", help="repoint an alias to an adapter (or `base`)")
    pt.add_argument("alias")
    pt.add_argument("adapter")
    p.set_defaults(func=run, needs_settings=True)

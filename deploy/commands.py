"""CLI: `loraloop cycle`, `loraloop rollback ALIAS`, `loraloop canary ...`, `loraloop registry ...` and
`loraloop adapters ...` (the admin API from the command line). Errors are raised (core.errors); the CLI's
main prints them as one line with their exit code."""

from __future__ import annotations

import argparse
import json
import logging

from core.errors import ExitCode
from core.registry import Registry, RegistryConfig
from core.settings import Settings

from .admin_client import AdminClient, GatewayFleet
from .controller import PromotionController
from .cycle import run_cycle


def _registry(settings: Settings) -> Registry:
    return Registry(RegistryConfig(path=settings.registry_path, adapter_root=settings.adapter_root))


def _controller(settings: Settings) -> PromotionController:
    fleet = GatewayFleet.from_settings(settings)
    return PromotionController(_registry(settings), fleet, settings.store.root, settings.promotion, actor="operator")


def cmd_cycle(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    result = run_cycle(args.settings)
    for alias, actions in result.actions.items():
        for action in actions:
            print(f"{alias}: {action}")
    for alias, error in result.failed.items():
        print(f"{alias}: FAILED {error}")
    return result.exit_code


def cmd_rollback(args: argparse.Namespace) -> int:
    reinstated = _controller(args.settings).rollback(args.alias, reason=args.reason)
    print(f"{args.alias} now serves {reinstated.version if reinstated else 'the base model'}")
    return ExitCode.OK


def cmd_canary(args: argparse.Namespace) -> int:
    controller = _controller(args.settings)
    if args.action == "start":
        exp = controller.start_canary(args.target)
        print(f"canary {exp.id} running on {exp.alias}")
        return ExitCode.OK
    decision = controller.evaluate(args.target)
    print("no running canary" if decision is None else f"{decision.action}: {decision.reason}")
    if decision is not None and args.json:
        print(json.dumps(decision.figures, indent=2))
    return ExitCode.OK


def cmd_registry(args: argparse.Namespace) -> int:
    if not args.settings.registry_path.exists():  # a read creates nothing
        print(f"no registry at {args.settings.registry_path} yet (the first retrain run creates it)")
        return ExitCode.OK
    registry = _registry(args.settings)
    if args.action == "list":
        for v in registry.list(alias=args.alias):
            print(f"{v.version:<24} {v.status:<10} parent={v.parent or '-':<16} watermark={v.data_watermark or '-'}")
    else:
        for e in registry.audit(alias=args.alias):
            print(f"{e['at']:%Y-%m-%d %H:%M:%S} {e['version']:<20} {e['from_status'] or '-':>9} -> "
                  f"{e['to_status']:<9} by {e['actor']}: {e['reason']}")  # fmt: skip
    return ExitCode.OK


def cmd_adapters(args: argparse.Namespace) -> int:
    settings: Settings = args.settings
    key = settings.admin_key.get_secret_value() if settings.admin_key else ""
    client = AdminClient(args.url or settings.admin_url, key, settings.promotion.request_timeout_s)
    try:
        if args.action == "list":
            for a in client.adapters():
                states = a["backends"].items()
                where = ", ".join(f"{u}: {'loaded' if s is True else s if s else '-'}" for u, s in states)
                print(f"{a['name']:<24} r={a['rank']:<3} aliases={','.join(a['aliases']) or '-':<16} {where}")
            for entry in client.aliases():
                print(f"alias {entry['alias']} -> {entry['adapter'] or 'base'}")
            return ExitCode.OK
        if args.action == "register":
            out = client.register_adapter(args.name, args.path)
        elif args.action == "unload":
            out = client.unload_adapter(args.name)
        else:
            out = client.point(args.alias, None if args.adapter in ("base", "none", "-") else args.adapter)
    finally:
        client.close()
    print(json.dumps(out))
    return ExitCode.OK


def _register_adapters(sub: argparse._SubParsersAction) -> None:
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
    p.set_defaults(func=cmd_adapters, needs_settings=True)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("cycle", help="the nightly job: evaluate canaries, retrain, gate, start canaries")
    p.set_defaults(func=cmd_cycle, needs_settings=True)
    p = sub.add_parser("rollback", help="reinstate the alias's previous champion (seconds, no retraining)")
    p.add_argument("alias")
    p.add_argument("--reason", default="operator rollback")
    p.set_defaults(func=cmd_rollback, needs_settings=True)
    p = sub.add_parser("canary", help="start a canary for a candidate version, or evaluate an alias's canary")
    p.add_argument("action", choices=["start", "evaluate"])
    p.add_argument("target", help="a candidate version (start) or an alias (evaluate)")
    p.add_argument("--json", action="store_true", help="print the figures")
    p.set_defaults(func=cmd_canary, needs_settings=True)
    p = sub.add_parser("registry", help="adapter versions and the audit log")
    p.add_argument("action", choices=["list", "audit"])
    p.add_argument("--alias")
    p.set_defaults(func=cmd_registry, needs_settings=True)
    _register_adapters(sub)

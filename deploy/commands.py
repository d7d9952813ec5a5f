"""CLI: `loraloop cycle`, `loraloop rollback ALIAS`, `loraloop canary ...`, `loraloop registry ...`."""

from __future__ import annotations

import argparse
import json
import logging

from serving.settings import Settings

from .controller import PromotionController
from .cycle import EXIT_LOCKED, CycleLocked, gateway_urls, run_cycle
from .gateway_admin import GatewayError, GatewayFleet
from .registry import Registry, RegistryConfig, RegistryError


def _registry(settings: Settings) -> Registry:
    return Registry(RegistryConfig(path=settings.registry_path, adapter_root=settings.adapter_root))


def _controller(settings: Settings) -> PromotionController:
    key = settings.admin_key.get_secret_value() if settings.admin_key else ""
    fleet = GatewayFleet(gateway_urls(settings), key, settings.promotion.request_timeout_s)
    return PromotionController(_registry(settings), fleet, settings.store.root, settings.promotion, actor="operator")


def _fail(exc: Exception) -> int:
    from deploy.cli import CommandError

    raise CommandError(str(exc).splitlines()[0]) from None


def cmd_cycle(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        result = run_cycle(args.settings)
    except CycleLocked as exc:
        print(f"loraloop: {exc}")
        return EXIT_LOCKED
    except (GatewayError, RegistryError) as exc:
        return _fail(exc)
    for alias, actions in result.actions.items():
        for action in actions:
            print(f"{alias}: {action}")
    for alias, error in result.failed.items():
        print(f"{alias}: FAILED {error}")
    return result.exit_code


def cmd_rollback(args: argparse.Namespace) -> int:
    try:
        reinstated = _controller(args.settings).rollback(args.alias, reason=args.reason)
    except (GatewayError, RegistryError) as exc:
        return _fail(exc)
    print(f"{args.alias} now serves {reinstated.version if reinstated else 'the base model'}")
    return 0


def cmd_canary(args: argparse.Namespace) -> int:
    controller = _controller(args.settings)
    try:
        if args.action == "start":
            exp = controller.start_canary(args.target)
            print(f"canary {exp.id} running on {exp.alias}")
        else:
            decision = controller.evaluate(args.target)
            print("no running canary" if decision is None else f"{decision.action}: {decision.reason}")
            if decision is not None and args.json:
                print(json.dumps(decision.figures, indent=2))
    except (GatewayError, RegistryError) as exc:
        return _fail(exc)
    return 0


def cmd_registry(args: argparse.Namespace) -> int:
    registry = _registry(args.settings)
    if args.action == "list":
        for v in registry.list(alias=args.alias):
            print(f"{v.version:<24} {v.status:<10} parent={v.parent or '-':<16} watermark={v.data_watermark or '-'}")
    else:
        for e in registry.audit(alias=args.alias):
            print(f"{e['at']:%Y-%m-%d %H:%M:%S} {e['version']:<20} {e['from_status'] or '-':>9} -> "
                  f"{e['to_status']:<9} by {e['actor']}: {e['reason']}")  # fmt: skip
    return 0


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

"""`kpg dev up|down|status|env`: the local stack from the command line."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from rich.console import Console

from gateway.devstack.stack import (
    DEFAULT_CONTROLLER_PORT,
    DEFAULT_KAFKA_PORT,
    DEFAULT_REDIS_PORT,
    DevStack,
    StackError,
)


def default_state_dir() -> Path:
    return Path(os.environ.get("KPG_STATE_DIR", ".state")) / "devstack"


def add_dev_commands(commands: Any) -> None:
    dev = commands.add_parser("dev", help="a local Kafka broker and Redis server, no Docker needed")
    dev.add_argument(
        "--state-dir", type=Path, default=None, help="default: $KPG_STATE_DIR/devstack or .state/devstack"
    )
    actions = dev.add_subparsers(dest="action", required=True)
    up = actions.add_parser(
        "up", help="start Kafka and Redis (downloads Kafka from Maven Central the first time)"
    )
    up.add_argument("--kafka-port", type=int, default=DEFAULT_KAFKA_PORT)
    up.add_argument("--controller-port", type=int, default=DEFAULT_CONTROLLER_PORT)
    up.add_argument("--redis-port", type=int, default=DEFAULT_REDIS_PORT)
    down = actions.add_parser("down", help="stop what `up` started")
    down.add_argument(
        "--wipe", action="store_true", help="and delete its data (topics, keys, databases): start afresh"
    )
    actions.add_parser("status", help="show the stack's processes")
    actions.add_parser("env", help="print export lines for the gateway's settings (use with eval)")
    dev.set_defaults(func=run_dev)


def run_dev(args: argparse.Namespace) -> int:
    console = Console(stderr=True)
    stack = DevStack(args.state_dir or default_state_dir())
    try:
        if args.action == "up":
            with console.status("starting the dev stack") as status:
                info = stack.up(
                    kafka_port=args.kafka_port,
                    controller_port=args.controller_port,
                    redis_port=args.redis_port,
                    progress=lambda message: status.update(message),
                )
            console.print(f"[green]dev stack up[/]: Kafka {info.bootstrap_servers}, Redis {info.redis_url}")
        elif args.action == "down":
            stopped = stack.down(wipe=args.wipe)
            console.print(f"stopped: {', '.join(stopped)}" if stopped else "nothing was running")
            if args.wipe:
                console.print(f"wiped the data in {stack.state_dir}")
        elif args.action == "status":
            for name, state in stack.status().items():
                running = "[green]running[/]" if state["pid"] else "[red]stopped[/]"
                answers = "answers" if state["answers"] else "not answering"
                console.print(
                    f"{name:6} {running} pid={state['pid']} {state['address']} {answers}  log={state['log']}"
                )
        elif args.action == "env":
            print("\n".join(stack.env_lines()))
    except StackError as exc:
        console.print(f"[red]kpg dev {args.action}:[/] {exc}")
        return 1
    return 0

"""`embedding-gateway keys new`: a fresh caller key, shown once, and the TOML entry that configures it
(by its SHA-256: the gateway never stores or logs the key itself)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from gateway.auth.keys import digest, new_key


def add_parser(sub: Any) -> None:
    keys = sub.add_parser("keys", help="caller keys ([auth])")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    new = keys_sub.add_parser("new", help="print a new key once, and its [[auth.keys]] entry")
    new.add_argument("--name", required=True, help="the caller, as logs and metrics show it (e.g. a team)")
    new.add_argument("--models", default="*", help='comma-separated model names, or "*" (default) for all')
    new.add_argument("--rpm", type=int, help="requests per minute")
    new.add_argument("--texts-per-minute", type=int, help="texts per minute")
    new.add_argument("--admin", action="store_true", help="may call the admin routes")
    new.set_defaults(func=cmd_new)


def cmd_new(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from config.auth import KeyConfig

    key = new_key()
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    try:  # validate the name and numbers before anything is printed
        entry = KeyConfig(
            name=args.name,
            hash=digest(key),
            models=models,
            rpm=args.rpm,
            texts_per_minute=args.texts_per_minute,
            admin=args.admin,
        )
    except ValidationError as exc:
        for err in exc.errors():
            print(f"embedding-gateway keys new: --{'-'.join(map(str, err['loc']))}: {err['msg']}", file=sys.stderr)
        return 2
    print(f"key (shown once; give it to {entry.name} and store it as a secret): {key}")
    print()
    print("[[auth.keys]]")
    print(f"name = {json.dumps(entry.name)}")
    print(f'hash = "{entry.hash}"')
    print(f"models = {json.dumps(entry.models)}")
    if entry.rpm is not None:
        print(f"rpm = {entry.rpm}")
    if entry.texts_per_minute is not None:
        print(f"texts_per_minute = {entry.texts_per_minute}")
    if entry.admin:
        print("admin = true")
    return 0

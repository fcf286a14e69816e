"""The `gateway` command: serve, check-config, hash-token."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import os
import secrets
import string
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, TypeVar

from gateway import config as config_mod
from gateway.cli import keys as keys_commands
from gateway.logs import configure as configure_logging

EXIT_CONFIG = 2
T = TypeVar("T")


def _load(path: str) -> config_mod.Config | None:
    try:
        return config_mod.load(path, os.environ)
    except config_mod.ConfigError as exc:
        print(f"{exc.source}: {len(exc.problems)} problem(s):", file=sys.stderr)
        for problem in exc.problems:
            print("  " + problem.format(exc.source), file=sys.stderr)
        return None


def cmd_check_config(args: argparse.Namespace) -> int:
    cfg = _load(args.config)
    if cfg is None:
        return EXIT_CONFIG
    print(f"{args.config}: ok ({len(cfg.routes)} route(s), {len(cfg.admin.tokens)} admin token(s))")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    if not 1 <= args.workers <= 256:
        print("gateway: --workers must be between 1 and 256", file=sys.stderr)
        return EXIT_CONFIG
    cfg = _load(args.config)
    if cfg is None:
        return EXIT_CONFIG
    # The flags win over the file and its GATEWAY_LOGGING_* overrides.
    configure_logging(args.log_level or cfg.logging.level, args.log_format or cfg.logging.format)
    from gateway.runtime.embedded import MissingRedis
    from gateway.runtime.serve import serve, supervise_workers

    log_args = [*(["--log-level", args.log_level] if args.log_level else []),
                *(["--log-format", args.log_format] if args.log_format else [])]  # fmt: skip
    log_args += ["--loop", args.loop]
    run = _runner(args.loop)
    try:
        if args.workers > 1 and not args.worker:
            return run(supervise_workers(cfg, args.config, args.workers, log_args))
        run(serve(cfg, config_path=args.config, reuse_port=args.worker))
    except MissingRedis as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except OSError as exc:
        print(f"gateway: cannot listen: {exc.strerror or exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    return 0


def _runner(loop: str) -> Callable[[Coroutine[Any, Any, T]], T]:
    """uvloop's event loop when asked for (the default, where it is installed): its C transports
    take about a sixth of the proxy's CPU per request off (make bench); asyncio's otherwise."""
    if loop != "asyncio":
        try:
            import uvloop
        except ImportError:
            if loop == "uvloop":
                raise SystemExit("gateway: --loop uvloop: uvloop is not installed") from None
        else:
            return uvloop.run
    return asyncio.run


def _new_token_id() -> str:
    """8 random lowercase letters and digits (41 bits): the `<id>` of a new admin token."""
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(8))


def cmd_hash_token(args: argparse.Namespace) -> int:
    """A config entry for an admin token (spec 7): with --generate a new `gwadm_<id>_<secret>`
    token and its entry; otherwise the entry for a token read from stdin (never from a flag)."""
    from gateway.admin.auth import MAX_ADMIN_TOKEN_LENGTH, TOKEN_ID, TOKEN_PREFIX, hash_token, token_id
    from gateway.keytable.credentials import VISIBLE_ASCII

    if args.id is not None and not TOKEN_ID.fullmatch(args.id):
        print("gateway: --id must be 4-32 lowercase letters and digits", file=sys.stderr)
        return EXIT_CONFIG
    if args.generate:
        new_id = args.id or _new_token_id()
        token = f"{TOKEN_PREFIX}{new_id}_{secrets.token_urlsafe(32)}"
    elif args.id is not None:
        print("gateway: --id goes with --generate; a token read from stdin carries its own id", file=sys.stderr)
        return EXIT_CONFIG
    elif sys.stdin.isatty():
        token = getpass.getpass("admin token: ")
    else:
        token = sys.stdin.readline().rstrip("\r\n")
    if len(token) < 16:
        print("gateway: an admin token must be at least 16 characters", file=sys.stderr)
        return EXIT_CONFIG
    if len(token) > MAX_ADMIN_TOKEN_LENGTH or not VISIBLE_ASCII.fullmatch(token):
        # the admin API reads a bearer token by RFC 6750 (keytable/credentials.py): it would never match
        print(
            f"gateway: an admin token is at most {MAX_ADMIN_TOKEN_LENGTH} characters of "
            "visible ASCII (no spaces or control characters)",
            file=sys.stderr,
        )
        return EXIT_CONFIG
    selected = token_id(token)
    if selected is None:
        # A legacy token: still accepted (verified against every entry without an id), but
        # each wrong guess then costs argon2 work. Never echo the token, not even here.
        print(
            "gateway: note: this token is not shaped gwadm_<id>_<secret>, so the entry has no id and "
            "the gateway verifies it the slow legacy way; `gateway hash-token --generate` makes one "
            "of the new shape",
            file=sys.stderr,
        )
    digest = hash_token(token)
    if args.generate:
        print(f"token: {token}")
        print("# keep the token secret; put this entry under admin.tokens:")
    id_line = f"\n  id: {selected}" if selected is not None else ""
    print(f'- name: {args.name}{id_line}\n  role: {args.role}\n  hash: "{digest}"')
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gateway", description="API-key gateway")
    sub = p.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the proxy and the admin listener")
    serve.add_argument("--config", required=True, help="path to gateway.yaml")
    serve.add_argument("--log-level", choices=config_mod.LOG_LEVELS,
                       help="overrides logging.level (default info)")  # fmt: skip
    serve.add_argument("--log-format", choices=config_mod.LOG_FORMATS,
                       help="overrides logging.format: json lines (default) or text for a terminal")  # fmt: skip
    serve.add_argument("--workers", type=int, default=1, metavar="N",
                       help="run N processes sharing the ports (SO_REUSEPORT), each with its own cache")  # fmt: skip
    serve.add_argument("--loop", choices=("auto", "uvloop", "asyncio"), default="auto",
                       help="event loop: uvloop where installed (auto, the default) or asyncio's own")  # fmt: skip
    serve.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # set by the parent of --workers
    serve.set_defaults(func=cmd_serve)

    check = sub.add_parser("check-config", help="validate a config file; exit 2 listing every problem")
    check.add_argument("--config", required=True)
    check.set_defaults(func=cmd_check_config)

    ht = sub.add_parser("hash-token", help="print an argon2id hash for an admin token (read from stdin)")
    ht.add_argument("--generate", action="store_true",
                    help="generate a new random token gwadm_<id>_<secret> and print it too")  # fmt: skip
    ht.add_argument("--id", help="the <id> for --generate: 4-32 lowercase letters and digits (default: random)")
    ht.add_argument("--name", default="ops", help="token name for the printed config entry")
    ht.add_argument("--role", default="admin", choices=list(config_mod.ROLES))
    ht.set_defaults(func=cmd_hash_token)

    keys_commands.register(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())

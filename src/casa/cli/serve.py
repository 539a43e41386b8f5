"""`casa serve`: an OpenAI-compatible endpoint and a live-captioning page for one model.

Design decisions:
- Flags are checked by argparse (ranged types) and the checkpoint and media
  directory before the server binds, so a typo is a one-line error (exit 2).
- The limit flags are made from the fields of `casa.serve.limits.Limits`
  (name, type, default, help): the dataclass is the one home of every bound.
- The API key may come from `$CASA_API_KEY` instead of `--api-key`, so that
  it does not show in the process list (`ps`); the flag wins when both are set.
- The server itself lives in `casa.serve`; this module maps flags onto it.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import MISSING, fields

from casa.cli.values import non_negative_int, positive_float, positive_int
from casa.serve.limits import Limits, flag_name

__all__ = ["API_KEY_ENV", "add_arguments", "register", "run"]

API_KEY_ENV = "CASA_API_KEY"


def register(sub: argparse._SubParsersAction) -> None:
    add_arguments(sub.add_parser("serve", help="OpenAI-compatible chat endpoint + live-captioning page"))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="a casa model directory, or a training run (its latest checkpoint)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    p.add_argument("--port", type=non_negative_int, default=8000, help="port (0: a free one; the address is printed)")
    p.add_argument("--model-name", default=None, help="the model id clients use (default: the directory's name)")
    p.add_argument("--media-dir", default=None,
                   help="the only directory whose files clients may name (file:// image URLs, videos); default: none")
    p.add_argument("--device", default="cpu", help='cpu, cuda or cuda:N')
    p.add_argument("--threads", type=positive_int, default=None,
                   help="torch CPU threads per session (default: the free cores shared by --max-sessions)")
    p.add_argument("--decode", choices=("auto", "kernels", "torch"), default="auto",
                   help="decode path of every session: casa's CPU kernels, PyTorch's ops, or auto (the kernels "
                        "where they are built and a session runs one thread; default: auto)")
    a = p.add_argument_group("access")
    a.add_argument("--api-key", default=None,
                   help=f"require 'Authorization: Bearer KEY' on every route but GET /health and the page's own "
                        f"files (default: ${API_KEY_ENV} if set, else no key)")
    a.add_argument("--allowed-hosts", default="",
                   help="comma-separated extra names clients may reach the server by (Host header), 'name' (any "
                        "port) or 'name:port'; '*' turns the check off. Always allowed: the bound address, "
                        "localhost, 127.0.0.1, [::1] with the server's port")
    g = p.add_argument_group("limits")
    for f in fields(Limits):
        kind = positive_int if f.type == "int" else positive_float
        assert f.default is not MISSING
        shown = f.default if isinstance(f.default, int) else f"{f.default:g}"
        g.add_argument(flag_name(f.name), type=kind, default=f.default, help=f"{f.metadata['help']} (default: {shown})")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"),
                   help='server log verbosity')
    p.set_defaults(func=run)


def run(args) -> int:
    from casa.serve.app import bind, create_app, serve
    from casa.serve.engine import Engine
    from casa.serve.guard import Access
    from casa.serve.media import MediaDir
    from casa.threads import free_cores, set_threads

    limits = Limits(**{f.name: getattr(args, f.name) for f in fields(Limits)})
    key, key_from = (args.api_key, "--api-key") if args.api_key is not None else (os.environ.get(API_KEY_ENV),
                                                                                     f"${API_KEY_ENV}")
    access = Access.from_options(key, args.allowed_hosts, key_from=key_from)
    MediaDir(args.media_dir)  # refuse a bad --media-dir before loading the model
    sock = bind(args.host, args.port)  # and a port in use
    try:
        # OpenMP threads that outnumber the cores spin at barriers and slow everyone down (casa/threads.py),
        # and each running session has its own team of them: share the free cores out
        threads = set_threads(args.threads or max(1, free_cores() // args.max_sessions))
        engine = Engine(args.checkpoint, name=args.model_name, device=args.device, decode=args.decode)
        app = create_app(engine, limits=limits, media_dir=args.media_dir, access=access)
        host, port = sock.getsockname()[:2]
        print(f"casa serve: model {engine.name!r} at http://{host}:{port}/ (OpenAI API under /v1, live captioning "
              f"at /; media dir {args.media_dir or 'none'}; {threads} threads per session; decode {engine.decode}; "
              f"{'API key required' if access.api_key else 'no API key'})", flush=True)
        if access.api_key is None and host not in ("127.0.0.1", "::1", "localhost"):
            print(f"casa serve: warning: listening on {host} without an API key: anyone who can reach this port "
                  f"can use the model (set --api-key or ${API_KEY_ENV}; no TLS: put a reverse proxy in front for "
                  "remote users)", flush=True)
        serve(app, sock, log_level=args.log_level)
    finally:
        sock.close()
    return 0

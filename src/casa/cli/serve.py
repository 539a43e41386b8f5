"""`casa serve`: an OpenAI-compatible endpoint and a live-captioning page for one model.

Design decisions:
- Flags are checked by argparse (ranged types) and the checkpoint and media
  directory before the server binds, so a typo is a one-line error (exit 2).
- The server itself lives in `casa.serve`; this module maps flags onto it.
"""

from __future__ import annotations

import argparse

from casa.cli.values import non_negative_int, positive_float, positive_int

__all__ = ["add_arguments", "register", "run"]


def register(sub: argparse._SubParsersAction) -> None:
    add_arguments(sub.add_parser("serve", help="OpenAI-compatible chat endpoint + live-captioning page"))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="a casa model directory, or a training run (its latest checkpoint)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    p.add_argument("--port", type=non_negative_int, default=8000, help="port (0: a free one; the address is printed)")
    p.add_argument("--model-name", default=None, help="the model id clients use (default: the directory's name)")
    p.add_argument("--media-dir", default=None,
                   help="the only directory whose files clients may name (file:// image URLs, videos); default: none")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="torch CPU threads per session (default: the free cores shared by --max-sessions)")
    g = p.add_argument_group("limits")
    g.add_argument("--max-sessions", type=positive_int, default=2,
                   help="chat generations + live-captioning viewers running at once")
    g.add_argument("--max-queue", type=positive_int, default=8, help="chat requests waiting for a slot (beyond: 429)")
    g.add_argument("--queue-timeout", type=positive_float, default=60.0, help="seconds a request waits (beyond: 503)")
    g.add_argument("--max-tokens", type=positive_int, default=512, help="tokens per chat completion (and the default)")
    g.add_argument("--max-prompt-tokens", type=positive_int, default=8192,
                   help="text + image tokens of a chat request's conversation")
    g.add_argument("--max-images", type=positive_int, default=8, help="images per chat request")
    g.add_argument("--max-image-pixels", type=positive_int, default=4096 * 4096)
    g.add_argument("--max-request-mb", type=positive_float, default=16.0, help="a chat request's body")
    g.add_argument("--max-upload-mb", type=positive_float, default=64.0, help="an uploaded video")
    g.add_argument("--max-video-seconds", type=positive_float, default=600.0)
    g.add_argument("--max-fps", type=positive_float, default=10.0, help="live-captioning frame rate")
    g.add_argument("--max-caption-tokens", type=positive_int, default=64)
    g.add_argument("--connect-timeout", type=positive_float, default=30.0,
                   help="seconds a live session waits for its viewer")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    p.set_defaults(func=run)


def run(args) -> int:
    from casa.serve.app import bind, create_app, serve
    from casa.serve.engine import Engine
    from casa.serve.limits import Limits
    from casa.serve.media import MediaDir
    from casa.threads import free_cores, set_threads

    limits = Limits(max_sessions=args.max_sessions, max_queue=args.max_queue, queue_timeout=args.queue_timeout,
                    max_request_mb=args.max_request_mb, max_upload_mb=args.max_upload_mb,
                    max_video_seconds=args.max_video_seconds, max_tokens=args.max_tokens,
                    max_prompt_tokens=args.max_prompt_tokens, max_images=args.max_images,
                    max_image_pixels=args.max_image_pixels, max_fps=args.max_fps,
                    max_caption_tokens=args.max_caption_tokens, connect_timeout=args.connect_timeout)
    MediaDir(args.media_dir)  # refuse a bad --media-dir before loading the model
    sock = bind(args.host, args.port)  # and a port in use
    try:
        # OpenMP threads that outnumber the cores spin at barriers and slow everyone down (casa/threads.py),
        # and each running session has its own team of them: share the free cores out
        threads = set_threads(args.threads or max(1, free_cores() // args.max_sessions))
        engine = Engine(args.checkpoint, name=args.model_name, device=args.device)
        app = create_app(engine, limits=limits, media_dir=args.media_dir)
        host, port = sock.getsockname()[:2]
        print(f"casa serve: model {engine.name!r} at http://{host}:{port}/ (OpenAI API under /v1, live captioning "
              f"at /; media dir {args.media_dir or 'none'}; {threads} threads per session)", flush=True)
        serve(app, sock, log_level=args.log_level)
    finally:
        sock.close()
    return 0

"""``layers-and-logits serve``: the live explorer. It loads the model once, binds 127.0.0.1 on a
free port (``--port 0``) and prints the page's URL with a random access token, as Jupyter does;
it opens nothing by itself. Behind an SSH tunnel it serves a GPU box's model to a laptop's
browser (docs/explorer.md).

Safe by default: loopback only; every request needs the token; ``--host`` other than loopback
without a token is refused at start; the API names lenses, never paths (lens files come only
from ``--lens-path`` and the model's lens cache); errors reach the client as one line. SIGTERM
and Ctrl-C stop it cleanly: exit 143 and 130, the worker thread joined. Exit 1 if the model or a
lens does not load or the port is taken, 2 on bad usage. Nothing here imports torch before the
flags are checked.
"""

from __future__ import annotations

import argparse
import ipaddress
import secrets
import signal
import socket
import sys

from layers_core.app.cli import DEVICE_CHOICES, ONE_MODEL_HELP, OneLineParser

SERVE_PROG = "layers-and-logits serve"
DESCRIPTION = "Serve a live logit-lens explorer for one model: type prompts, see every lens (a browser page)"
DEFAULT_MAX_TOKENS = 1024
DEFAULT_QUEUE = 8
MIN_TOKEN_CHARS = 16


class Stopped(Exception):
    """SIGTERM or SIGINT reached the server (``signum``)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def build_parser(prog: str = SERVE_PROG) -> argparse.ArgumentParser:
    """The parser of ``serve``; every default is shown in ``--help``."""
    from layers_core.lens.views import NORM_VIEWS

    parser = OneLineParser(prog=prog, description=DESCRIPTION)  # usage errors: one line, exit 2
    parser.add_argument("model", nargs="?", help=ONE_MODEL_HELP)
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default: %(default)s, this machine only; use an SSH tunnel)")
    parser.add_argument("--port", type=int, default=0, help="port (default: %(default)s = a free one)")
    parser.add_argument("--token", help="the access token (default: a random one, printed in the URL)")
    parser.add_argument("--no-token", action="store_true",
                        help="ask no token (refused unless --host is a loopback address)")
    parser.add_argument("--device", default="auto", choices=DEVICE_CHOICES,
                        help="compute device (default: %(default)s = cuda, then mps, then cpu)")
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                        help="compute dtype (default: %(default)s, as run)")
    parser.add_argument("--threads", type=int, metavar="N",
                        help="CPU threads for torch (default: before each request, one per core other processes "
                             "left idle since the previous one)")
    parser.add_argument("--norm", default="final", choices=NORM_VIEWS,
                        help="the lens the page opens on (default: %(default)s; every lens stays a click away)")
    parser.add_argument("--lens-path", nargs="+", default=[], metavar="PATH",
                        help="fitted lenses to offer: a tuned lens's directory, a Jacobian lens's .pt file "
                             "(besides those in the model's lens cache)")
    parser.add_argument("--allow-foreign-lens", action="store_true",
                        help="offer a fitted lens whose fingerprint names another model")
    parser.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS,
                        help="longest prompt (plus continuation) in tokens (default: %(default)s)")
    parser.add_argument("--queue-size", type=int, default=DEFAULT_QUEUE,
                        help="requests waiting at most; more answer 429 (default: %(default)s)")
    return parser


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _usage_error(args: argparse.Namespace) -> str | None:
    if args.no_token and not _loopback(args.host):
        return (f"--host {args.host} without a token is refused: anyone who reaches the port could run the "
                "model; drop --no-token (or bind 127.0.0.1 and use an SSH tunnel)")
    if args.no_token and args.token:
        return "--token and --no-token exclude each other"
    if args.token is not None and len(args.token) < MIN_TOKEN_CHARS:
        return f"--token must have at least {MIN_TOKEN_CHARS} characters"
    if not 0 <= args.port <= 65535:
        return f"--port must be from 0 to 65535, got {args.port}"
    for flag, value in (("--max-tokens", args.max_tokens), ("--queue-size", args.queue_size),
                        ("--threads", args.threads or 1)):
        if value < 1:
            return f"{flag} must be at least 1, got {value}"
    return None


def _redacted(arg: str, token: str) -> str:
    return arg.replace(token, "<token>") if token in arg else arg


def _raise_stopped(signum: int, frame: object) -> None:
    raise Stopped(signum)


def _fitted_lenses(lm, args: argparse.Namespace) -> dict:
    """The fitted lenses offered: each ``--lens-path`` (tuned or Jacobian, whichever it holds),
    then the model's lens cache for a kind no path gave. ``ValueError`` for a path that holds
    neither."""
    from layers_core.api.prompt import cached_fitted_lenses, resolve_lens

    lenses: dict = {}
    for path in args.lens_path:
        errors = []
        for kind in ("tuned", "jacobian"):
            try:
                lenses[kind] = resolve_lens(lm, kind, path, args.allow_foreign_lens)
                break
            except (ValueError, OSError) as error:
                errors.append(f"{kind}: {error}")
        else:
            raise ValueError(f"--lens-path {path}: not a lens ({'; '.join(errors)})")

    def say(name: str, directory: str, error: Exception) -> None:
        print(f"⚠️  the {name} lens in {directory} is not offered: {error}", file=sys.stderr)

    return {**cached_fitted_lenses(lm, tuple(lenses), args.allow_foreign_lens, say), **lenses}


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)  # from now on connections wait in the backlog: the printed URL works at once
    sock.set_inheritable(True)
    return sock


def _explorer(lm, args: argparse.Namespace, token: str | None):
    """The app's ``Explorer``: the worker that owns ``lm``, the request parser, the page."""
    from functools import partial

    from layers_core.pipeline.prompts import DEFAULT_ANSWER, DEFAULT_PROMPT
    from layers_core.pipeline.sweep import SweepSettings
    from layers_core.results.html_report import explorer_page
    from layers_core.serve import explore
    from layers_core.serve.app import Explorer
    from layers_core.serve.worker import LensWorker

    lenses = explore.ExplorerLenses(_fitted_lenses(lm, args))
    base = SweepSettings(norm_strategy=args.norm)

    def compute(job: tuple) -> object:
        kind, request = job
        explore.check_length(lm, request, args.max_tokens)
        make = explore.result_zip if kind == "zip" else explore.report_data
        return make(lm, lenses, request, base)

    info = {"model": lm.source.clean_name, "lenses": lenses.names, "default_lens": args.norm,
            "max_generate": explore.MAX_GENERATE, "max_tokens": args.max_tokens,
            "prompt": DEFAULT_PROMPT, "answer": DEFAULT_ANSWER}
    worker = LensWorker(compute, args.queue_size)
    return Explorer(worker, partial(explore.parse_request, lenses=lenses), token, explorer_page(info), info)


def main(argv: list[str] | None = None, prog: str = SERVE_PROG) -> int:
    """Parses the flags, loads the model, serves until SIGTERM or Ctrl-C; returns the exit code."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    problem = _usage_error(args)
    if problem:
        parser.error(problem)
    if args.token:  # every result's provenance records argv: downloaded files must not carry the token
        sys.argv = [_redacted(arg, args.token) for arg in sys.argv]
    previous = {sig: signal.signal(sig, _raise_stopped) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return _serve(args)
    except Stopped as stop:
        name = "Ctrl-C" if stop.signum == signal.SIGINT else "SIGTERM"
        print(f"stopped ({name})", file=sys.stderr)
        return 128 + stop.signum
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _serve(args: argparse.Namespace) -> int:
    """Loads the model and serves (uvicorn, on a socket bound here so ``--port 0`` can be
    printed); a signal re-raised by uvicorn after its graceful shutdown ends it as ``Stopped``."""
    import logging

    import uvicorn

    from layers_core.app.runner import prepare_runtime
    from layers_core.model.lens_model import load
    from layers_core.model.loading import ModelLoadError
    from layers_core.serve.app import create_app

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    prepare_runtime(args.device)
    token = None if args.no_token else (args.token or secrets.token_urlsafe(24))
    try:
        lm = load(args.model, device=args.device, dtype=args.dtype)
        lm.threads = args.threads or "auto"
        explorer = _explorer(lm, args, token)
    except (ModelLoadError, ValueError, OSError) as error:
        print(f"❌ {type(error).__name__}: {str(error).splitlines()[0]}", file=sys.stderr)
        return 1
    try:
        try:
            sock = _bind(args.host, args.port)
        except OSError as error:
            print(f"❌ cannot listen on {args.host}:{args.port}: {error.strerror or error}", file=sys.stderr)
            return 1
        host, port = sock.getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        url = f"http://{shown}:{port}/" + (f"?token={token}" if token else "")
        print(f"🔭 layers-and-logits explorer on {lm.source.clean_name} ({', '.join(explorer.info['lenses'])} "
              f"lenses); open:\n    {url}\nCtrl-C stops it.", flush=True)
        config = uvicorn.Config(create_app(explorer), log_level="warning", access_log=False, lifespan="off",
                                timeout_graceful_shutdown=5)
        uvicorn.Server(config).run(sockets=[sock])
        return 0
    finally:
        explorer.worker.close()

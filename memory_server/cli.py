"""The ``memory-server`` command: parse flags, configure logging, serve until SIGTERM/SIGINT.

Exit status: 0 after a clean shutdown, 2 for bad flags or an endpoint that cannot be bound (with a
one-line message on stderr, no traceback).
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys

from .protocol import MAX_MESSAGE_BYTES
from .server import DEFAULT_BIND, BindError, ServerConfig, serve

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_bytes(text: str) -> int:
    """A positive byte count, optionally with a binary suffix: ``1048576``, ``512M``, ``8GiB``."""
    match = re.fullmatch(r"\s*(\d+)\s*([KMGT]?)(?:I?B)?\s*", text, re.IGNORECASE)
    if match is None or int(match[1]) == 0:
        raise argparse.ArgumentTypeError(
            f"expected a positive byte count like 1048576, 512M or 8G, got {text!r}")
    return int(match[1]) * _UNITS[match[2].upper()]


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="memory-server",
        description="Serve memtrans kNN memories over ZeroMQ. SIGTERM or SIGINT stops it cleanly.")
    parser.add_argument("--bind", default=DEFAULT_BIND,
                        help="ZeroMQ endpoint to listen on (default: %(default)s)")
    parser.add_argument("--threads", type=_positive_int, default=os.cpu_count() or 1,
                        help="request worker threads; as many again search the rows of one "
                             "request in parallel (default: CPU count, %(default)s)")
    parser.add_argument("--max-bytes", type=parse_bytes, default=None,
                        help="cap on the memory the memories may hold, e.g. 8G; an add that would "
                             "pass it is refused (default: no cap)")
    parser.add_argument("--max-message-bytes", type=parse_bytes, default=MAX_MESSAGE_BYTES,
                        help="refuse requests larger than this, e.g. 64M (default: %(default)s)")
    parser.add_argument("--log-level", default="INFO",
                        choices=("DEBUG", "INFO", "WARNING", "ERROR"), type=str.upper,
                        help="logging threshold (default: %(default)s)")
    parser.add_argument("--insecure", action="store_true",
                        help="allow binding a non-loopback address without CURVE authentication "
                             "(traffic is unencrypted and anyone who can connect can change "
                             "memories)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = ServerConfig(bind=args.bind, threads=args.threads, max_bytes=args.max_bytes,
                              max_message_bytes=args.max_message_bytes, insecure=args.insecure)
        serve(config)
    except (ValueError, BindError) as exc:
        print(f"memory-server: error: {exc}", file=sys.stderr)
        return 2
    return 0

"""The ``memory-server`` command: parse flags, configure logging, serve until SIGTERM/SIGINT;
and its ``keygen``, ``token`` and ``status`` subcommands.

Exit status: 0 after a clean shutdown, 2 for bad flags, an endpoint that cannot be bound or a
``--restore`` snapshot that cannot be loaded (with a one-line message on stderr, no traceback),
3 when requests were still running at the ``--drain-timeout`` deadline after SIGTERM and were
abandoned.
``status`` exits 1 when the server does not answer or refuses it; ``keygen`` and ``token`` 2 when
the file exists already.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from . import auth, health, snapshot, tenants, units
from .errors import MemoryServerError
from .metrics import INSTALL_HINT
from .protocol import MAX_MESSAGE_BYTES
from .server import DEFAULT_BIND, WIRE_DTYPES, BindError, DrainTimeout, ServerConfig, serve


def parse_bytes(text: str) -> int:
    """A positive byte count, optionally with a binary suffix: ``1048576``, ``512M``, ``8GiB``."""
    try:
        return units.parse_bytes(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _port(text: str) -> int:
    value = _positive_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"expected a TCP port in 1..65535, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="memory-server",
        description="Serve memtrans kNN memories over ZeroMQ. SIGTERM or SIGINT stops it cleanly.",
        epilog="Other commands: `memory-server keygen --out DIR` makes a CURVE key pair; "
               "`memory-server token --name NAME --out FILE` makes a tenant's token file; "
               "`memory-server status ENDPOINT` prints a running server's stats.")
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
    parser.add_argument("--wire-dtype", default=None, choices=WIRE_DTYPES,
                        help="dtype of the values in search replies; float16 halves their bytes "
                             "(keys stay float32) (default: as the namespace stores them)")
    parser.add_argument("--drain-timeout", type=_positive_float, default=10.0, metavar="SECONDS",
                        help="at SIGTERM or SIGINT, how long requests in flight may run; what is "
                             "still running then is abandoned and the exit status is 3 "
                             "(default: %(default)s)")
    parser.add_argument("--log-level", default="INFO",
                        choices=("DEBUG", "INFO", "WARNING", "ERROR"), type=str.upper,
                        help="logging threshold (default: %(default)s)")
    parser.add_argument("--data-dir", default=None,
                        help="directory for snapshots of namespaces (the snapshot and restore "
                             "ops); without it they are refused")
    parser.add_argument("--restore", action="append", default=[], metavar="NAMESPACE:TAG",
                        help="load this snapshot from --data-dir before serving (repeatable)")
    parser.add_argument("--snapshot-key-file", metavar="FILE",
                        default=os.environ.get(snapshot.KEY_ENV) or None,
                        help="a secret (mode 0600, at least 16 bytes, e.g. from head -c 32 "
                             "/dev/urandom) that keys the snapshots' checksums: a snapshot "
                             "changed without it, or written under another key or none, is "
                             "refused at restore (default: "
                             f"${snapshot.KEY_ENV}; without it checksums catch corruption only)")
    parser.add_argument("--insecure", action="store_true",
                        help="allow binding a non-loopback address without CURVE authentication "
                             "(traffic is unencrypted and anyone who can connect can change "
                             "memories)")
    curve = parser.add_argument_group(
        "CURVE authentication (required to bind a non-loopback address without --insecure)")
    curve.add_argument("--curve-secret-key", metavar="FILE",
                       help="the server's secret key file (NAME.key_secret from `memory-server "
                            "keygen`); its public key is derived from it")
    curve.add_argument("--curve-allow", metavar="FILE_OR_DIR",
                       help="client public key file (NAME.key), or a directory of them: only "
                            "these clients can connect, each a tenant NAME that sees only its "
                            "own namespaces")
    curve.add_argument("--curve-admin", metavar="FILE_OR_DIR",
                       help="admin public key file(s): these clients may connect too, see and "
                            "act on every namespace, read server-wide stats and shut the server "
                            "down")
    tokens = parser.add_argument_group(
        "tenants without CURVE (loopback and ipc binds; files of 'NAME TOKEN' lines, mode 0600, "
        "from `memory-server token`; a tenant's line may end in max_bytes=SIZE, its quota)")
    tokens.add_argument("--token-file", metavar="FILE",
                        default=os.environ.get(tenants.SERVER_TOKEN_ENV) or None,
                        help="the tenants' tokens: every request must carry one, and each "
                             "tenant sees only its own namespaces (default: "
                             f"${tenants.SERVER_TOKEN_ENV}; without it and without CURVE, every "
                             "client may do anything)")
    tokens.add_argument("--admin-token-file", metavar="FILE",
                        default=os.environ.get(tenants.SERVER_ADMIN_TOKEN_ENV) or None,
                        help="the admins' tokens: an admin sees and acts on every namespace, "
                             "reads server-wide stats and may shut the server down (default: "
                             f"${tenants.SERVER_ADMIN_TOKEN_ENV})")
    limits = parser.add_argument_group("limits (each refused with an error naming its flag)")
    limits.add_argument("--tenant-max-bytes", type=parse_bytes, default=None, metavar="SIZE",
                        help="each tenant's quota: the bytes all its namespaces may hold "
                             "together, e.g. 2G, so one tenant cannot fill --max-bytes for "
                             "all; past it an add or restore is refused with quota_exceeded. A "
                             "line 'NAME TOKEN max_bytes=SIZE' of --token-file sets that "
                             "tenant's own (default: only those lines have quotas; admins "
                             "never)")
    limits.add_argument("--max-namespaces", type=_positive_int, default=None,
                        help="namespaces open at once (default: no cap)")
    limits.add_argument("--max-memories-per-namespace", type=_positive_int, default=None,
                        help="cap on num_layers x num_rows a namespace may declare "
                             "(default: no cap)")
    limits.add_argument("--max-connections", type=_positive_int, default=None,
                        help="connections open at once; one past it is closed before its "
                             "handshake, and the open-file limit is raised to fit (default: "
                             "1024, or what the open-file limit allows)")
    limits.add_argument("--max-connections-per-host", type=_positive_int, default=None,
                        metavar="N",
                        help="connections one client host may have open at once (an IPv4 "
                             "address, an IPv6 /64; on ipc a user id), so one host cannot take "
                             "all of --max-connections; one past it is closed before its "
                             "handshake (default: no cap per host)")
    limits.add_argument("--max-inflight-bytes", type=parse_bytes, default=1 << 30,
                        help="bytes of requests being served and of replies not yet sent, all "
                             "clients together; at this many the server reads no more until "
                             "some are done (default: 1G)")
    limits.add_argument("--max-client-inflight-bytes", type=parse_bytes, default=None,
                        help="the same per connection: a request past it is refused, so a "
                             "client that does not read its replies gets nothing more run "
                             "(default: --max-message-bytes)")
    limits.add_argument("--namespace-ttl", type=_positive_float, default=None, metavar="SECONDS",
                        help="drop a namespace after this many seconds without requests "
                             "(default: never)")
    metrics = parser.add_argument_group("metrics")
    metrics.add_argument("--metrics-port", type=_port, default=None,
                         help="serve Prometheus metrics on this HTTP port (needs "
                              f"{INSTALL_HINT})")
    metrics.add_argument("--metrics-host", default="127.0.0.1",
                         help="address of the metrics port (default: %(default)s)")
    return parser


def build_keygen_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="memory-server keygen",
        description="Write a CURVE key pair: NAME.key (public: give it to the other side) and "
                    "NAME.key_secret (mode 0600: keep it).")
    parser.add_argument("--out", required=True, metavar="DIR", help="directory to write into")
    parser.add_argument("--name", default="server",
                        help="file name stem, e.g. server or client-0 (default: %(default)s)")
    return parser


def build_token_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="memory-server token",
        description="Write a new tenant token file (one 'NAME TOKEN' line, mode 0600). The "
                    "client reads it ($MEMTRANS_TOKEN_FILE); the server's --token-file (or "
                    "--admin-token-file) lists the lines of all its tenants' files.")
    parser.add_argument("--name", required=True,
                        help="the tenant name: its namespaces are NAME.* on the server")
    parser.add_argument("--out", required=True, metavar="FILE", help="the file to write")
    return parser


def build_status_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="memory-server status",
        description="Print a running server's stats; exit 1 if it does not answer.")
    parser.add_argument("endpoint", help="the server, e.g. tcp://127.0.0.1:5555")
    parser.add_argument("--timeout", type=_positive_float, default=5.0,
                        help="seconds to wait for the answer (default: %(default)s)")
    parser.add_argument("--server-key", metavar="FILE",
                        help="the server's public key file, for a CURVE server")
    parser.add_argument("--client-key", metavar="FILE",
                        help="this client's secret key file (NAME.key_secret), for a CURVE server")
    parser.add_argument("--token-file", metavar="FILE",
                        help="this client's token file, for a server with --token-file (default: "
                             f"${tenants.TOKEN_ENV}); server-wide stats need an admin's")
    return parser


def keygen_main(argv: list[str]) -> int:
    args = build_keygen_parser().parse_args(argv)
    try:
        public, secret = auth.keygen(args.out, args.name)
    except OSError as exc:
        print(f"memory-server keygen: error: {exc}", file=sys.stderr)
        return 2
    print(f"public key: {public}\nsecret key: {secret} (mode 0600)")
    return 0


def token_main(argv: list[str]) -> int:
    args = build_token_parser().parse_args(argv)
    try:
        tenants.write_token_file(args.out, args.name)
    except (OSError, ValueError) as exc:
        print(f"memory-server token: error: {exc}", file=sys.stderr)
        return 2
    print(f"token of tenant {args.name!r} written to {args.out} (mode 0600)")
    return 0


def status_main(argv: list[str]) -> int:
    args = build_status_parser().parse_args(argv)
    logging.getLogger("memory_server.client").setLevel(logging.ERROR)  # the error below says it
    try:
        token = tenants.read_client_token(args.token_file) if args.token_file else None
        stats = health.fetch_stats(args.endpoint, args.timeout, server_key=args.server_key,
                                   client_key=args.client_key, token=token)
    except (ValueError, MemoryServerError) as exc:
        print(f"memory-server status: error: {exc}", file=sys.stderr)
        return 1
    print(health.format_stats(args.endpoint, stats))
    return 0


_COMMANDS = {"keygen": keygen_main, "token": token_main, "status": status_main}


def main(argv: list[str] | None = None) -> int:
    """``memory-server keygen ...``, ``token ...`` and ``status ...`` are subcommands; anything
    else (``memory-server --bind ...``) serves, as it always has."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in _COMMANDS:
        return _COMMANDS[argv[0]](argv[1:])
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = ServerConfig(bind=args.bind, threads=args.threads, max_bytes=args.max_bytes,
                              max_message_bytes=args.max_message_bytes, insecure=args.insecure,
                              wire_dtype=args.wire_dtype, drain_timeout=args.drain_timeout,
                              data_dir=args.data_dir, restore=tuple(args.restore),
                              snapshot_key_file=args.snapshot_key_file,
                              curve_secret_key=args.curve_secret_key, curve_allow=args.curve_allow,
                              curve_admin=args.curve_admin, token_file=args.token_file,
                              admin_token_file=args.admin_token_file,
                              max_namespaces=args.max_namespaces,
                              tenant_max_bytes=args.tenant_max_bytes,
                              max_memories_per_namespace=args.max_memories_per_namespace,
                              namespace_ttl=args.namespace_ttl, metrics_port=args.metrics_port,
                              max_connections=args.max_connections,
                              max_connections_per_host=args.max_connections_per_host,
                              max_inflight_bytes=args.max_inflight_bytes,
                              max_client_inflight_bytes=args.max_client_inflight_bytes
                              or args.max_message_bytes,
                              metrics_host=args.metrics_host)
        serve(config)
    except (ValueError, BindError, MemoryServerError) as exc:
        print(f"memory-server: error: {exc}", file=sys.stderr)
        return 2
    except DrainTimeout as exc:
        print(f"memory-server: error: {exc}", file=sys.stderr)
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(3)  # the abandoned requests' threads cannot be joined: exit without them
    return 0

"""CURVE keys and authentication: who may talk to a memory server that other hosts can reach.

ZeroMQ's CURVE encrypts every connection and proves each side's public key. The server knows its
own key pair and a list of allowed client public keys; a ZAP handler thread refuses every other
client during the handshake, so a stranger gets neither a reply nor any data.

Key files are ZeroMQ certificates (the ZPL format ``zmq.auth.load_certificate`` reads):
``NAME.key`` holds the public key and may be shared; ``NAME.key_secret`` holds both keys and is
created with mode 0600.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
import zmq.utils.z85
from zmq.auth.thread import ThreadAuthenticator

from .tenants import TENANT_NAME

KeySource = bytes | str | os.PathLike
"""A key: 40 Z85 characters as bytes (as ``zmq.curve_keypair`` gives them) or as a string
prefixed with ``INLINE``; any other string or path names a certificate file holding it."""

INLINE = "z85:"
"""The prefix of a key given inline as a string. Without it, a mistyped 40-character file name
would be taken for a key and fail only at the handshake, with no error saying why."""
_Z85_KEY_LEN = 40


@dataclass(frozen=True, slots=True)
class KeyPair:
    public: bytes
    secret: bytes


def keygen(out_dir: str | os.PathLike, name: str = "server") -> tuple[Path, Path]:
    """Write a new key pair as ``out_dir/name.key`` and ``out_dir/name.key_secret`` (mode 0600);
    refuses to overwrite existing files, so a key in use is never replaced by accident."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    public, secret = zmq.curve_keypair()
    public_path, secret_path = out / f"{name}.key", out / f"{name}.key_secret"
    for path in (public_path, secret_path):
        if path.exists():
            raise FileExistsError(f"{path} already exists; remove it or choose another --name")
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    _write(secret_path, _certificate(stamp, public, secret), 0o600)
    _write(public_path, _certificate(stamp, public), 0o644)
    return public_path, secret_path


def load_key(source: KeySource, what: str) -> bytes:
    """A Z85 key given inline (bytes, or a string prefixed with ``INLINE``) or as a certificate
    file (its secret key if ``what`` says secret)."""
    if isinstance(source, bytes):
        key = source
    elif isinstance(source, str) and source.startswith(INLINE):
        key = source[len(INLINE):].encode()
    else:
        public, secret = _load_certificate(source)
        key = secret if "secret" in what else public
        if key is None:
            raise ValueError(f"{what}: {os.fspath(source)} holds no secret key; pass the "
                             f".key_secret file written by `memory-server keygen`")
    try:
        zmq.utils.z85.decode(key)
    except Exception:
        raise ValueError(f"{what} must be a 40-character Z85 key or a key file, got "
                         f"{key!r:.60}") from None
    if len(key) != _Z85_KEY_LEN:
        raise ValueError(f"{what} must be a 40-character Z85 key, got {len(key)} characters")
    return key


def load_key_pair(secret_source: KeySource, public_source: KeySource | None = None,
                  what: str = "secret key") -> KeyPair:
    """A key pair from its secret key; the public key is derived unless given."""
    secret = load_key(secret_source, what)
    public = zmq.curve_public(secret)
    if public_source is not None and load_key(public_source, "public key") != public:
        raise ValueError(f"the public key given does not belong to the {what}")
    return KeyPair(public, secret)


def load_allowed(source: str | os.PathLike, flag: str = "--curve-allow") -> dict[bytes, str]:
    """Client public keys, each named by its file (``alice.key``: tenant ``alice``): one
    certificate file, or every ``*.key`` file of a directory."""
    path = Path(source)
    if path.is_dir():
        files = sorted(path.glob("*.key"))
        if not files:
            raise ValueError(f"{flag} {path}: no *.key files in the directory; copy the "
                             f"clients' public .key files there")
    elif path.is_file():
        files = [path]
    else:
        raise ValueError(f"{flag} {path}: no such file or directory")
    keys = {}
    for f in files:
        name = f.name.removesuffix(".key")
        if not TENANT_NAME.fullmatch(name):
            raise ValueError(f"{flag} {f}: the file name is the client's tenant name, which must "
                             f"be 1 to 32 letters, digits, '_' or '-' before '.key'; rename it")
        keys[_load_certificate(f)[0]] = name
    return keys


class _AllowList:
    """ZAP credentials provider: a client is let in iff its public key is listed."""

    def __init__(self, keys: Collection[bytes]):
        self.keys = keys

    def callback(self, domain: str, key: bytes) -> bool:
        return key in self.keys


def start_authenticator(context: zmq.Context, allowed: Collection[bytes]) -> ThreadAuthenticator:
    """A ZAP handler on ``context`` admitting only ``allowed`` CURVE clients (stop() it at exit)."""
    auth = ThreadAuthenticator(context)
    auth.start()
    auth.configure_curve_callback(domain="*", credentials_provider=_AllowList(allowed))
    return auth


def make_curve_server(socket: zmq.Socket, keys: KeyPair) -> None:
    """Make ``socket`` (before it binds) a CURVE server with ``keys``."""
    socket.curve_secretkey = keys.secret
    socket.curve_publickey = keys.public
    socket.curve_server = True


def make_curve_client(socket: zmq.Socket, server_public: bytes, keys: KeyPair) -> None:
    """Make ``socket`` (before it connects) a CURVE client of the server with ``server_public``."""
    socket.curve_secretkey = keys.secret
    socket.curve_publickey = keys.public
    socket.curve_serverkey = server_public


def _load_certificate(path: KeySource) -> tuple[bytes, bytes | None]:
    try:
        return zmq.auth.load_certificate(os.fspath(path))
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read key file {os.fspath(path)!r}: {exc} (a key given inline "
                         f"is written {INLINE}KEY)") from None


def _certificate(stamp: str, public: bytes, secret: bytes | None = None) -> str:
    kind = "Secret" if secret else "Public"
    lines = [f"#   ZeroMQ CURVE {kind} Certificate, written by memory-server keygen at {stamp}",
             "#   Keep secret: whoever holds this file can act as its owner." if secret else
             "#   Give this public key to the servers (--curve-allow) or clients that need it.",
             "metadata", "curve", f'    public-key = "{public.decode()}"']
    if secret:
        lines.append(f'    secret-key = "{secret.decode()}"')
    return "\n".join(lines) + "\n"


def _write(path: Path, text: str, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, mode)  # O_CREAT's mode is masked by the umask; the secret must be 0600 exactly

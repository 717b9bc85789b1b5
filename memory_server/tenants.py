"""Tenants: which client a request comes from, and which namespaces it may name.

A server started with credentials serves named *tenants*. With CURVE a tenant is a client public
key, named by its key file (``--curve-allow DIR`` holding ``alice.key`` and ``bob.key`` admits
tenants ``alice`` and ``bob``); without CURVE (loopback and ipc binds) it is a token the client
sends in every request, named in the server's ``--token-file`` (lines ``NAME TOKEN``). Admins
(``--admin-token-file``, ``--curve-admin``) are tenants too. A request without a credential the
server knows is refused with ``Unauthorized`` before it is looked at.

Isolation is by name: tenant ``alice``'s namespace ``run`` is ``alice.run`` in the store, and
every request of a tenant is confined to names with its prefix. So no tenant can name, let alone
see, read, clear, snapshot, restore into or drop, another's namespace, and two tenants may pick
the same name without meeting. Snapshot files carry the qualified name, so a tenant can restore
only its own, and keeps them when its token is replaced (the name stays). Tenant names exclude
``.``, so the prefix is unambiguous. An admin's names are taken as they are: it sees every
namespace by its qualified name and may act on any (restore into ``alice.run``, say), and it
alone may shut the server down or read the server-wide stats.

Without any credential configured the server is open: every client is the anonymous admin, as
before tenants existed (fine for a private host; the server warns at start).

Quotas: a tenant may hold at most its quota of bytes of memories, all its namespaces together,
so that one tenant cannot fill the server's ``--max-bytes`` and starve the others. A line of the
server's token file may end in ``max_bytes=SIZE`` (``alice TOKEN max_bytes=2G``); tenants without
one get ``--tenant-max-bytes`` (with CURVE, which has no such file, that is the only quota).
The store books every namespace under its tenant's prefix (``store.py``), so an admin's restore
into ``alice.run`` counts against alice. Admins have no quota.

A token file holds one ``NAME TOKEN`` line per tenant (``#`` starts a comment); a client's file
holds its own line. Both must not be readable by other users (mode 0600), like an ssh key.
``memory-server token`` writes one.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path

from .errors import Unauthorized
from .units import parse_bytes

TENANT_NAME = re.compile(r"[A-Za-z0-9_-]{1,32}")
"""What a tenant name may be: also a prefix of snapshot file names, so no '.' or '/'."""
MIN_TOKEN_CHARS = 16
MAX_TOKEN_CHARS = 256
TOKEN_ENV = "MEMTRANS_TOKEN_FILE"
"""The client's token file when ``MemoryClient`` is given none (the trainer sets it for its own
servers)."""
SERVER_TOKEN_ENV = "MEMORY_SERVER_TOKEN_FILE"
SERVER_ADMIN_TOKEN_ENV = "MEMORY_SERVER_ADMIN_TOKEN_FILE"
"""Defaults of the server's ``--token-file`` and ``--admin-token-file``."""


@dataclass(frozen=True, slots=True)
class TokenLine:
    """One line of a token file."""

    name: str
    token: str
    max_bytes: int | None = None
    """The tenant's quota (``max_bytes=SIZE`` on its line); None: the server's default."""


@dataclass(frozen=True, slots=True)
class Tenant:
    """Who sent a request: its namespaces are ``NAME.namespace`` in the store (an admin's are
    taken as they are)."""

    name: str
    admin: bool = False

    def qualify(self, namespace: str) -> str:
        """The store's name of this tenant's ``namespace``."""
        return namespace if self.admin else f"{self.name}.{namespace}"

    def unqualify(self, qualified: str) -> str | None:
        """This tenant's name of the store's namespace ``qualified``; None if not its own."""
        if self.admin:
            return qualified
        prefix = f"{self.name}."
        return qualified[len(prefix):] if qualified.startswith(prefix) else None


ANONYMOUS = Tenant("anonymous", admin=True)
"""Every client of a server without credentials."""


def qualify(tenant: str, namespace: str) -> str:
    """The store's name of tenant ``tenant``'s ``namespace`` (e.g. for ``--restore``)."""
    return Tenant(tenant).qualify(namespace)


class Tenants:
    """The server's tenants, by token digest or CURVE key. ``open`` when there are none."""

    def __init__(self, tokens: dict[str, str] | None = None,
                 admin_tokens: dict[str, str] | None = None,
                 curve_keys: dict[bytes, str] | None = None,
                 curve_admins: dict[bytes, str] | None = None):
        """``tokens``/``admin_tokens``: name -> token; ``curve_keys``/``curve_admins``: Z85
        public key -> name."""
        self._by_token: dict[bytes, Tenant] = {}
        self._by_key: dict[bytes, Tenant] = {}
        names: set[str] = set()
        for table, admin in ((tokens or {}, False), (admin_tokens or {}, True)):
            for name, token in table.items():
                digest = _digest(token)
                if name in names or digest in self._by_token:
                    raise ValueError(f"tenant {name!r} or its token appears twice in the token "
                                     f"files; give each tenant one name and its own token")
                names.add(name)
                self._by_token[digest] = Tenant(name, admin)
        key_of: dict[str, bytes] = {}
        for table, admin in ((curve_keys or {}, False), (curve_admins or {}, True)):
            for key, name in table.items():  # a key in both lists is an admin
                if key_of.setdefault(name, key) != key:
                    raise ValueError(f"CURVE tenant name {name!r} names two keys; rename one of "
                                     f"the key files")
                self._by_key[key] = Tenant(name, admin)
        names.update(key_of)
        if self._by_token and self._by_key:
            raise ValueError("tokens and CURVE keys cannot be mixed: with CURVE the client keys "
                             "are the tenants (--curve-allow, --curve-admin)")
        self.names = frozenset(names)

    @property
    def open(self) -> bool:
        return not (self._by_token or self._by_key)

    @property
    def admins(self) -> int:
        return sum(t.admin for t in (*self._by_token.values(), *self._by_key.values()))

    def identify(self, token: str | None, curve_key: bytes | None) -> Tenant:
        """The tenant of a request; raises ``Unauthorized`` when it has no known credential."""
        if self.open:
            return ANONYMOUS
        if self._by_key:
            tenant = self._by_key.get(curve_key) if curve_key is not None else None
            if tenant is None:  # the ZAP handler admits listed keys only: not reached
                raise Unauthorized("this server admits only the CURVE keys it lists")
            return tenant
        if token is None:
            raise Unauthorized(
                "this memory server needs a token: pass MemoryClient(token=...) or point "
                f"${TOKEN_ENV} at your token file (a 'NAME TOKEN' line listed in the server's "
                "--token-file)")
        tenant = self._by_token.get(_digest(token))
        if tenant is None:
            raise Unauthorized("the token sent is not one this memory server accepts: check "
                               f"${TOKEN_ENV} (or the token given to MemoryClient) against the "
                               "server's --token-file")
        return tenant


def _digest(token: str) -> bytes:
    # Looked up by digest, not by the token: how long a lookup takes tells nothing of a token.
    return hashlib.blake2b(token.encode(), digest_size=32, person=b"memtrans-tenant").digest()


def new_token() -> str:
    return secrets.token_urlsafe(32)


def write_token_file(path: str | os.PathLike, name: str, token: str | None = None) -> str:
    """Write ``NAME TOKEN`` to a new file of mode 0600 (never over an existing one); returns the
    token."""
    _check_name(name, "tenant name")
    token = new_token() if token is None else token
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        os.fchmod(f.fileno(), 0o600)  # O_CREAT's mode is masked by the umask
        f.write(f"{name} {token}\n")
    return token


def read_token_file(path: str | os.PathLike, what: str = "--token-file") -> dict[str, str]:
    """name -> token of every ``NAME TOKEN`` line; refuses a file other users can read."""
    return {line.name: line.token for line in read_token_lines(path, what)}


def read_token_lines(path: str | os.PathLike, what: str = "--token-file") -> list[TokenLine]:
    """Every ``NAME TOKEN [max_bytes=SIZE]`` line; refuses a file other users can read."""
    path = Path(path)
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
        text = path.read_text()
    except OSError as exc:
        raise ValueError(f"{what} {path}: cannot read it: {exc.strerror or exc}") from None
    if mode & 0o077:
        raise ValueError(f"{what} {path} can be read by other users (mode {mode:04o}): run "
                         f"chmod 600 {path}")
    lines: dict[str, TokenLine] = {}
    for number, line in enumerate(text.splitlines(), 1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        where = f"{what} {path} line {number}"
        if len(fields) not in (2, 3):
            raise ValueError(f"{where}: expected 'NAME TOKEN' or 'NAME TOKEN max_bytes=SIZE', "
                             f"got {len(fields)} fields")
        name, token = fields[:2]
        _check_name(name, f"{where}: tenant name")
        if not MIN_TOKEN_CHARS <= len(token) <= MAX_TOKEN_CHARS:
            raise ValueError(f"{where}: a token must have {MIN_TOKEN_CHARS} to "
                             f"{MAX_TOKEN_CHARS} characters; make one with "
                             f"`memory-server token`")
        max_bytes = None
        if len(fields) == 3:
            option, _, size = fields[2].partition("=")
            if option != "max_bytes":
                raise ValueError(f"{where}: the third field must be max_bytes=SIZE (the "
                                 f"tenant's quota, e.g. max_bytes=2G), got {fields[2]!r:.40}")
            try:
                max_bytes = parse_bytes(size)
            except ValueError as exc:
                raise ValueError(f"{where}: max_bytes: {exc}") from None
        if name in lines:
            raise ValueError(f"{what} {path}: tenant {name!r} is listed twice")
        lines[name] = TokenLine(name, token, max_bytes)
    if not lines:
        raise ValueError(f"{what} {path} holds no 'NAME TOKEN' line")
    return list(lines.values())


def read_client_token(path: str | os.PathLike) -> str:
    """The token of a client's token file, which holds exactly one ``NAME TOKEN`` line."""
    tokens = read_token_file(path, "token file")
    if len(tokens) != 1:
        raise ValueError(f"token file {path} lists {len(tokens)} tenants; a client's file holds "
                         f"its own 'NAME TOKEN' line only")
    return next(iter(tokens.values()))


def _check_name(name: str, what: str) -> None:
    if not TENANT_NAME.fullmatch(name):
        raise ValueError(f"{what} must be 1 to 32 letters, digits, '_' or '-', got {name!r:.40}")

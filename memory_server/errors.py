"""Error types shared by the store, the server and the client.

Each error carries a stable ``code`` string: the server puts it in error replies and the client
raises the matching class again, so a caller can tell "my request was wrong" from "the server is
gone" without parsing messages.
"""

from __future__ import annotations


class MemoryServerError(Exception):
    """Base of every error of the memory service, raised in-process by the store too."""

    code = "internal"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class InvalidRequest(MemoryServerError):
    """The request was malformed or its arguments were out of range; nothing was changed."""

    code = "invalid_request"


class ProtocolError(InvalidRequest):
    """A message did not follow the wire format (see ``protocol.py``); nothing was changed.

    ``request_id`` is the id of the offending request when it could be read, else None, so the
    server can still address its error reply; ``version`` the protocol version to answer in.
    """

    code = "protocol_error"

    def __init__(self, message: str, request_id: int | None = None, version: int | None = None):
        super().__init__(message)
        self.request_id = request_id
        self.version = version


class UnknownNamespace(MemoryServerError):
    """The request named a namespace that was never opened (or was dropped or expired)."""

    code = "unknown_namespace"


class ServerRestarted(UnknownNamespace):
    """A namespace this client opened is gone because its server restarted (or another server
    took its address) since, so the memories it held there were lost. Raised by the client when
    the server answering ``unknown_namespace`` is another instance than the one that opened it;
    never sent on the wire."""


class ConfigMismatch(MemoryServerError):
    """A namespace was opened again with a configuration different from the one it has."""

    code = "config_mismatch"


class LimitExceeded(MemoryServerError):
    """A configured limit (bytes, namespaces, memories, message size) would be passed."""

    code = "limit_exceeded"


class QuotaExceeded(LimitExceeded):
    """A tenant's quota (its share of the server's bytes) would be passed. A client older than
    this code raises it as a ``MemoryServerError`` with the same message."""

    code = "quota_exceeded"


class SnapshotError(MemoryServerError):
    """A snapshot could not be written, or a snapshot on disk is missing, corrupt or foreign."""

    code = "snapshot_error"


class Unauthorized(MemoryServerError):
    """The request did not carry a credential the server accepts (a token from its
    ``--token-file``, or an allowed CURVE key), or needs an admin one; nothing was changed."""

    code = "unauthorized"


class ServerUnavailable(MemoryServerError):
    """A server did not answer within the timeout or could not be reached."""

    code = "unavailable"


ERRORS_BY_CODE: dict[str, type[MemoryServerError]] = {
    cls.code: cls
    for cls in (
        MemoryServerError,
        InvalidRequest,
        ProtocolError,
        UnknownNamespace,
        ConfigMismatch,
        LimitExceeded,
        QuotaExceeded,
        SnapshotError,
        ServerUnavailable,
        Unauthorized,
    )
}

"""``memory-server status``: a running server's stats, fetched over the protocol and printed for a
human at a terminal (the same numbers ``--metrics-port`` gives Prometheus)."""

from __future__ import annotations

from .client import MemoryClient
from .errors import ServerUnavailable


def fetch_stats(endpoint: str, timeout: float, *, server_key: str | None = None,
                client_key: str | None = None, token: str | None = None) -> dict:
    """The ``stats`` of the server at ``endpoint`` (a tenant's own part, unless it is an
    admin); ``ServerUnavailable`` if it does not answer within ``timeout`` seconds."""
    with MemoryClient(endpoint, timeout=timeout, server_public_key=server_key,
                      secret_key=client_key, token=token) as client:
        try:
            return client.stats()[0]
        except ServerUnavailable:
            hint = "" if server_key else " If it uses CURVE, pass --server-key and --client-key."
            raise ServerUnavailable(f"{endpoint} did not answer within {timeout:g} s: is a "
                                    f"memory-server running there?{hint}") from None


def _per_host(connections: dict) -> str:
    if connections.get("max_per_host") is None:
        return ""
    return (f"{connections['hosts']} hosts, {connections['refused_per_host']} refused past "
            f"{connections['max_per_host']} per host; ")


def format_stats(endpoint: str, stats: dict) -> str:
    """Stats as a few aligned lines: totals, then one line per op (an admin's only)."""
    up = f", up {_duration(stats['uptime_s'])}" if "uptime_s" in stats else ""
    lines = [
        f"memory-server {stats.get('version', '?')} at {endpoint} "
        f"(protocol v{stats.get('protocol', '?')}){up}",
        f"  namespaces {stats['namespaces']}   memories {stats['memories']}   "
        f"entries {stats['entries']}   bytes {_bytes(stats['bytes'])}",
    ]
    for name, ns in sorted(stats.get("per_namespace", {}).items()):
        lines.append(f"    {name}: {ns['memories']} memories, {ns['entries']} entries, "
                     f"{_bytes(ns['bytes'])}")
    if stats.get("quota"):
        quota = stats["quota"]
        lines.append(f"  quota: {_bytes(quota['bytes'])} of {_bytes(quota['max_bytes'])} held")
    if "requests" not in stats:
        lines.append(f"  (the namespaces of tenant {stats.get('tenant')!r}; request counts are "
                     f"for an admin's token or key)")
        return "\n".join(lines)
    connections = stats.get("connections")
    if connections is not None:
        lines.append(f"  connections {connections['open']} of {connections['max']} open, "
                     f"{connections['refused']} refused; {_per_host(connections)}log lines "
                     f"suppressed "
                     f"{stats.get('log_lines_suppressed', 0)}")
    requests = stats["requests"]
    lines.append(f"  {'op':<10} {'requests':>10} {'errors':>8} {'p50 ms':>9} {'p99 ms':>9}")
    for op, r in sorted(requests.items()):
        lines.append(f"  {op:<10} {r['count']:>10} {r['errors']:>8} {r['p50_ms']:>9.3f} "
                     f"{r['p99_ms']:>9.3f}")
    if not requests:
        lines.append("  (no requests yet)")
    return "\n".join(lines)


def _bytes(n: float) -> str:
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    i = 0
    while n >= 1024 and i < len(units) - 1:
        n, i = n / 1024, i + 1
    return f"{n:.0f} B" if i == 0 else f"{n:.1f} {units[i]}"


def _duration(seconds: float) -> str:
    minutes, s = divmod(int(seconds), 60)
    hours, m = divmod(minutes, 60)
    days, h = divmod(hours, 24)
    return f"{days}d {h:02d}:{m:02d}:{s:02d}" if days else f"{h:02d}:{m:02d}:{s:02d}"

"""Prometheus text for a memory server's stats (``--metrics-port``), so clusters can scrape and
alert on it without speaking the ZeroMQ protocol.

prometheus-client is optional (``pip install 'memtrans[metrics]'``); the values are read from the
same stats the ``stats`` op returns at every scrape, so the two never disagree.
"""

from __future__ import annotations

from collections.abc import Callable

INSTALL_HINT = "pip install 'memtrans[metrics]'"


def require() -> None:
    """Raise ValueError naming the install command if prometheus-client is missing."""
    try:
        import prometheus_client  # noqa: F401
    except ImportError:
        raise ValueError(f"--metrics-port needs prometheus-client, which is not installed: "
                         f"{INSTALL_HINT}") from None


_GAUGES = (
    ("memtrans_namespaces", "namespaces", "Namespaces open"),
    ("memtrans_memories", "memories", "Memories allocated"),
    ("memtrans_entries", "entries", "Live entries in all memories"),
    ("memtrans_bytes", "bytes", "Bytes the memories hold"),
    ("memtrans_uptime_seconds", "uptime_s", "Seconds since the server started"),
)


class _StatsCollector:
    """Turns one ``stats`` dict into metric families at each scrape."""

    def __init__(self, stats: Callable[[], dict]):
        self._stats = stats

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        stats = self._stats()
        for name, key, doc in _GAUGES:
            yield GaugeMetricFamily(name, doc, value=stats[key])
        requests = CounterMetricFamily("memtrans_requests", "Requests answered", labels=["op"])
        errors = CounterMetricFamily("memtrans_request_errors", "Requests answered with an error",
                                     labels=["op"])
        latency = GaugeMetricFamily("memtrans_request_latency_seconds",
                                    "Receipt-to-reply latency over the recent requests",
                                    labels=["op", "quantile"])
        for op, r in sorted(stats["requests"].items()):
            requests.add_metric([op], r["count"])
            errors.add_metric([op], r["errors"])
            latency.add_metric([op, "0.5"], r["p50_ms"] / 1000)
            latency.add_metric([op, "0.99"], r["p99_ms"] / 1000)
        yield from (requests, errors, latency)
        connections = stats["connections"]
        yield GaugeMetricFamily("memtrans_connections", "Connections open",
                                value=connections["open"])
        yield CounterMetricFamily("memtrans_connections_refused", "Connections shut down past "
                                  "--max-connections", value=connections["refused"])
        yield CounterMetricFamily("memtrans_connections_refused_per_host", "Connections shut "
                                  "down past --max-connections-per-host",
                                  value=connections["refused_per_host"])


def serve_metrics(port: int, host: str, stats: Callable[[], dict]):
    """Serve ``stats()`` as Prometheus text on ``http://host:port/metrics`` from a daemon thread;
    returns the HTTP server (``shutdown()`` it at exit). Raises OSError if the port is taken."""
    from prometheus_client import CollectorRegistry, start_http_server

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_StatsCollector(stats))
    server, _ = start_http_server(port, addr=host, registry=registry)
    return server

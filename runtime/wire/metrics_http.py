"""Serving a Prometheus registry over HTTP, shared by the coordinator and the nodes so both fail the same readable way."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, start_http_server

from runtime.core.errors import SpeedError

# Step latencies run from a fraction of a millisecond (a tiny stage on a GPU) to seconds (a long prefill on a CPU).
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def serve_registry(registry: CollectorRegistry, host: str, port: int, *, what: str) -> None:
    """Expose `registry` at http://host:port/metrics from a daemon thread; `what` names it in the error ("node metrics")."""
    host = host.strip("[]")  # "[::1]" as written in an address means the IPv6 host "::1"
    try:
        start_http_server(port, addr=host, registry=registry)
    except OSError as e:
        shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        raise SpeedError(f"cannot serve {what} on {shown}: {e.strerror or e}; "
                         "free the port or change metrics_port in the cluster file") from e

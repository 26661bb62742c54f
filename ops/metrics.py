"""Prometheus metrics exported by the stream worker (names follow Prometheus conventions)."""
from __future__ import annotations

from prometheus_client import Counter, Gauge, start_http_server

EVENTS_IN = Counter("liber_events_in_total", "Behaviour records read from the input topic")
EVENTS_PROCESSED = Counter("liber_events_processed_total",
                           "Behaviour records applied to user state", ["outcome"])
DEAD_LETTERED = Counter("liber_dead_lettered_total", "Records sent to a dead-letter topic",
                        ["topic", "reason"])
PARTITIONS_CLOSED = Counter("liber_partitions_closed_total", "UBSP partitions closed", ["rule"])
ITEMS_LOADED = Counter("liber_items_loaded_total", "Catalogue records stored in the items table")
OPEN_CACHES = Gauge("liber_open_caches", "Users with a non-empty open cache on this worker")


def serve(host: str, port: int) -> None:
    """Expose /metrics on host:port (0 disables)."""
    if port:
        start_http_server(port, addr=host)


def scrape(url: str, name: str, **labels: str) -> float:
    """Sum of the samples of metric `name` at a /metrics URL whose labels include `labels`."""
    import urllib.request
    body = urllib.request.urlopen(url, timeout=5).read().decode()
    total = 0.0
    for line in body.splitlines():
        if line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        metric, _, label_text = head.partition("{")
        if metric == name and all(f'{k}="{v}"' in label_text for k, v in labels.items()):
            total += float(value)
    return total

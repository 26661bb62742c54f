"""`liber status`: a terminal view of a running pipeline.

- consumer lag per group and partition, in records and seconds behind (from Kafka, ops/lag.py);
- each metrics endpoint's throughput over a short window, LLM tokens and cost so far, dead
  letters, queue depth (from the processes' /metrics);
- the last partition closes (the tail of `partitions.closed`).
Either source may be down: what cannot be read is said, the rest is shown.
"""
from __future__ import annotations

import time
import urllib.request
from collections import defaultdict
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

# Counters shown as a rate over the window, and totals shown as they are (name -> label).
RATES = {"liber_events_in_total": "events in", "liber_records_in_total": "in",
         "liber_records_out_total": "out"}
TOTALS = {"liber_partitions_closed_total": "partitions closed",
          "liber_dead_lettered_total": "dead-lettered",
          "liber_llm_dead_lettered_total": "dead-lettered (llm)",
          "liber_fusion_dead_lettered_total": "dead-lettered (fusion)",
          "liber_llm_calls_total": "LLM calls", "liber_llm_tokens_in_total": "LLM tokens in",
          "liber_llm_tokens_out_total": "LLM tokens out", "liber_llm_cost_total": "LLM cost",
          "liber_llm_errors_total": "LLM errors", "liber_llm_summaries_total": "summaries",
          "liber_fusion_vectors_published_total": "vectors published"}
GAUGES = {"liber_open_caches": "open caches", "liber_llm_queue_depth": "LLM queue depth",
          "liber_llm_budget_tokens_used": "LLM budget used (60 s)",
          "liber_recovery_remaining_records": "to restore"}
BY_LABEL = {"liber_partitions_closed_total": "rule", "liber_dead_lettered_total": "reason",
            "liber_llm_calls_total": "outcome", "liber_records_in_total": "topic",
            "liber_records_out_total": "topic"}


def default_urls(settings) -> list[str]:
    if not settings.metrics_port:
        return []
    host = "127.0.0.1" if settings.metrics_host in ("0.0.0.0", "::", "") else settings.metrics_host
    return [f"http://{host}:{settings.metrics_port}/metrics"]


def scrape(url: str, timeout: float = 5.0) -> dict[str, dict[tuple, float]]:
    """{sample name: {sorted label items: value}} of one /metrics endpoint."""
    text = urllib.request.urlopen(url, timeout=timeout).read().decode("utf-8")
    out: dict[str, dict[tuple, float]] = defaultdict(dict)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[sample.name][tuple(sorted(sample.labels.items()))] = sample.value
    return out


@dataclass
class Endpoint:
    url: str
    error: str = ""
    rates: dict[str, float] = field(default_factory=dict)   # "events in", "out <topic>" -> /s
    totals: dict[str, float] = field(default_factory=dict)  # "LLM cost", "partitions closed max_events"
    gauges: dict[str, float] = field(default_factory=dict)


def _split(name: str, samples: dict[tuple, float], title: str) -> dict[str, float]:
    """Sum a metric's samples, split by one label when BY_LABEL names one."""
    key = BY_LABEL.get(name)
    out: dict[str, float] = defaultdict(float)
    for labels, value in samples.items():
        part = dict(labels).get(key) if key else None
        out[f"{title} {part}" if part else title] += value
    return dict(out)


def read_endpoints(urls: list[str], window_s: float) -> list[Endpoint]:
    """Scrape every endpoint, wait `window_s`, scrape again: rates over the window, and the
    totals and gauges of the second scrape."""
    endpoints = [Endpoint(url) for url in urls]
    first = {}
    for e in endpoints:
        try:
            first[e.url] = scrape(e.url)
        except OSError as exc:
            e.error = f"unreachable: {exc}"
    if first:
        time.sleep(window_s)
    for e in endpoints:
        if e.error:
            continue
        try:
            second = scrape(e.url)
        except OSError as exc:
            e.error = f"unreachable: {exc}"
            continue
        for name, title in RATES.items():
            before = _split(name, first[e.url].get(name, {}), title)
            for key, value in _split(name, second.get(name, {}), title).items():
                e.rates[key] = max(0.0, value - before.get(key, 0.0)) / window_s
        for name, title in TOTALS.items():
            if name in second:
                e.totals.update(_split(name, second[name], title))
        for name, title in GAUGES.items():
            if name in second:
                e.gauges[title] = sum(second[name].values())
    return endpoints


@dataclass(frozen=True)
class Close:
    timestamp: float  # when the partition was published (Kafka timestamp)
    user_id: str
    seq: int
    reason: str
    events: int
    end_ts: float


def recent_closes(settings, n: int, timeout_s: float = 5.0) -> list[Close]:
    """The last `n` records of partitions.closed, newest first."""
    from kafka import TopicPartition

    from core.kafka import make_consumer
    from core.records import ClosedPartition, InvalidRecord, decode
    from core.topics import PARTITIONS_CLOSED
    name = settings.topic(PARTITIONS_CLOSED)
    consumer = make_consumer(settings, enable_auto_commit=False, allow_auto_create_topics=False,
                             client_id=f"{settings.app_id}-status")
    try:
        tps = [TopicPartition(name, p) for p in sorted(consumer.partitions_for_topic(name) or ())]
        if not tps or n <= 0:
            return []
        consumer.assign(tps)
        ends, starts = consumer.end_offsets(tps), consumer.beginning_offsets(tps)
        for tp in tps:
            consumer.seek(tp, max(starts[tp], ends[tp] - n))
        records, deadline = [], time.monotonic() + timeout_s
        while time.monotonic() < deadline and any(consumer.position(tp) < ends[tp] for tp in tps):
            for batch in consumer.poll(timeout_ms=200).values():
                records.extend(r for r in batch if r.offset < ends[TopicPartition(r.topic, r.partition)])
    finally:
        consumer.close()
    closes = []
    # newest first: by publication time, then position (records of one batch share a time)
    for rec in sorted(records, key=lambda r: (r.timestamp, r.partition, r.offset), reverse=True):
        try:
            part = decode(ClosedPartition, rec.value, key=rec.key, max_bytes=settings.max_payload_bytes)
        except InvalidRecord:
            continue  # the LLM worker dead-letters it; not a close to show
        closes.append(Close(rec.timestamp / 1000.0, part.user_id, part.seq, part.reason,
                            len(part.events), part.end_ts))
    return closes[:n]


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ts))


def _number(value: float) -> str:
    return f"{value:,.0f}" if float(value).is_integer() else f"{value:,.4g}"


def render(lag_rows, lag_error: str, endpoints: list[Endpoint], closes, closes_error: str,
           now: float) -> str:
    lines = ["== consumer lag (from Kafka)"]
    if lag_error:
        lines.append(f"  cannot read: {lag_error}")
    elif not lag_rows:
        lines.append("  no LIBER topics found")
    else:
        lines.append(f"  {'group':<28} {'topic':<32} {'part':>4} {'committed':>10} {'end':>10} "
                     f"{'lag':>8} {'behind':>10}")
        for r in lag_rows:
            committed = "-" if r.committed is None else str(r.committed)
            lines.append(f"  {r.group:<28} {r.topic:<32} {r.partition:>4} {committed:>10} "
                         f"{r.end:>10} {r.lag:>8} {r.seconds_behind(now):>9.1f}s")
        totals: dict[str, int] = defaultdict(int)
        for r in lag_rows:
            totals[r.group] += r.lag
        lines.append("  total lag: " + ", ".join(f"{g} {n}" for g, n in totals.items()))
    lines.append("== processes (metrics endpoints)")
    if not endpoints:
        lines.append("  none given (--metrics URL, or LIBER_METRICS_PORT)")
    for e in endpoints:
        lines.append(f"  {e.url}: {e.error or 'up'}")
        if e.error:
            continue
        for key, value in sorted(e.rates.items()):
            lines.append(f"    {key}: {value:,.1f}/s")
        for key, value in sorted({**e.totals, **e.gauges}.items()):
            lines.append(f"    {key}: {_number(value)}")
    lines.append("== recent partition closes (partitions.closed)")
    if closes_error:
        lines.append(f"  cannot read: {closes_error}")
    elif not closes:
        lines.append("  none yet")
    for c in closes:
        lines.append(f"  {_when(c.timestamp)}  user {c.user_id} seq {c.seq}: {c.events} events, "
                     f"{c.reason}, last event {_when(c.end_ts)}")
    return "\n".join(lines)


def run(settings, urls: list[str] | None = None, window_s: float = 2.0, closes: int = 10,
        kafka: bool = True) -> str:
    """The status text (see the module doc)."""
    from ops.lag import LagReader, pipeline_groups
    lag_rows, lag_error, recent, closes_error = [], "", [], ""
    if kafka:
        try:
            reader = LagReader(settings, client_id=f"{settings.app_id}-status")
            try:
                lag_rows = reader.read(pipeline_groups(settings))
            finally:
                reader.close()
        except Exception as exc:  # noqa: BLE001 - show what can be shown
            lag_error = repr(exc)
        try:
            recent = recent_closes(settings, closes)
        except Exception as exc:  # noqa: BLE001
            closes_error = repr(exc)
    endpoints = read_endpoints(urls or default_urls(settings), window_s)
    return render(lag_rows, lag_error if kafka else "skipped (--no-kafka)", endpoints, recent,
                  closes_error if kafka else "skipped (--no-kafka)", time.time())

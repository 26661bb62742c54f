"""Prometheus metrics of the fusion worker (UIF), served on settings.metrics_port.

Freshness runs from the moment the partition closed (the Kafka timestamp of its
`partitions.closed` record, carried in the summary as `closed_at`) to the vector's publication:
the LLM queue and generation plus fusion. Summaries without `closed_at` are not observed
(`liber_fusion_freshness_unknown_total`).
"""
from __future__ import annotations

from prometheus_client import Counter, Histogram

RECORDS_IN = Counter("liber_fusion_records_in_total", "Records read, by logical topic", ["topic"])
PUBLISHED = Counter("liber_fusion_vectors_published_total",
                    "InterestVector records produced to user-interests (own: from the user's "
                    "summaries; collective: a cold user's cluster vector; republished: stored "
                    "bytes sent again after a redelivery)", ["kind"])
SKIPPED = Counter("liber_fusion_skipped_total", "Input records with nothing to do "
                  "(older: a seq below the user's newest; known: a partition of a known user)",
                  ["reason"])
FRESHNESS = Histogram("liber_freshness_seconds",
                      "Partition close to interest vector publication", ["kind"],
                      buckets=(0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800, 3600, 21600))
FRESHNESS_UNKNOWN = Counter("liber_fusion_freshness_unknown_total",
                            "Vectors published from summaries without closed_at")
ERRORS = Counter("liber_fusion_errors_total", "Failures by kind (invalid_record, "
                 "invalid_partition, invalid_collective, model, restore_timeout)", ["kind"])
DEAD_LETTERED = Counter("liber_fusion_dead_lettered_total", "Records sent to summaries.dlq",
                        ["reason"])
SEND_FAILURES = Counter("liber_fusion_send_failures_total", "Sends refused by the client or broker, "
                        "by logical topic and what followed (retried, dead_lettered, "
                        "resent_without_value, lost: logged with the input's coordinates)",
                        ["topic", "outcome"])
BATCH_USERS = Histogram("liber_fusion_batch_users", "Users encoded per model call",
                        buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512))
MODEL_SECONDS = Counter("liber_fusion_model_seconds_total", "Seconds spent in the interest model")
RESTORED = Counter("liber_fusion_restored_total",
                   "Input records replayed into local state after an assignment")

"""The lifelong protocol: late samples, windows, partitions strictly before each sample."""
from __future__ import annotations

import numpy as np

from models import ctr_data, lifelong_data
from models.ctr_data import Catalog, UserHistory
from models.lifelong_data import AggregateTable, LifelongConfig
from streams import ubsp


def catalog(n: int) -> Catalog:
    ids = [str(i) for i in range(1, n + 1)]
    return Catalog("test", {i: k for k, i in enumerate(ids, 1)},
                   np.zeros((n + 1, 1), dtype=np.int64), ["Drama"],
                   {i: f"Movie {i} (1990) [Drama]" for i in ids})


def history(user: str, n: int) -> UserHistory:
    # two ratings share each second, so "strictly before" differs from "earlier in the list"
    h = UserHistory(user, [str(i % 30 + 1) for i in range(n)],
                    [5.0 if i % 3 else 2.0 for i in range(n)], [1000 + i // 2 for i in range(n)])
    ctr_data.partition_user(h, ubsp.CloseRules(max_events=5, max_gap_s=10**9,
                                                      max_span_s=10**9))
    return h


def test_samples_come_late_and_see_only_the_past():
    cfg = LifelongConfig(min_ratings=10, max_history=40, sample_share=0.25, window=4,
                         long_window=12)
    h = lifelong_data.cut(history("u1", 60), cfg.max_history)
    ctr_data.partition_user(h, ubsp.CloseRules(max_events=5, max_gap_s=10**9,
                                                      max_span_s=10**9))
    assert len(h.ts) == 40 and len(h.partitions) == 8
    s = lifelong_data.build_samples([h], catalog(30), cfg)
    assert len(s) == 10 and list(s.ts) == h.ts[30:]          # the last quarter
    ends = [p.end_ts for p in h.partitions]
    for row in range(len(s)):
        t = s.ts[row]
        before = [i for i, ts in enumerate(h.ts) if ts < t]
        expect = [int(h.item_ids[i]) for i in before[-cfg.long_window:]]
        assert [x for x in s.hist[row] if x] == expect            # item index = id here
        assert s.known[row] == sum(e < t for e in ends)           # strictly before
    short = lifelong_data.with_window(s, cfg.window)
    assert short.hist.shape == (10, 4) and np.array_equal(short.hist, s.hist[:, -4:])
    assert lifelong_data.partitions_needed(h) == max(s.known)


def test_aggregate_vectors_use_only_closed_partitions_and_weigh_ratings():
    h = history("u1", 20)          # 4 partitions of 5
    dim = 3
    vectors = {str(i): np.eye(dim)[i % dim] for i in range(1, 31)}
    table = AggregateTable(2, vectors, dim)
    table.add_user(h, depth=3)
    parts, cascaded = table.states["u1", 0]
    assert parts == [0, 0] and cascaded == 0                  # nothing closed yet: no vector
    parts, cascaded = table.states["u1", 3]
    matrix = table.matrix()
    assert parts[0] != 0 and parts[1] != 0 and cascaded != 0
    # the newest partition first; every vector is unit length
    assert np.allclose(np.linalg.norm(matrix[[parts[0], parts[1], cascaded]], axis=1), 1)
    events = [e for p in h.partitions[:3] for e in p.events]
    w = np.array([e.value - 3 for e in events])
    v = np.stack([vectors[e.item_id] for e in events])
    expect = (w[:, None] * v).sum(0) / np.abs(w).sum()
    assert np.allclose(matrix[cascaded], expect / np.linalg.norm(expect))
    assert table.states["u1", 3][0][1] == table.states["u1", 2][0][0]

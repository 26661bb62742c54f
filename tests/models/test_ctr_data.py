"""The CTR protocol: labels, user splits, and no leakage of behaviour at or after a sample."""
import numpy as np

from models import ctr_data
from models.ctr_data import Catalog, UserHistory, VectorTable
from models.prepare import item_text_summaries
from streams.ubsp import CloseRules

N_ITEMS = 40


def _catalog() -> Catalog:
    ids = [str(i) for i in range(1, N_ITEMS + 1)]
    return Catalog("synthetic", {i: n for n, i in enumerate(ids, 1)},
                   np.ones((N_ITEMS + 1, 1), dtype=np.int64), ["Drama"],
                   {i: f"Movie-{int(i):04d} (1990) [Drama]" for i in ids})


def _user(user_id: str, ts: list[int], first_item: int) -> UserHistory:
    items = [str(first_item + n) for n in range(len(ts))]  # every rating a different item
    ratings = [float(1 + (n * 3) % 5) for n in range(len(ts))]
    return UserHistory(user_id, items, ratings, ts)


def _histories():
    rules = CloseRules(max_events=3, max_gap_s=1000.0, max_span_s=10 ** 9)
    # u1: the third rating closes partition 0 *with* it (max_events) in the same second as the
    # fourth rating: a `<=` instead of `<` would hand the 4th rating a partition holding a
    # rating of its own second. u2: a gap close (before the new event), ties in one second.
    users = [_user("u1", [10, 20, 30, 30, 40, 50, 60, 70, 80, 90], 1),
             _user("u2", [10, 10, 10, 2000, 2000, 2010, 5000, 5001, 5002, 5003], 15)]
    for h in users:
        ctr_data.partition_user(h, rules)
    return users


def _titles_at_or_after(h: UserHistory, ts: int, catalog: Catalog) -> set[str]:
    return {catalog.text[i].split(" ")[0] for i, t in zip(h.item_ids, h.ts) if t >= ts}


def test_samples_and_vectors_use_only_behaviour_strictly_before_the_sample():
    catalog = _catalog()
    users = _histories()
    depth = 2
    samples = ctr_data.build_samples(users, catalog, depth, history_len=8)
    assert len(samples) > 0
    table = VectorTable(k=2)
    summaries = {}
    for h in users:
        summaries[h.user_id] = item_text_summaries(ctr_data.batch_partitions(h, catalog, depth))
        table.add_user(h.user_id, summaries[h.user_id], depth)
    parts, cascaded = table.lookup(samples)
    index_item = {v: k for k, v in catalog.item_index.items()}
    checked_vectors = 0
    for row in range(len(samples)):
        h = users[samples.user[row]]
        ts = int(samples.ts[row])
        # history: only ratings with ts < sample ts, and with their true ratings
        hist_items = [index_item[i] for i in samples.hist[row] if i]
        assert all(h.ts[h.item_ids.index(i)] < ts for i in hist_items)
        assert len(hist_items) == sum(t < ts for t in h.ts)
        # summaries/vectors: no title of a rating at or after the sample time
        forbidden = _titles_at_or_after(h, ts, catalog)
        texts = [table.texts[i - 1] for i in [*parts[row], cascaded[row]] if i]
        assert texts, "every sample has at least one partition behind it"
        for text in texts:
            assert not any(title in text for title in forbidden), (h.user_id, ts, text)
        checked_vectors += 1
        # and every partition used ended strictly before the sample
        assert all(end < ts for end in h.end_ts()[: samples.known[row]])
    assert checked_vectors == len(samples)


def test_same_second_ratings_are_not_behind_each_other():
    catalog = _catalog()
    u1 = _histories()[0]
    assert [p.end_ts for p in u1.partitions][:2] == [30, 50]
    samples = ctr_data.build_samples([u1], catalog, depth=2, history_len=8)
    # the 4th rating (ts 30) has partition 0 (ending at ts 30) not yet behind it: no sample
    assert 30 not in samples.ts.tolist()
    first = samples.ts.tolist().index(40)
    assert samples.known[first] == 1
    assert (samples.hist[first] > 0).sum() == 4  # ts 10, 20, 30, 30


def test_labels_and_known_counts():
    catalog = _catalog()
    users = _histories()
    samples = ctr_data.build_samples(users, catalog, depth=2, history_len=4)
    assert set(samples.known.tolist()) <= {1, 2}
    # labels are rating > 3, row by row
    u2 = users[1]
    rows = [r for r in range(len(samples)) if samples.user[r] == 1]
    expected = [1.0 if r > 3 else 0.0 for r, t in zip(u2.ratings, u2.ts)
                if t > u2.partitions[0].end_ts and t <= u2.partitions[2].end_ts]
    assert samples.label[rows].tolist() == expected


def test_user_split_is_disjoint_and_seeded():
    ids = [str(i) for i in range(100)]
    hist = {i: UserHistory(i, [], [], []) for i in ids}
    order = ctr_data.shuffled_users(hist, seed=3)
    assert order == ctr_data.shuffled_users(dict(reversed(list(hist.items()))), seed=3)
    assert order != ctr_data.shuffled_users(hist, seed=4)
    split = ctr_data.split_users(order[:20])
    assert [len(split[s]) for s in ("train", "val", "test")] == [14, 3, 3]
    assert not set(split["train"]) & set(split["test"]) and not set(split["val"]) & set(split["test"])

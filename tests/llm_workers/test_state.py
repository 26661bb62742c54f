"""RocksDB state of the LLM worker: atomic finish, summary window, restore, offsets."""
from __future__ import annotations

from llm_workers.state import KEEP_SUMMARIES, Store


def test_finish_keeps_a_window_of_summaries_and_survives_reopen(tmp_path):
    store = Store(tmp_path / "db")
    for seq in range(KEEP_SUMMARIES + 3):
        store.finish("u/1", seq, {"seq": seq, "summary": f"s{seq}"}, f"bytes{seq}".encode(),
                     prompt={"seq": seq, "user": f"p{seq}"}, history=[["t", "rate", 4.0]] * seq)
    last = KEEP_SUMMARIES + 2
    assert store.summary_bytes("u/1", last) == f"bytes{last}".encode()
    assert store.summary_bytes("u/1", 2) is None and store.summary_bytes("u/1", 3) is not None
    store.close()
    store = Store(tmp_path / "db")
    assert store.user("u/1") == {"seq": last, "summary": f"s{last}"}
    assert store.last_prompt("u/1")["user"] == f"p{last}" and len(store.history("u/1")) == last
    assert store.user("u") is None  # no prefix confusion between user ids


def test_restore_applies_only_newer_summaries(tmp_path):
    store = Store(tmp_path / "db")
    assert store.restore("a", 0, b"v0", "first")
    assert not store.restore("a", 0, b"other", "other")
    assert store.restore("a", 1, b"v1", "second")
    assert store.user("a")["summary"] == "second" and store.summary_bytes("a", 0) == b"v0"
    assert store.restore_offset(3) == 0
    store.put_restore_offsets({3: 17})
    assert store.restore_offset(3) == 17
    store.put_cluster("Action|Crime", {"users": 2})
    assert store.cluster("Action|Crime") == {"users": 2}
    store.close()

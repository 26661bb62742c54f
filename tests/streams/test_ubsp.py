from streams.ubsp import ACCEPTED, DUPLICATE, LATE, CloseRules, add_event, new_state, sweep

# every cache closes by the gap rule here (min_gap_events=1); the size floor has its own tests
RULES = CloseRules(max_events=3, max_gap_s=100.0, max_span_s=1000.0, max_lateness_s=50.0,
                   dedup_window=4, min_gap_events=1)


def feed(state, events, rules=RULES, user="u"):
    closed, outcomes = [], []
    for eid, ts in events:
        outcome, parts = add_event(state, user, eid, "i" + eid, "rate", ts, 1.0, rules)
        outcomes.append(outcome)
        closed.extend(parts)
    return outcomes, closed


def ids(part):
    return [e.event_id for e in part.events]


def test_max_events_closes_with_the_event():
    state = new_state()
    _, closed = feed(state, [("a", 0), ("b", 10), ("c", 20), ("d", 30)])
    assert [(p.seq, ids(p), p.reason) for p in closed] == [(0, ["a", "b", "c"], "max_events")]
    assert [e.event_id for e in state["events"]] == ["d"] and state["seq"] == 1


def test_max_gap_closes_before_the_event():
    _, closed = feed(new_state(), [("a", 0), ("b", 50), ("c", 151)])
    assert [(ids(p), p.reason, p.start_ts, p.end_ts) for p in closed] == [
        (["a", "b"], "max_gap", 0, 50)]


def test_max_span_closes_an_old_cache():
    rules = CloseRules(max_events=100, max_gap_s=100.0, max_span_s=250.0, max_lateness_s=50.0)
    _, closed = feed(new_state(), [("a", 0), ("b", 90), ("c", 180), ("d", 270)], rules)
    assert [(ids(p), p.reason) for p in closed] == [(["a", "b", "c"], "max_span")]


def test_duplicates_are_counted_once_even_after_close():
    state = new_state()
    outcomes, closed = feed(state, [("a", 0), ("a", 1), ("b", 2), ("c", 3), ("b", 4)])
    assert outcomes == [ACCEPTED, DUPLICATE, ACCEPTED, ACCEPTED, DUPLICATE]
    assert [ids(p) for p in closed] == [["a", "b", "c"]]


def test_a_cache_longer_than_the_dedup_window_still_finds_its_duplicates():
    rules = CloseRules(max_events=10, max_gap_s=100.0, max_span_s=1000.0, dedup_window=2,
                       min_gap_events=1)
    state = new_state()
    outcomes, closed = feed(state, [("a", 0), ("b", 1), ("c", 2), ("a", 3), ("c", 4)], rules)
    assert state["recent"] == ["b", "c"]  # "a" left the window but is still in the cache
    assert outcomes == [ACCEPTED, ACCEPTED, ACCEPTED, DUPLICATE, DUPLICATE] and not closed


def test_lateness_within_bound_joins_in_time_order_beyond_is_late():
    state = new_state()
    outcomes, closed = feed(state, [("a", 100), ("b", 200), ("c", 170), ("d", 100)])
    assert outcomes == [ACCEPTED, ACCEPTED, ACCEPTED, LATE]
    assert [ids(p) for p in closed] == [["a", "c", "b"]]


def test_late_event_does_not_fake_a_gap():
    rules = CloseRules(max_events=10, max_gap_s=100.0, max_span_s=1e6, max_lateness_s=50.0)
    state = new_state()
    _, closed = feed(state, [("a", 0), ("b", 90), ("c", 60), ("d", 150)], rules)
    assert closed == []  # d is 60s after b, the newest event, not 90s after c


def test_sweep_closes_quiet_users():
    state = new_state()
    feed(state, [("a", 0), ("b", 10)])
    assert sweep(state, "u", 100.0, RULES) is None
    part = sweep(state, "u", 111.0, RULES)
    assert ids(part) == ["a", "b"] and part.reason == "max_gap" and state["events"] == []
    assert sweep(state, "u", 10_000.0, RULES) is None


FLOOR = CloseRules(max_events=10, max_gap_s=100.0, max_span_s=1000.0, max_lateness_s=50.0,
                   dedup_window=4, min_gap_events=3)


def test_a_cache_below_the_gap_floor_stays_open_and_the_next_session_joins_it():
    state = new_state()
    _, closed = feed(state, [("a", 0), ("b", 10), ("c", 500), ("d", 900), ("e", 1200)], FLOOR)
    # a and b are two events: the gap before c does not close them; c joins them and the
    # gap before d finds three (the floor): closed without d
    assert [(ids(p), p.reason) for p in closed] == [(["a", "b", "c"], "max_gap")]
    assert [e.event_id for e in state["events"]] == ["d", "e"]


def test_max_span_still_closes_a_cache_below_the_floor():
    state = new_state()
    _, closed = feed(state, [("a", 0), ("b", 1500)], FLOOR)
    assert [(ids(p), p.reason) for p in closed] == [(["a"], "max_span")]


def test_sweep_leaves_a_small_quiet_cache_open_until_its_span_ends():
    state = new_state()
    feed(state, [("a", 0), ("b", 10)], FLOOR)
    assert sweep(state, "u", 500.0, FLOOR) is None  # past the gap, below the floor
    part = sweep(state, "u", 1001.0, FLOOR)
    assert ids(part) == ["a", "b"] and part.reason == "max_span"


def test_sequence_numbers_grow_without_gaps():
    state = new_state()
    _, closed = feed(state, [(str(i), i) for i in range(10)])
    assert [p.seq for p in closed] == [0, 1, 2]

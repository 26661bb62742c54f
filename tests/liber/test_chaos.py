"""The soak's event plan (`liber chaos --soak`): growing or fixed population. The soak itself
is a load run (`liber chaos --soak`), not a test."""
import pytest

from liber.chaos import soak_events, users_seen
from streams import movielens
from tests.conftest import base_settings


@pytest.fixture(scope="module")
def ml1m():
    data_dir = movielens.fetch(base_settings().home, datasets=("ml-1m",), log=lambda m: None)
    return movielens.load_ratings(data_dir["ml-1m"], "ml-1m")


def test_fixed_population_soak_repeats_the_same_users_in_laps(ml1m):
    events, laps = soak_events(ml1m, 40_000, users=50)
    population = {e.user_id for e in events if "#" not in e.event_id}
    assert len(events) == 40_000 and len(population) == 50
    assert {e.user_id for e in events} == population  # no new users in later laps
    assert laps == 1 + max(int(e.event_id.rsplit("#", 1)[1]) for e in events if "#" in e.event_id)
    assert laps > 2 and len({e.event_id for e in events}) == len(events)
    seen = users_seen(events)
    assert seen[-1] == 50 and seen[len(events) // 2] == 50


def test_growing_population_soak_is_ml1m_in_time_order(ml1m):
    events, laps = soak_events(ml1m, 20_000)
    assert laps == 1 and all("#" not in e.event_id for e in events)
    assert [e.ts for e in events] == sorted(e.ts for e in events)
    seen = users_seen(events)
    assert seen[0] == 0 and seen[-1] == len({e.user_id for e in events})
    assert all(a <= b for a, b in zip(seen, seen[1:])) and seen[-1] > seen[len(seen) // 2]

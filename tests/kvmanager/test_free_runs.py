from __future__ import annotations

import itertools
import random

from kvmanager.allocator import best_fit, first_free
from kvmanager.free_runs import FreeRuns


def _free_set(runs: FreeRuns) -> set[int]:
    return {b for s, n in runs.runs() for b in range(s, s + n)}


def test_take_and_put_merge_runs() -> None:
    runs = FreeRuns(10)
    assert list(runs.runs()) == [(0, 10)]
    assert runs.take(0, 4) == [0, 1, 2, 3]
    runs.take_block(6)
    assert list(runs.runs()) == [(4, 2), (7, 3)]
    runs.put(6)
    assert list(runs.runs()) == [(4, 6)]
    runs.put(2)
    runs.put(3)
    assert list(runs.runs()) == [(2, 8)]
    assert runs.num_free == 8 and runs.largest() == 8 and runs.is_free(9) and not runs.is_free(1)


def test_random_ops_keep_runs_maximal() -> None:
    rng = random.Random(1)
    runs = FreeRuns(200)
    free = set(range(200))
    for _ in range(2000):
        if free and rng.random() < 0.5:
            b = rng.choice(sorted(free))
            runs.take_block(b)
            free.discard(b)
        else:
            used = sorted(set(range(200)) - free)
            if used:
                b = rng.choice(used)
                runs.put(b)
                free.add(b)
        assert _free_set(runs) == free
        spans = list(runs.runs())
        assert all(a[0] + a[1] < b[0] for a, b in itertools.pairwise(spans))


def test_best_fit_picks_smallest_fitting_run() -> None:
    runs = FreeRuns(100, all_free=False)
    for b in [*range(0, 10), *range(20, 23), *range(40, 45)]:
        runs.put(b)
    # runs: (0,10) (20,3) (40,5); 4 blocks -> the 5-run, not the 10-run, flush with its end
    assert best_fit(runs, 4, last=None) == [41, 42, 43, 44]


def test_best_fit_extends_in_place_first() -> None:
    runs = FreeRuns(100, all_free=False)
    for b in [*range(10, 12), *range(50, 60)]:
        runs.put(b)
    # the sequence ends at block 9: blocks 10, 11 continue it in place, the rest best-fits
    assert best_fit(runs, 5, last=9)[:2] == [10, 11]


def test_best_fit_with_expected_size_reserves_room() -> None:
    runs = FreeRuns(100, all_free=False)
    for b in [*range(0, 4), *range(10, 30)]:
        runs.put(b)
    # needs 2 now but expects 8: the 4-run would force a later split, so take the 20-run;
    # the 8-block extent sits flush with the run's end, leaving its head [10, 22) free
    assert best_fit(runs, 2, last=None, want=8) == [22, 23]
    assert runs.run_at(10) == 12 and runs.run_at(24) == 6


def test_scattered_fallback_takes_largest_runs() -> None:
    runs = FreeRuns(20, all_free=False)
    for b in [0, 1, 5, 6, 7, 12]:
        runs.put(b)
    got = best_fit(runs, 5, last=None)
    assert sorted(got) == [0, 1, 5, 6, 7] and runs.num_free == 1


def test_first_free_takes_lowest_ids() -> None:
    runs = FreeRuns(20, all_free=False)
    for b in [3, 9, 10, 11, 15]:
        runs.put(b)
    assert first_free(runs, 3) == [3, 9, 10]

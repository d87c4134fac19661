"""benchmarks/ray_item_cost.py: both paths deliver every item through a real local Ray."""

from benchmarks.ray_item_cost import run, table


def test_both_paths_deliver_every_item_and_report_per_item_costs() -> None:
    res = run(items=40, rounds=1)
    assert set(res["median"]) == {"ray_item", "socket_frame"}
    for m in res["median"].values():
        assert m["wall_us"] > 0 and m["caller_cpu_us"] >= 0 and m["actor_cpu_us"] >= 0
    assert "| ray_item |" in table(res)

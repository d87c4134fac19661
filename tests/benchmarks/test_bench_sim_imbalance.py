"""sim_imbalance: gpu_ab's plan with a shared header in front of every prompt, and the
imbalance it reports."""

from __future__ import annotations

from benchmarks.gpu_ab import PLAN
from benchmarks.sim.calibration import load_calibration
from benchmarks.sim.cluster import SimConfig
from benchmarks.sim_imbalance import CALIBRATION, planned_workload, replay
from benchmarks.workloads import Workload, build_workload


def test_header_leads_every_prompt_and_keeps_conversations_chained() -> None:
    w = planned_workload("multi_turn_chat", 0, 2, 3)
    plain = build_workload("multi_turn_chat", 0, PLAN["multi_turn_chat"][0])
    header = w.requests[0].prompt_blocks[:3]
    assert all(r.prompt_blocks[:3] == header for r in w.requests)
    ids = {c for r in plain.requests for c in r.prompt_blocks + r.output_blocks}
    assert not ids & set(header)  # fresh ids: the header matches nothing of the workload's
    by_id = {r.request_id: r for r in w.requests}
    child = next(r for r in w.requests if r.parent_id)
    parent = by_id[child.parent_id]  # type: ignore[index]
    assert child.prompt_blocks[: len(parent.prompt_blocks)] == parent.prompt_blocks
    rate = PLAN["multi_turn_chat"][1]
    first = min(plain.requests, key=lambda r: r.arrival_s)
    assert by_id[first.request_id].arrival_s == first.arrival_s / rate


def test_replay_reports_routed_prompt_tokens_per_replica() -> None:
    w = planned_workload("b2b_saas", 0, 2, 3)
    w = Workload(w.name, w.seed, w.requests[:24], w.params, w.stages,
                 w.kv_blocks_per_replica, w.block_size)
    cfg = SimConfig(num_replicas=2, policy="tinyserve", model=load_calibration(CALIBRATION),
                    num_blocks=19_521, reference=True)
    out = replay(cfg, w, trace=5)
    assert sum(out["prompt_tokens_per_replica"]) == sum(
        len(r.prompt_blocks) * w.block_size for r in w.requests)
    assert out["imbalance"] >= 1.0 and len(out["trace"]) == 5
    assert {c["replica_id"] for c in out["trace"][0]["candidates"]} == {"r000", "r001"}

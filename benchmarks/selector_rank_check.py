"""Same Selects before and after an index change: replay seeded random workloads through
``SelectorCore`` and record every answer, then compare two trees' records.

Workloads (each seeded, on a fake clock so pending marks expire the same way in both runs):
- ``fleet``: 64 replicas, 128-block chains on 2 replicas each (the benchmark's layout), with
  random removals, stores and clears between Selects;
- ``overlap``: 300 replicas (5 mask words): a shared prefix held by 1..300 replicas, partial
  prefixes, blocks gaining and losing holders (3 <-> 4+), host-tier copies, replicas leaving
  and rejoining (slot reuse), AllBlocksCleared;
- ``churn``: 12 replicas, a small hash space (every block held by many replicas, rows
  crossing between inline and overflow all the time).
Every Select is made with the tinyserve policy (the compiled path, speculative marks on) and
with every baseline policy (the ``Candidates`` path); the record is each answer's replica ids,
scores and matched / pending blocks, plus index counts (resident and pending per replica,
unique blocks). The tinyserve Selects go in as ``SelectRequest`` bytes, as the servicer and
the fast lane serve them: ``core.select_wire`` where the tree has it (the compiled
bytes-in/bytes-out path), else ``wire.decode_select`` -> ``core.select`` ->
``wire.encode_select``; their records are read back from the answer's bytes.

    PYTHONPATH=<tree> python benchmarks/selector_rank_check.py --out /tmp/after.json
    python benchmarks/selector_rank_check.py --compare /tmp/before.json /tmp/after.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np


class _Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _answer(sel: Any) -> list[Any]:
    return [(r.replica_id, repr(r.score), r.terms.num_matched_blocks, r.terms.num_pending_blocks)
            for r in sel.ranked]  # fmt: skip


def _wire_answer(core: Any, raw: bytes) -> list[Any]:
    """The record of a Select served from its bytes (see the module docstring)."""
    from cluster.selector import wire
    from protos import cache_selection_pb2 as pb

    if hasattr(core, "select_wire"):
        body = core.select_wire(raw)
    else:
        req, cands, policy, k, spec = wire.decode_select(raw, core.config.max_prompt_blocks)
        body = wire.encode_select(core.select(req, cands, policy, k, spec))
    msg = pb.SelectResponse.FromString(body)
    return [(r.replica_id, repr(r.score), r.terms.num_matched_blocks, r.terms.num_pending_blocks)
            for r in msg.replicas]  # fmt: skip


def _run(
    name: str, seed: int, num_replicas: int, space: int, steps: int, copies: int = 0
) -> list[Any]:
    from cluster.selector.core import CoreConfig, SelectorCore
    from cluster.selector.policy import policy_names
    from cluster.selector.types import SelectionRequest
    from kvmanager.events import AllBlocksCleared, BlockRemoved, BlockStored
    from protos import cache_selection_pb2 as pb

    rng = np.random.default_rng(seed)
    clock = _Clock()
    core = SelectorCore(CoreConfig(stale_after_s=1e9, pending_ttl_s=0.5), clock=clock)
    ids = [f"r{i}" for i in range(num_replicas)]
    seq = dict.fromkeys(ids, -1)
    for i, rid in enumerate(ids):
        core.join(rid, node_id=f"n{i % 7}", num_blocks=4096)
    # NOTE: hashes as chains of a small space, some >= 2^63 (the uint64 fold)
    base = rng.integers(0, 1 << 63, space, dtype=np.int64).tolist()
    base = [h | (1 << 63) if i % 5 == 0 else h for i, h in enumerate(base)]

    def chain(start: int, n: int) -> list[int]:
        return [base[(start + j) % space] for j in range(n)]

    def send(rid: str, ev: Any) -> None:
        seq[rid] += 1
        r = core.apply_events(rid, seq[rid], [ev])
        assert r.applied, (rid, r)

    for c in range(space // 128 if copies else 0):
        for j in range(copies):  # NOTE: chain c on replicas c, c + 1, ... (selector_fixture)
            send(ids[(c + j) % num_replicas], BlockStored(chain(128 * c, 128), None, [], 16))
    shared = chain(0, 48)
    holders = rng.choice(num_replicas, int(rng.integers(1, num_replicas + 1)), replace=False)
    for s in holders.tolist():
        send(ids[s], BlockStored(shared[: int(rng.integers(1, 49))], None, [], 16))
    policies = policy_names()
    out: list[Any] = []
    for step in range(steps):
        op = rng.random()
        rid = ids[int(rng.integers(num_replicas))]
        start, n = int(rng.integers(space)), int(rng.integers(1, 64))
        if op < 0.35:
            medium = "CPU" if rng.random() < 0.15 else "GPU"
            send(rid, BlockStored(chain(start, n), None, [], 16, medium=medium))
        elif op < 0.55:
            medium = "CPU" if rng.random() < 0.15 else "GPU"
            send(rid, BlockRemoved(chain(start, n), medium=medium))
        elif op < 0.58:
            send(rid, AllBlocksCleared())
        elif op < 0.61:
            core.leave(rid)
            core.join(rid, node_id="n0", num_blocks=4096)
            seq[rid] = -1
        elif op < 0.63:
            clock.t += 0.3
            core.expire_stale()
        else:
            take = int(rng.integers(0, 49))
            prompt = shared[:take] + chain(start, n)
            req = SelectionRequest(f"{name}{step}", prompt, 16 * len(prompt), origin_node_id="n1")
            cands = [] if rng.random() < 0.7 else [ids[int(x)] for x in rng.integers(0, num_replicas, 9)]
            raw = pb.SelectRequest(request_id=req.request_id, block_hashes=prompt,
                                   num_prompt_tokens=req.num_prompt_tokens,
                                   origin_node_id=req.origin_node_id,
                                   candidate_replica_ids=cands, max_results=8)  # fmt: skip
            out.append(_wire_answer(core, raw.SerializeToString()))
            pol = policies[step % len(policies)]
            out.append([pol, _answer(core.select(req, cands, pol, 8, speculative=False))])
            clock.t += 0.01
        if step % 97 == 0:
            st = {r.replica_id: (r.num_resident_blocks, r.num_pending_blocks)
                  for r in core.list_replicas()}  # fmt: skip
            out.append(["stats", core.stats().num_unique_blocks, sorted(st.items())])
    return out


def _fleet(seed: int) -> list[Any]:
    """The benchmark's layout at 64 replicas, then the random mix on top."""
    return _run("fleet", seed, 64, 64 * 128, 3000, copies=2)


WORKLOADS = {
    "fleet": lambda seed: _fleet(seed),
    "overlap": lambda seed: _run("overlap", seed, 300, 400, 4000),
    "churn": lambda seed: _run("churn", seed, 12, 60, 4000),
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--compare", type=Path, nargs=2)
    ns = p.parse_args(argv)
    if ns.compare:
        a, b = (json.loads(x.read_text()) for x in ns.compare)
        bad = [k for k in a if a[k] != b.get(k)]
        n = sum(len(v) for v in a.values())
        print(f"{len(a)} runs, {n} records: {'identical' if not bad else f'DIFFER in {bad}'}")
        return 1 if bad or a.keys() != b.keys() else 0
    res = {f"{w}/{s}": fn(s) for w, fn in WORKLOADS.items() for s in range(ns.seeds)}
    text = json.dumps(res)
    if ns.out:
        ns.out.write_text(text)
    n = sum(len(v) for v in res.values())
    print(f"{len(res)} runs, {n} records")
    return 0


if __name__ == "__main__":
    sys.exit(main())

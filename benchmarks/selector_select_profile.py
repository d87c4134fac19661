"""Where one Select's time goes in the serving process's conditions (issue 19).

Builds the benchmark's index in this process (``selector_fixture._populate``: R replicas x
``--blocks-per-replica``, 2-copy 128-block chains), then serves raw ``SelectRequest`` bytes
the way the fast lane and the gRPC servicer do: ``core.select_wire`` (one compiled call from
request bytes to answer bytes, ``cluster/selector/wire_select.py``) where the tree has it,
else (or with ``--three-step``) ``wire.decode_select`` -> ``core.select`` ->
``wire.encode_select``; twice per run:

- ``hot``: back to back (the caches keep the Select's code and data);
- ``cold``: ``--evict-mib`` MiB written between calls, the proxy for the RPC work between
  Selects in the serving process (README "Fifth pass": 8 MiB reproduces its ~135 us).

With ``--rate`` R the core runs on a simulated clock that moves 1/R s per Select, and
R x (pending TTL + 1 s) Selects run first, so the speculative marks expire as they do in a
server taking R Selects/s (each Select then drains ~one earlier Select's marks). NOTE: on the
wall clock (``--rate 0``, the default) a run is over before the first mark's 2 s TTL, so it
leaves that expiry out: ~25 us of a ~67 us kernel at 2,500 Selects/s (README "Eighth pass").

Each step is timed by a wrapper around it (a wrapper adds ~0.1-0.3 us hot; the figures are
for comparing steps, the end-to-end column is timed without wrappers): on the three-step
path decode, select, rank_fast, the kernel, the route and encode; on the fused path the
kernel (``wire_select_kernel.select_wire``) and the Python around it. Both report
"total - kernel", the Python a Select costs. It also counts the compiled (numba) dispatches
a Select makes from Python and the arguments of each call.

    python benchmarks/selector_select_profile.py --replicas 256 --json /tmp/profile.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.selector_fixture import BLOCK_SIZE, CHAIN_BLOCKS, _populate, prompts


class _StepClock:
    """A clock that moves 1/rate s each time ``_pass`` serves a Select (``--rate``)."""

    def __init__(self, rate: float) -> None:
        self.t, self.step = 1000.0, 1.0 / rate

    def __call__(self) -> float:
        return self.t


def _timed(fn: Callable[..., Any], name: str, acc: dict[str, list[float]]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t = time.perf_counter()
        out = fn(*args, **kwargs)
        acc[name].append(time.perf_counter() - t)
        return out

    return wrapper


def _server(core: Any, max_blocks: int, fused: bool, clock: _StepClock | None = None,
            defer: bool = False) -> Callable[[bytes], bytes]:  # fmt: skip
    """What the front ends run on one request's bytes (``clock``: moved first, each call;
    ``defer``: the gRPC servicer's answer-first Select, whose route the caller then flushes)."""
    from cluster.selector import wire

    def three_steps(raw: bytes) -> bytes:
        req, cands, policy, k, spec = wire.decode_select(raw, max_blocks)
        return wire.encode_select(core.select(req, cands, policy, k, spec))

    def answer_first(raw: bytes) -> bytes:
        return bytes(core.select_wire(raw, defer=True))

    base: Callable[[bytes], bytes] = (
        (answer_first if defer else core.select_wire) if fused else three_steps)
    if clock is None:
        return base

    def ticking(raw: bytes) -> bytes:
        clock.t += clock.step
        return base(raw)

    return ticking


def _dispatch_counts(serve: Callable[[bytes], bytes], raws: list[bytes]) -> dict[str, Any]:
    """Compiled calls made from Python by one Select: every numba dispatcher in the
    ``cluster.selector`` modules' globals is wrapped with a counter for one call, then put
    back. NOTE: compiled callers froze their callees at compile time, so only calls from
    Python are counted (the ones that pay numba's type dispatch)."""
    from numba.core.registry import CPUDispatcher

    # NOTE: compile first: a kernel typed while the globals are wrapped would fail
    serve(raws[-1])
    calls: dict[str, list[int]] = defaultdict(list)
    patched: list[tuple[Any, str, Any]] = []
    for name, mod in list(sys.modules.items()):
        if not name.startswith("cluster.selector") or mod is None:
            continue
        for attr, val in list(vars(mod).items()):
            if isinstance(val, CPUDispatcher):

                def counting(*a: Any, _f: Any = val, _n: str = val.py_func.__qualname__) -> Any:
                    calls[_n].append(len(a))
                    return _f(*a)

                patched.append((mod, attr, val))
                setattr(mod, attr, counting)
    try:
        serve(raws[0])
    finally:
        for mod, attr, val in patched:
            setattr(mod, attr, val)
    return {
        "num_dispatches": sum(len(v) for v in calls.values()),
        "calls": {n: {"count": len(v), "num_args": v[0]} for n, v in calls.items()},
    }


def _pass(core: Any, raws: list[bytes], evict: np.ndarray | None, max_blocks: int,
          steps: bool, fused: bool, clock: _StepClock | None,
          defer: bool = False) -> dict[str, list[float]]:  # fmt: skip
    from cluster.selector import select_kernel, wire, wire_select, wire_select_kernel

    acc: dict[str, list[float]] = defaultdict(list)
    undo: list[tuple[Any, str, Any]] = []

    def wrap(owner: Any, attr: str, name: str) -> None:
        undo.append((owner, attr, getattr(owner, attr)))
        setattr(owner, attr, _timed(getattr(owner, attr), name, acc))

    if steps and fused:
        # NOTE: the bound entry point where the tree has it (pass 9: one structref argument)
        kname = ("select_wire_bound" if hasattr(wire_select_kernel, "select_wire_bound")
                 else "select_wire")  # fmt: skip
        wrap(wire_select_kernel, kname, "kernel")
        if hasattr(wire_select, "_entry_point"):
            # NOTE: session 14: the overload's entry point, fetched after a dispatch; the
            # wrapped fetch times it (set aside now, re-fetched on the next call, put back)
            real = wire_select._entry_point
            undo.append((wire_select, "_entry_point", real))
            wire_select._entry_point = lambda args: _timed(real(args), "kernel", acc)
            core._wire._entry = None
    elif steps:
        # NOTE: the compiled call the fast path makes (select_bound since the bound arrays)
        kname = "select_bound" if hasattr(select_kernel, "select_bound") else "rank_and_route"
        wrap(select_kernel, kname, "kernel")
        wrap(core._ranker, "rank_fast", "rank_fast")
        wrap(core, "_route", "route")
        wrap(core, "select", "select")
        wrap(wire, "decode_select", "decode")
        wrap(wire, "encode_select", "encode")
    serve = _server(core, max_blocks, fused, clock, defer)
    try:
        for raw in raws:
            if evict is not None:
                evict += 1  # NOTE: writes every byte: the RPC work's proxy
            t = time.perf_counter()
            serve(raw)
            acc["total"].append(time.perf_counter() - t)
            if defer:  # NOTE: the owed route, after the answer (not in "total")
                t = time.perf_counter()
                core.flush()
                acc["flush after the answer"].append(time.perf_counter() - t)
    finally:
        for owner, attr, val in reversed(undo):
            if owner is core or owner is core._ranker:
                delattr(owner, attr)
            else:
                setattr(owner, attr, val)
        if hasattr(core, "_wire") and hasattr(core._wire, "_entry"):
            core._wire._entry = None
    return acc


def _summary(acc: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    out = {k: _pct(v) for k, v in acc.items()}
    if "kernel" in acc:
        out["total - kernel"] = _pct(np.subtract(acc["total"], acc["kernel"]))
    if "rank_fast" in acc:
        derived = {
            "select - rank_fast - route": np.subtract(
                np.subtract(acc["select"], acc["rank_fast"]), acc["route"]),
            "rank_fast - kernel": np.subtract(acc["rank_fast"], acc["kernel"]),
            "total - select - decode - encode": np.subtract(
                acc["total"], np.add(np.add(acc["select"], acc["decode"]), acc["encode"])),
        }  # fmt: skip
        for k, v in derived.items():
            out[k] = _pct(v)
    return out


def _pct(v: Any) -> dict[str, float]:
    return {"p50_us": float(np.percentile(v, 50) * 1e6),
            "p99_us": float(np.percentile(v, 99) * 1e6)}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--replicas", type=int, default=256)
    p.add_argument("--blocks-per-replica", type=int, default=100_000)
    p.add_argument("--num-requests", type=int, default=1500)
    p.add_argument("--evict-mib", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--rate", type=float, default=0.0,
                   help="Selects/s of a simulated clock (0: the wall clock); see the docstring")
    p.add_argument("--defer", action="store_true",
                   help="the gRPC servicer's Select: select_wire(defer=True), then flush() "
                   "timed apart (\"total\" is the answer alone)")
    p.add_argument("--three-step", action="store_true",
                   help="profile decode -> core.select -> encode even where select_wire exists")
    ns = p.parse_args(argv)

    from cluster.selector.core import CoreConfig, SelectorCore
    from protos import cache_selection_pb2 as pb

    clock = _StepClock(ns.rate) if ns.rate > 0 else None
    core = SelectorCore(CoreConfig(stale_after_s=1e9), **({"clock": clock} if clock else {}))
    num_chains = _populate(core, ns.replicas, ns.blocks_per_replica, 2)
    mb = core.config.max_prompt_blocks
    steady = int(ns.rate * (core.config.pending_ttl_s + 1.0))
    ps = prompts(8 * ns.num_requests + steady, num_chains, ns.seed + 1)
    raws = [pb.SelectRequest(request_id=f"p{i}", block_hashes=h,
                             num_prompt_tokens=CHAIN_BLOCKS * BLOCK_SIZE,
                             max_results=4).SerializeToString()
            for i, h in enumerate(ps)]  # fmt: skip
    fused = hasattr(core, "select_wire") and not ns.three_step
    defer = ns.defer and fused
    serve = _server(core, mb, fused, clock, defer)
    for raw in raws[8 * ns.num_requests :]:
        serve(raw)  # NOTE: --rate: the marks' steady state (none on the wall clock)
        if defer:
            core.flush()
    dispatch = _dispatch_counts(serve, raws)
    evict = np.zeros(ns.evict_mib << 20, np.uint8)
    res: dict[str, Any] = {"meta": {"argv": sys.argv[1:], "path": "fused" if fused else "three-step",
                                    "rate": ns.rate, "steady_selects": steady,
                                    "defer": defer},
                           "dispatch": dispatch}  # fmt: skip
    n, at = ns.num_requests, 0
    # NOTE: two rounds, alternating modes; the first round's warm-up figures are dropped.
    # Every pass has its own prompts (no pass meets the previous one's pending marks).
    for rnd in range(2):
        for mode, ev in (("hot", None), ("cold", evict)):
            for steps in (False, True):
                acc = _pass(core, raws[at : at + n], ev, mb, steps, fused, clock, defer)
                at += n
                if rnd:
                    res[f"{mode}{'_steps' if steps else ''}"] = _summary(acc)
    print(json.dumps(dispatch, indent=1))
    for key in ("hot", "cold"):
        print(f"{key}: end to end p50 {res[key]['total']['p50_us']:.1f} us, "
              f"p99 {res[key]['total']['p99_us']:.1f} us")  # fmt: skip
        for step, v in res[key + "_steps"].items():
            print(f"  {step:34s} p50 {v['p50_us']:7.1f}  p99 {v['p99_us']:7.1f}")
    if ns.json is not None:
        ns.json.write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

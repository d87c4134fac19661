"""What one call into a compiled (numba) function costs from Python, hot and cold.

The Select fast path makes one compiled call of ~45 arguments per Select. Is it worth packing
the arguments into fewer (a tuple, a structref) to cut numba's type dispatch? Empty kernels,
each called 2,500 times back to back ("hot") and with ``--evict-mib`` MiB written before every
call ("cold", the proxy for the RPC work between Selects in the serving process):

- ``args45``: 30 arrays + 15 scalars (the shape of ``select_kernel.select_bound``);
- ``args45_entry``: the same through ``overloads[sig].entry_point`` (no type dispatch);
- ``args18``: 5 arrays + 13 scalars (all the arrays behind one pointer table);
- ``tuple30``: the 30 arrays as one tuple, + 1 array + 1 scalar;
- ``structref30``: the 30 arrays as fields of one structref, + 1 array + 1 scalar;
- ``args1`` / ``args0``: one array / nothing; ``python0``: an empty Python function.

    python benchmarks/numba_dispatch_cost.py --json benchmarks/results/numba_dispatch_cost.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from numba import njit, types
from numba.experimental import structref


@structref.register
class _StType(types.StructRef):
    def preprocess_fields(self, fields: Any) -> Any:
        return tuple((n, types.unliteral(t)) for n, t in fields)


class _St(structref.StructRefProxy):  # type: ignore[misc]
    pass


_NAMES = [f"a{i}" for i in range(30)]
structref.define_proxy(_St, _StType, _NAMES)

_A = ", ".join(f"a{i}" for i in range(30))
_S = ", ".join(f"s{i}" for i in range(15))
_S13 = ", ".join(f"s{i}" for i in range(13))
_ns: dict[str, Any] = {}
# NOTE: generated signatures (45 named parameters); the bodies read two of them
exec(f"def args45({_A}, {_S}):\n    return a0[0] + a29[0] + s0\n", _ns)
exec(f"def args18(a0, a1, a2, a3, a4, {_S13}):\n    return a0[0] + a4[0] + s0\n", _ns)
args45 = njit(nogil=True)(_ns["args45"])
args18 = njit(nogil=True)(_ns["args18"])


@njit(nogil=True)
def tuple30(t: Any, h: Any, x: float) -> float:
    return t[0][0] + t[29][0] + h[0] + x  # type: ignore[no-any-return]


@njit(nogil=True)
def structref30(s: Any, h: Any, x: float) -> float:
    return s.a0[0] + s.a29[0] + h[0] + x  # type: ignore[no-any-return]


@njit(nogil=True)
def args1(h: Any) -> float:
    return h[0]  # type: ignore[no-any-return]


@njit(nogil=True)
def args0() -> int:
    return 1


def python0() -> int:
    return 1


def _time(call: Callable[[], Any], evict: np.ndarray | None, n: int) -> dict[str, float]:
    ts = []
    for _ in range(n + 500):
        if evict is not None:
            evict += 1  # NOTE: writes every byte
        t = time.perf_counter()
        call()
        ts.append(time.perf_counter() - t)
    a = np.asarray(ts[500:]) * 1e6  # NOTE: the first 500 are warm-up
    return {"p50_us": float(np.percentile(a, 50)), "p99_us": float(np.percentile(a, 99))}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--calls", type=int, default=2500)
    p.add_argument("--evict-mib", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", type=Path, default=None)
    ns = p.parse_args(argv)
    arrs = [np.zeros(100 + i) for i in range(30)]
    h = np.zeros(128, np.uint64)
    scal = (1.0, 2, 3, True, False, 4.0, 5.0, 6, 7, 8, True, 9.0, 10, 11, 12)
    a45, a18 = (*arrs, *scal), (*arrs[:5], *scal[:13])
    tup, st = tuple(arrs), _St(*arrs)
    entry = None
    calls: dict[str, Callable[[], Any]] = {
        "args45": lambda: args45(*a45),
        "args45_entry": lambda: entry(*a45),  # type: ignore[misc]
        "args18": lambda: args18(*a18),
        "tuple30": lambda: tuple30(tup, h, 1.0),
        "structref30": lambda: structref30(st, h, 1.0),
        "args1": lambda: args1(h),
        "args0": lambda: args0(),
        "python0": lambda: python0(),
    }
    args45(*a45)
    entry = args45.overloads[args45.signatures[0]].entry_point
    for c in calls.values():
        c()
    evict = np.zeros(ns.evict_mib << 20, np.uint8)
    rounds: list[dict[str, dict[str, dict[str, float]]]] = []
    for _ in range(ns.rounds):
        rounds.append({name: {"hot": _time(c, None, ns.calls), "cold": _time(c, evict, ns.calls)}
                       for name, c in calls.items()})  # fmt: skip
    med = {name: {m: float(np.median([r[name][m]["p50_us"] for r in rounds]))
                  for m in ("hot", "cold")} for name in calls}  # fmt: skip
    print(f"{'call':14s} {'hot p50 us':>11s} {'cold p50 us':>12s}  (median of {ns.rounds} rounds)")
    for name, v in med.items():
        print(f"{name:14s} {v['hot']:11.2f} {v['cold']:12.2f}")
    if ns.json is not None:
        ns.json.write_text(json.dumps({"meta": {"argv": sys.argv[1:]}, "p50_median": med,
                                       "rounds": rounds}, indent=1))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

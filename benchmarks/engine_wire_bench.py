"""What one engine step costs on the wire between the engine-core process and the replica.

For a step of ``--outputs`` outputs (one new token each, as at decode), best of ``--repeats``:

- child_encode: ``RequestOutput`` -> ``WireOutput`` rows -> one msgpack ``Step`` frame;
- parent_decode: the frame -> ``RequestOutput`` objects (what the replica's GIL pays per step);
- dataclass_decode: the baseline, msgspec decoding ``list[RequestOutput]`` straight into the
  dataclasses (map form, field names on the wire).

    python benchmarks/engine_wire_bench.py --json /tmp/engine_wire.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import msgspec

from replicas.engine_core_wire import Outbound, Step, from_wire, to_wire
from replicas.outputs import RequestMetrics, RequestOutput


def best_us(fn: Callable[[], Any], repeats: int, inner: int = 100) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        times.append((time.perf_counter() - t0) / inner)
    return 1e6 * min(times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--outputs", type=int, default=256)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    outs = [
        RequestOutput(f"cmpl-{i:032x}", [1234], " word", False, None, 1024, 0, 17, None,
                      RequestMetrics(0.001, 0.05, None))
        for i in range(args.outputs)
    ]
    enc = msgspec.msgpack.Encoder()
    dec = msgspec.msgpack.Decoder(Outbound)
    frame = enc.encode(Step([to_wire(o) for o in outs], [], 1.0, 2.0))
    plain = enc.encode(outs)
    plain_dec = msgspec.msgpack.Decoder(list[RequestOutput])
    rows = {
        "child_encode": (best_us(lambda: enc.encode(Step([to_wire(o) for o in outs], [], 1.0,
                                                          2.0)), args.repeats), len(frame)),
        "parent_decode": (best_us(lambda: [from_wire(w) for w in dec.decode(frame).outputs],
                                  args.repeats), len(frame)),
        "dataclass_decode": (best_us(lambda: plain_dec.decode(plain), args.repeats), len(plain)),
    }
    base = rows["dataclass_decode"][0]
    print(f"{'path':<18}{'us/step':>10}{'ns/output':>11}{'bytes/output':>14}{'vs baseline':>13}")
    results = []
    for name, (us, size) in rows.items():
        n = args.outputs
        print(f"{name:<18}{us:>10.0f}{1e3 * us / n:>11.0f}{size / n:>14.1f}{us / base:>13.2f}")
        results.append({"path": name, "us_per_step": us, "ns_per_output": 1e3 * us / n,
                        "bytes_per_output": size / n, "vs_dataclass_decode": us / base})
    if args.json:
        args.json.write_text(json.dumps({"benchmark": "engine_wire", "outputs": args.outputs,
                                         "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""GPU timing helpers shared by the GPU benchmarks: CUDA-event timing (eager or as CUDA-graph
replays, inputs rotated past L2), device-to-device copy bandwidth, host-side profiling."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable

import torch


def rotations(nbytes: int) -> int:
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 64 << 20)
    return max(1, min(8, math.ceil(3 * l2 / max(nbytes, 1))))


def time_ms(fn: Callable[[int], object], rot: int, iters: int, reps: int, graph: bool) -> float:
    """Median milliseconds per call of fn(i) (i = rotation index)."""
    for i in range(rot):
        fn(i)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    if graph:
        g = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn(0)  # warm-up on the side stream, as torch recommends before capture
        torch.cuda.current_stream().wait_stream(stream)
        with torch.cuda.graph(g):
            for k in range(iters):
                fn(k % rot)
        g.replay()
        run: Callable[[], object] = g.replay
    else:

        def run() -> None:
            for k in range(iters):
                fn(k % rot)

        run()
    times = []
    for _ in range(reps):
        start.record()
        run()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / iters)
    return statistics.median(times)


def copy_tbps(nbytes: int, iters: int, reps: int, dtype: torch.dtype = torch.bfloat16) -> float:
    """Device-to-device copy bandwidth, bytes read + written, for an nbytes buffer."""
    rot = rotations(2 * nbytes)
    src = [torch.randn(nbytes // 2, device="cuda").to(dtype) for _ in range(rot)]
    dst = [torch.empty_like(s) for s in src]
    # NOTE: large copies run eagerly (launch cost is noise there; a captured memcpy node may be
    # served differently from an eager one), small ones as graph replays.
    ms = time_ms(lambda i: dst[i].copy_(src[i]), rot, iters, reps, graph=nbytes < (64 << 20))
    return 2 * nbytes / ms / 1e9


def profile_host(fn: Callable[[], object], calls: int = 300) -> None:
    """cProfile ``calls`` eager calls of ``fn`` and print where the host time goes."""
    import cProfile
    import pstats

    fn()
    torch.cuda.synchronize()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    prof.disable()
    pstats.Stats(prof).sort_stats("tottime").print_stats(12)

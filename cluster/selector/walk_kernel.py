"""The longest-prefix walk of a Select (compiled): one pass over a prompt's block hashes against
the device and host tiers and the pending marks (all three ``HolderTable`` arrays).

Every block's holders are decoded into per-tier mask words (``holder_kernels.holder_words``),
then ANDed into the candidates still alive: O(prompt blocks x mask words), stopping at the
first block no candidate holds. Pure over its array arguments (mutating only the outputs).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from cluster.selector import holder_kernels as hk
from cluster.selector import index_kernels as k
from cluster.selector import pending_deadlines as pd
from cluster.selector import pending_rows
from cluster.selector.index_kernels import _jit


@_jit
def _leave(out: Any, w: int, gone: Any, n: int) -> None:
    """out[slot] = n for every slot whose bit is set in ``gone`` (word ``w``); nothing for
    n = 0 (``walk``'s outputs are zero on entry).
    NOTE: at the first block most candidates leave (all but a prefix's few holders): 256
    bit steps a word for stores of 0, ~0.8 us of a walk at 256 candidates."""
    if n == 0:
        return
    b = 0
    while gone:
        if gone & np.uint64(1):
            out[w * 64 + b] = n
        gone >>= np.uint64(1)
        b += 1


@_jit
def _live(q: Any, w: int, h: Any, dl_keys: Any, dl_slots: Any, dl_dl: Any, dl_bits: int,
          now: float) -> Any:  # fmt: skip
    """``q`` (word ``w`` of the pending slots of ``h``) less the slots whose mark on ``h`` is
    due by ``now`` (``PendingDeadlines``): expired in all but name, whenever the expiry runs."""
    out = q
    b = 0
    while q:
        if q & np.uint64(1):
            i = pd._find(dl_keys, dl_slots, dl_bits, h, w * 64 + b)
            if i >= 0 and dl_dl[i] <= now:
                out &= ~(np.uint64(1) << np.uint64(b))
        q >>= np.uint64(1)
        b += 1
    return out


@_jit
def walk(
    hashes: Any,
    gpu: Any, gover: Any, gbits: int,
    cpu: Any, cover: Any, cbits: int, use_cpu: bool,
    pend: Any, pover: Any, pbits: int, use_pending: bool,
    dl_keys: Any, dl_slots: Any, dl_dl: Any, dl_bits: int, now: float,
    cand: Any,
    out_res: Any, out_both: Any, out_host: Any, sink: Any,
) -> None:  # fmt: skip
    """Longest exact prefix of ``hashes`` (uint64) per candidate slot (``cand`` bitmask
    words), in one pass over the device (``gpu``/``gover``) and host (``cpu``/``cover``)
    holder tables and the pending one (``pend``/``pover``).

    Writes, indexed by slot: ``out_res`` = leading blocks resident (device or host tier),
    ``out_both`` = leading blocks resident or pending, ``out_host`` = blocks of the resident
    prefix held on the host tier only. The outputs must be zero on entry. ``sink``: see
    ``index_kernels.touch``. A pending mark counts while its deadline (``dl_*``, the
    ``PendingDeadlines`` arrays) is after ``now``: the answer is the same whether the due
    marks were expired before this walk or are expired after it (a Select answers before its
    expiry runs: ``SelectorCore.select_wire(defer=True)``).
    NOTE: the walk stops as soon as no candidate is left (a fresh suffix costs one probe).
    NOTE: the pending table is probed only while some candidate still alive for "resident
    or pending" is not covered by this block's resident masks (same answer): in a shared
    prefix the few candidates holding it are covered, so it is ~1 probe per walk instead of
    one per block (each an unsuccessful probe to the end of a run of rows), and its rows are
    not prefetched. The device rows are, all at once: measured against a
    sliding window 16-64 blocks ahead of the probe (fewer loads for short prefixes), the
    up-front ``touch`` was as fast or faster (p50 12.9 vs 14.6-15.5 us at 256 x 100k).
    """
    nw = cand.shape[0]
    alive_r = cand.copy()
    alive_b = cand.copy()
    gw = np.zeros(nw, np.uint64)
    cw = np.zeros(nw, np.uint64)
    pw = np.zeros(nw, np.uint64)
    n = hashes.shape[0]
    zero = np.uint64(0)
    # NOTE: [lo, hi) spans the words with a candidate alive (alive_r is within alive_b): a
    # word with none changes nothing, and after a shared prefix's first block only the
    # holders' words are left (1-2 of 4 at 256 replicas)
    lo, hi = 0, nw
    k.touch(gpu, gbits, hashes, sink)
    for i in range(n):
        h = hashes[i]
        hk.holder_words(gpu, gover, hk.find(gpu, gbits, h), gw)
        if use_cpu:
            hk.holder_words(cpu, cover, hk.find(cpu, cbits, h), cw)
        ip = -1
        if use_pending:
            for w in range(lo, hi):
                if alive_b[w] & ~(gw[w] | cw[w]):
                    ip = hk.find(pend, pbits, h)
                    if ip >= 0:
                        hk.holder_words(pend, pover, ip, pw)
                    break
        new_lo, new_hi = hi, lo
        for w in range(lo, hi):
            g, c = gw[w], cw[w]
            p = pw[w] if ip >= 0 else zero
            q = p & alive_b[w] & ~(g | c)  # NOTE: the pending bits that decide this block
            if q:
                p = (p & ~q) | _live(q, w, h, dl_keys, dl_slots, dl_dl, dl_bits, now)
            nr = alive_r[w] & (g | c)
            if nr != alive_r[w]:
                _leave(out_res, w, alive_r[w] ^ nr, i)
                alive_r[w] = nr
            hostonly = nr & c & ~g
            b = 0
            while hostonly:
                if hostonly & np.uint64(1):
                    out_host[w * 64 + b] += 1
                hostonly >>= np.uint64(1)
                b += 1
            nb = alive_b[w] & (g | c | p)
            if nb != alive_b[w]:
                _leave(out_both, w, alive_b[w] ^ nb, i)
                alive_b[w] = nb
            if nb:
                new_lo, new_hi = min(new_lo, w), w + 1
        if new_hi <= new_lo:
            return
        lo, hi = new_lo, new_hi
    for w in range(nw):
        _leave(out_res, w, alive_r[w], n)
        _leave(out_both, w, alive_b[w], n)


_warm = False


def warm_up() -> None:
    """Compile (or load from numba's disk cache) ``walk`` once per process. Idempotent."""
    global _warm
    if _warm:
        return
    from cluster.selector.holder_table import HolderTable
    from cluster.selector.pending_deadlines import PendingDeadlines

    g, c, p = HolderTable(bits=4), HolderTable(bits=4), HolderTable(bits=4)
    d = PendingDeadlines()
    h = np.arange(1, 6, dtype=np.uint64)
    for t in (g, c):
        t.set_slot(h, 1)
    p.reserve_overflow(len(h))
    pending_rows.mark(p.tab, p.bits, p.over, p.ostate, h, 0, k.SINK)
    out = np.zeros(64, np.int64)
    cand = k.mask_from_slots(np.arange(2, dtype=np.int64), 1)
    walk(h, g.tab, g.over, g.bits, c.tab, c.over, c.bits, True, p.tab, p.over, p.bits, True,
         d.keys, d.slots, d.dl, d.bits, 0.0, cand, out, out.copy(), out.copy(), k.SINK)  # fmt: skip
    _warm = True

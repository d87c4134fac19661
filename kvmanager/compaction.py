"""Compaction: move blocks that hold K/V so free space (and each sequence) becomes contiguous.

Two planners, one executor. A plan is an ORDERED list of (src, dst) moves with sequential
semantics (each move reads the state the earlier ones left): at its turn a move's source holds
K/V and its destination is empty. The batched block-copy kernel (``ops.copy_blocks``) takes
exactly this contract, so the engine runs the same list on the GPU.

``pack`` (``plan_moves``): free space as the single run [frontier, num_blocks), fewest moves::

    before:  U . U U . . U . U .      U = holds K/V (used or evictable), . = empty
    frontier = #U = 5
    moves:   8 -> 1, 6 -> 4           sources: U at ids >= frontier, highest first
    after:   U U U U U . . . . .      destinations: empty ids < frontier, lowest first

Minimal, but blind to sequences: a request's blocks end up wherever a hole was.

``contiguous`` (``plan_contiguous``): make each request's PRIVATE TAIL (the blocks after its
last shared block) one run followed by its growth room, so every table is at most
[shared prefix run][own run], the "<= 2 contiguous runs" the TinyServe pool aims for.

1. Windows (cheap; most compactions): for each request whose tail spans several runs, the
   window of tail + room blocks that holds no other request's block and costs the fewest moves
   (evictable blocks inside step aside to empty blocks outside; tail blocks outside move in),
   found with prefix sums over the pool. Room shrinks (want, want/2, 1, 0) until one fits.
   Requests that do not move keep their growth reservation::

       before:  A0 e  B0 B1 .  .  A1 .        A, B requests (table order), e evictable
       after:   A0 A1 B0 B1 .  .  e  .        (window [0, 2): e steps aside, A1 moves in)

2. Whole pool (``_plan_slide``), once ``full_layout_after`` split tails found no window: every
   request's table laid out in address order of first appearance, each followed by its room,
   then the evictable blocks hottest first, so the next victims sit right below the free run
   at the top and eviction extends that run instead of punching holes between requests::

       after:   A0 A1 r  B0 B1 r  e  .        r = growth room, . = the free run

Moves form chains (each ends in an empty block) and cycles; a cycle goes through one empty
block (the temp), so a pool with no empty block cannot compact (the plan is empty).

NOTE on KV events: a move changes where a block_hash lives in THIS pool, not whether it is
resident, and vLLM's KV events (BlockStored / BlockRemoved) speak of hashes, never block ids.
A compaction therefore emits no event: a Removed + Stored pair would open a window in which the
selection service believes the prefix gone, and misroute requests for nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from kvmanager.free_runs import FreeRuns

if TYPE_CHECKING:
    from kvmanager.manager import KVCacheManager

_EMPTY = -1


@dataclass(slots=True)
class CompactionPlan:
    """Ordered moves (sequential semantics) plus the growth room each request gets afterwards
    (``rooms``: request_id -> (start, length), empty blocks right after its last block)."""

    moves: list[tuple[int, int]] = field(default_factory=list)
    rooms: dict[str, tuple[int, int]] = field(default_factory=dict)

    @property
    def num_blocks_moved(self) -> int:
        """Distinct blocks whose K/V ends up at a new id (a cycle's temp hop not counted)."""
        return len(compose(self.moves))

    def __bool__(self) -> bool:
        return bool(self.moves) or bool(self.rooms)


def compose(moves: Sequence[tuple[int, int]]) -> dict[int, int]:
    """{original block: final block} of every block that a sequence of moves relocates."""
    holder: dict[int, int] = {}  # position -> original block whose K/V it holds now
    for s, d in moves:
        holder[d] = holder.get(s, s)
        holder[s] = _EMPTY
    return {orig: pos for pos, orig in holder.items() if orig not in (_EMPTY, pos)}


def plan_moves(free: FreeRuns, num_blocks: int) -> list[tuple[int, int]]:
    """``pack``: (src, dst) moves that leave free space as the single run [frontier, end)."""
    frontier = num_blocks - free.num_free
    holes: list[int] = []  # empty ids below the frontier, ascending
    occupied_above: list[int] = []  # non-empty ids at/above the frontier, ascending
    prev_end = 0
    for start, length in free.runs():
        occupied_above.extend(range(max(prev_end, frontier), start))  # the gap before this run
        holes.extend(range(start, min(start + length, frontier)))
        prev_end = start + length
    occupied_above.extend(range(max(prev_end, frontier), num_blocks))
    assert len(holes) == len(occupied_above), "compaction plan out of balance"
    return list(zip(reversed(occupied_above), holes, strict=True))


_EMPTY_BLOCK, _EVICTABLE, _USED = 0, 1, 2


def plan_contiguous(
    mgr: KVCacheManager,
    reserved: dict[str, tuple[int, int]],
    keep_free: int = 0,
    full_layout_after: int = 1,
) -> CompactionPlan:
    """``contiguous`` (module docstring). Call with every growth reservation released;
    ``reserved`` are those reservations (request_id -> (start, length)): a request that does
    not move keeps its room. Lays out the whole pool when ``full_layout_after`` split tails
    found no window (0: never)."""
    plan, num_left = _plan_windows(mgr, reserved, keep_free)
    if full_layout_after and num_left >= full_layout_after:
        return _plan_slide(mgr, keep_free)
    return plan


def _plan_windows(
    mgr: KVCacheManager, reserved: dict[str, tuple[int, int]], keep_free: int
) -> tuple[CompactionPlan, int]:
    """Each split private tail into its cheapest window (module docstring). Returns the plan
    and how many split tails found no window free of other requests' blocks (left as is)."""
    n, bs, ref = mgr.num_blocks, mgr.block_size, mgr._ref_cnt
    state = [_USED if ref[b] else _EVICTABLE for b in range(n)]
    for start, length in mgr._free.runs():
        state[start : start + length] = [_EMPTY_BLOCK] * length
    num_empty = mgr._free.num_free
    plan = CompactionPlan()
    for rid, (start, length) in reserved.items():  # rooms stay unless their request moves
        state[start : start + length] = [_USED] * length
        plan.rooms[rid] = (start, length)
        num_empty -= length
    num_left = 0
    for rid, req in mgr._requests.items():
        ids = req.block_ids
        k = len(ids)
        while k > 0 and ref[ids[k - 1]] == 1:
            k -= 1
        tail = ids[k:]  # the private tail: after the table's last shared block
        if num_runs(tail) <= 1:
            continue
        want = 0
        if req.expected_num_tokens is not None:
            want = max(0, -(-req.expected_num_tokens // bs) - len(ids))
        old_start, old_len = plan.rooms.pop(rid, (0, 0))  # its own room is fair game
        state[old_start : old_start + old_len] = [_EMPTY_BLOCK] * old_len
        num_empty += old_len
        want = min(want, max(0, num_empty - keep_free))
        found = None
        st = torch.tensor(state, dtype=torch.int8)
        mine = torch.zeros(n, dtype=torch.bool)
        mine[tail] = True
        for room in sorted({want, want // 2, min(want, 1), 0}, reverse=True):
            found = found or _window(st, mine, len(tail) + room, num_empty)
        if found is None:
            if old_len:
                state[old_start : old_start + old_len] = [_USED] * old_len
                plan.rooms[rid] = (old_start, old_len)
                num_empty -= old_len
            num_left += 1
            continue
        start, length = found
        window = range(start, start + length)
        outside = (b for b in range(n - 1, -1, -1) if state[b] == _EMPTY_BLOCK and b not in window)
        for b in window:  # evictable blocks step aside (they have no table to keep whole)
            if state[b] == _EVICTABLE:
                d = next(outside)
                plan.moves.append((b, d))
                state[b], state[d] = _EMPTY_BLOCK, _EVICTABLE
        target = {s: start + i for i, s in enumerate(tail) if s != start + i}
        ordered = order_moves(target, lambda b: state[b] == _EMPTY_BLOCK, n)
        if ordered is None:  # NOTE: a cycle needs an empty block; the window has none left
            num_left += 1
            continue
        plan.moves += ordered
        for s in tail:
            state[s] = _EMPTY_BLOCK
        state[start : start + len(tail)] = [_USED] * len(tail)
        if length > len(tail):
            plan.rooms[rid] = (start + len(tail), length - len(tail))
            num_empty -= length - len(tail)
            state[start + len(tail) : start + length] = [_USED] * (length - len(tail))
    return plan, num_left


def _plan_slide(mgr: KVCacheManager, keep_free: int) -> CompactionPlan:
    """The whole-pool layout (module docstring): every block may move."""
    free, bs = mgr._free, mgr.block_size
    if free.num_free == 0:
        return CompactionPlan()
    holder_of: dict[int, str] = {}
    for request_id, state in mgr._requests.items():
        for b in state.block_ids:
            holder_of.setdefault(b, request_id)
    room_budget = max(0, free.num_free - keep_free)
    target: dict[int, int] = {}
    rooms: dict[str, tuple[int, int]] = {}
    cursor = 0
    for b in _occupied(free, mgr.num_blocks):
        rid = holder_of.get(b)
        if b in target or rid is None:
            continue  # NOTE: evictable blocks are laid out after every request's blocks
        req = mgr._requests[rid]
        for x in req.block_ids:
            if x not in target:
                target[x] = cursor
                cursor += 1
        want = 0
        if req.expected_num_tokens is not None:
            want = max(0, -(-req.expected_num_tokens // bs) - len(req.block_ids))
        room = min(want, room_budget)
        if room:
            rooms[rid] = (cursor, room)
            cursor += room
            room_budget -= room
    # NOTE: hottest first, so the next victims sit right below the free run at the top:
    # eviction then extends that run instead of punching holes between requests' blocks.
    for b in reversed(mgr._evictable.eviction_order()):
        target[b] = cursor
        cursor += 1
    moved = {s: d for s, d in target.items() if s != d}
    ordered = order_moves(moved, free.is_free, mgr.num_blocks)
    return CompactionPlan() if ordered is None else CompactionPlan(ordered, rooms)


def _occupied(free: FreeRuns, num_blocks: int) -> list[int]:
    """Ids holding K/V (not in a free run), ascending."""
    out: list[int] = []
    prev_end = 0
    for start, length in free.runs():
        out.extend(range(prev_end, start))
        prev_end = start + length
    out.extend(range(prev_end, num_blocks))
    return out


def num_runs(ids: Sequence[int]) -> int:
    """Maximal runs of consecutive ids in a block table."""
    return sum(1 for i, b in enumerate(ids) if i == 0 or b != ids[i - 1] + 1)


def _window(
    st: torch.Tensor, mine: torch.Tensor, length: int, num_empty: int
) -> tuple[int, int] | None:
    """The window [start, start + length) holding no other request's block that costs the
    fewest moves (evictable blocks inside + own blocks outside), with enough empty blocks
    outside it for the evictable ones; None if there is none. ``st``: block states (int8),
    ``mine``: the request's own blocks. Prefix sums over the pool."""
    n = st.shape[0]
    if length > n or length <= 0:
        return None

    def sums(mask: torch.Tensor) -> torch.Tensor:  # [n - length + 1] counts per window start
        c = torch.cat([torch.zeros(1, dtype=torch.int64), mask.to(torch.int64).cumsum(0)])
        return c[length:] - c[: n - length + 1]

    used = sums((st == _USED) & ~mine)
    ev = sums((st == _EVICTABLE) & ~mine)
    empty = sums((st == _EMPTY_BLOCK) & ~mine)
    cost = ev + (int(mine.sum()) - sums(mine))
    ok = (used == 0) & (num_empty - empty >= ev)
    if not bool(ok.any()):
        return None
    cost = torch.where(ok, cost, torch.iinfo(torch.int64).max)
    return int(torch.argmin(cost)), length


def order_moves(
    target: dict[int, int], is_empty: Callable[[int], bool], num_blocks: int
) -> list[tuple[int, int]] | None:
    """Sequential moves realising the relocation ``target`` (src -> dst, injective; every dst
    is empty now or itself a source). Chains run from their empty end backwards; each cycle
    goes through a temp: a block no move fills that is empty once the chains are done (one of
    their vacated sources, or one ``is_empty`` before the plan); None when there is none."""
    src_of = {d: s for s, d in target.items()}
    moves: list[tuple[int, int]] = []
    done: set[int] = set()
    for s0, d0 in target.items():
        if s0 in done or d0 in target:
            continue  # not a chain's head: its destination still holds a source
        s, d = s0, d0
        while True:  # d is empty now: fill it, which empties s for whoever targets s
            moves.append((s, d))
            done.add(s)
            nxt = src_of.get(s)
            if nxt is None or nxt in done:
                break
            s, d = nxt, s
    left = [s for s in target if s not in done]
    if left:
        finals = set(target.values())
        # NOTE: empty now: a chain's vacated source, or a block empty before that no move fills.
        temp = next((t for t in done if t not in finals), None)
        if temp is None:
            temp = next(
                (t for t in range(num_blocks - 1, -1, -1) if t not in finals and is_empty(t)),
                None,
            )
        if temp is None:
            return None  # NOTE: a cycle and no empty block to go through
        for s0 in left:
            if s0 in done:
                continue
            cycle = [s0]  # s0 -> target[s0] -> ... back to s0
            while target[cycle[-1]] != s0:
                cycle.append(target[cycle[-1]])
            moves.append((cycle[-1], temp))
            for s in reversed(cycle[:-1]):
                moves.append((s, target[s]))
            moves.append((temp, s0))
            done.update(cycle)
    return moves


def copy_blocks_reference(
    kv_caches: Sequence[torch.Tensor], srcs: Sequence[int], dsts: Sequence[int]
) -> None:
    """cache[dst] = cache[src] for every tensor (block dimension first), all reads before any
    write (a parallel gather: pass a plan's ``compose`` result, not its sequential moves)."""
    if not srcs:
        return
    for cache in kv_caches:
        src = torch.tensor(srcs, dtype=torch.long, device=cache.device)
        dst = torch.tensor(dsts, dtype=torch.long, device=cache.device)
        cache.index_copy_(0, dst, cache.index_select(0, src))


def apply_moves(
    mgr: KVCacheManager,
    plan: CompactionPlan | Sequence[tuple[int, int]],
    kv_caches: Sequence[torch.Tensor] = (),
) -> dict[int, int]:
    """Execute a plan on ``mgr`` (``KVCacheManager.apply_compaction``): validate every move in
    order (each source holds K/V, each destination is empty at its turn; ValueError, nothing
    changed), copy the data in ``kv_caches`` (none: the caller copies it, e.g. with
    ``ops.copy_blocks`` over the same ordered moves), then rewrite ref counts, hashes, the hash
    map, eviction order, access epochs, free space, every block table and the growth
    reservations in one step. Returns {old block: new block}."""
    moves, rooms = (plan.moves, plan.rooms) if isinstance(plan, CompactionPlan) else (plan, {})
    mgr._alloc.release_all()
    holder: dict[int, int] = {}
    for s, d in moves:
        if not (0 <= s < mgr.num_blocks and 0 <= d < mgr.num_blocks) or s == d:
            raise ValueError(f"move ({s}, {d}) is a self-move or outside the pool of {mgr.num_blocks}")
        s_full = holder[s] != _EMPTY if s in holder else not mgr._free.is_free(s)
        d_full = holder[d] != _EMPTY if d in holder else not mgr._free.is_free(d)
        if not s_full or d_full:
            raise ValueError(f"move ({s}, {d}): source must hold data, destination be empty")
        holder[d] = holder.get(s, s)
        holder[s] = _EMPTY
    for rid, (start, length) in rooms.items():
        if rid not in mgr._requests or length <= 0:
            raise ValueError(f"room {start, length} for unknown request {rid!r} or empty")
    remap = {orig: pos for pos, orig in holder.items() if orig not in (_EMPTY, pos)}
    copy_blocks_reference(kv_caches, list(remap), list(remap.values()))
    _rewrite(mgr, remap, holder)
    for rid, (start, length) in rooms.items():
        mgr._free.take_range(start, length)
        mgr._alloc.reserve(rid, start, length)
    mgr._num_compactions += bool(remap)
    mgr._num_blocks_moved += len(remap)
    return remap


def _rewrite(mgr: KVCacheManager, remap: dict[int, int], holder: dict[int, int]) -> None:
    """Move every block's state from old to new id at once (remap may hold cycles)."""
    ref, bh, ph = mgr._ref_cnt, mgr._block_hash, mgr._parent_hash
    saved = {b: (ref[b], bh[b], ph[b]) for b in remap}
    for b in remap:
        ref[b], bh[b], ph[b] = 0, None, None
    for b, (r, h, p) in saved.items():
        n = remap[b]
        ref[n], bh[n], ph[n] = r, h, p
        if h is not None:
            mgr._hash_to_block[h] = n
    mgr._evictable.rename_many(remap)  # NOTE: all moved blocks: used ones keep history too
    mgr._epochs.rename(remap)
    for pos, orig in holder.items():
        was_full, is_full = not mgr._free.is_free(pos), orig != _EMPTY
        if is_full and not was_full:
            mgr._free.take_block(pos)
    for pos, orig in holder.items():
        if orig == _EMPTY and not mgr._free.is_free(pos):
            mgr._free.put(pos)
    for req in mgr._requests.values():
        req.block_ids = [remap.get(b, b) for b in req.block_ids]

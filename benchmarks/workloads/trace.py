"""Your own traffic: a JSONL trace file replayed as a workload.

One JSON object per line (blank lines and lines starting with ``#`` are skipped):

| key | type | meaning |
|---|---|---|
| ``arrival_s`` | number >= 0, required | arrival time in seconds from the start of the trace |
| ``prompt_token_ids`` | list of int | the prompt's token ids, or ... |
| ``prompt_block_ids`` | list of int | ... the prompt as KV-block content ids (one per ``block_size`` tokens; equal ids after an equal prefix are a shared prefix). Exactly one of the two. |
| ``num_output_tokens`` | int >= 1, required | tokens the request generates |
| ``session_id`` | string, optional | conversation / user (session_hash routes by it) |
| ``request_id`` | string, optional | default ``t<line number>``; must be unique |

Token ids are cut into blocks of ``block_size`` tokens; each distinct block of tokens gets one
content id (so equal token blocks after an equal prefix share KV, exactly as in a pool's chained
hashing). A partial last block becomes a block of its own that no other request shares (the
simulator works in whole blocks: such a prompt counts up to ``block_size - 1`` extra tokens).
Outputs get fresh content ids. The trace is replayed as is at every cluster size (the
workloads' ``scale`` does not apply); requests are open-loop, sorted by arrival.

    {"arrival_s": 0.00, "session_id": "u1", "prompt_token_ids": [1, 2, 3], "num_output_tokens": 64}
    {"arrival_s": 0.25, "prompt_block_ids": [7, 7, 9], "num_output_tokens": 16}
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from benchmarks.workloads.types import DEFAULT_BLOCK_SIZE, BlockIds, SimRequest, Workload

TRACE_PREFIX = "trace:"


def _field(obj: dict[str, Any], key: str, where: str) -> Any:
    if key not in obj:
        raise ValueError(f"{where}: missing {key!r}")
    return obj[key]


def _int_list(value: Any, key: str, where: str) -> list[int]:
    if not isinstance(value, list) or not value or not all(
        isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in value
    ):
        raise ValueError(f"{where}: {key!r} must be a non-empty list of non-negative ints")
    return value


def load_trace(path: str | Path, block_size: int = DEFAULT_BLOCK_SIZE) -> Workload:
    """The trace at ``path`` as a ``Workload`` named ``trace:<file name>``; ValueError naming
    the line for any entry that breaks the schema (module docstring)."""
    path = Path(path)
    rows: list[tuple[int, dict[str, Any]]] = []
    for i, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{i}: not JSON ({exc})") from exc
        if not isinstance(obj, dict):
            raise ValueError(f"{path}:{i}: expected a JSON object")
        rows.append((i, obj))
    # NOTE: fresh ids (outputs, token blocks) start above every block id the trace names.
    top = 0
    for _, obj in rows:
        for x in obj.get("prompt_block_ids") or ():
            if isinstance(x, int):
                top = max(top, x)
    ids = BlockIds(start=top + 1)
    token_blocks: dict[tuple[int, ...], int] = {}
    seen: set[str] = set()
    reqs: list[SimRequest] = []
    for i, obj in rows:
        where = f"{path}:{i}"
        arrival = _field(obj, "arrival_s", where)
        if isinstance(arrival, bool) or not isinstance(arrival, int | float) or arrival < 0:
            raise ValueError(f"{where}: 'arrival_s' must be a number >= 0")
        n_out = _field(obj, "num_output_tokens", where)
        if isinstance(n_out, bool) or not isinstance(n_out, int) or n_out < 1:
            raise ValueError(f"{where}: 'num_output_tokens' must be an int >= 1")
        has_tokens, has_blocks = "prompt_token_ids" in obj, "prompt_block_ids" in obj
        if has_tokens == has_blocks:
            raise ValueError(f"{where}: give exactly one of 'prompt_token_ids', 'prompt_block_ids'")
        if has_blocks:
            blocks = tuple(_int_list(obj["prompt_block_ids"], "prompt_block_ids", where))
        else:
            tokens = _int_list(obj["prompt_token_ids"], "prompt_token_ids", where)
            full = len(tokens) // block_size
            out = []
            for b in range(full):
                key = tuple(tokens[b * block_size : (b + 1) * block_size])
                if key not in token_blocks:
                    token_blocks[key] = ids.take(1)[0]
                out.append(token_blocks[key])
            if len(tokens) % block_size:
                out += ids.take(1)
            blocks = tuple(out)
        rid = str(obj.get("request_id", f"t{i}"))
        if rid in seen:
            raise ValueError(f"{where}: duplicate request_id {rid!r}")
        seen.add(rid)
        session = obj.get("session_id", "")
        if not isinstance(session, str):
            raise ValueError(f"{where}: 'session_id' must be a string")
        reqs.append(SimRequest(rid, float(arrival), blocks, n_out,
                               ids.take(-(-n_out // block_size)), session))  # fmt: skip
    if not reqs:
        raise ValueError(f"{path}: no requests")
    params = {"source": f"trace file {path}", "num_requests": len(reqs)}
    return Workload(f"{TRACE_PREFIX}{path.name}", 0, reqs, params, block_size=block_size).sort()

"""A step's sampled tokens on their way from the device to the host.

    Sampler.sample(logits, rows)  -> DeviceSample   token ids (+ top-n logprobs) on the device;
                                                    no host sync on the greedy / random paths
    DeviceSample.to_host()        -> HostSample     CUDA: non-blocking copies into pinned host
                                                    memory, one event recorded after them
    HostSample.output()           -> SamplerOutput  waits on that event (only here), then lists

The synchronous engine runs the three back to back; the asynchronous one
(``replicas.async_scheduling``) feeds ``DeviceSample.token_ids`` into the next step's input
ids on the device and calls ``output()`` one step later, when the host needs the tokens.
On CPU ``to_host`` copies nothing and ``output`` only converts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from replicas.outputs import TokenLogprobs


@dataclass(slots=True)
class SamplerOutput:
    """One sampled token per input row, plus its top-n logprobs when asked for."""

    token_ids: list[int]
    logprobs: list[TokenLogprobs | None]


@dataclass(slots=True)
class LogprobGroup:
    """The rows asking for the same top-n: ``ids`` / ``values`` ``[len(rows), n]`` (the n
    most likely tokens of each row, descending) and ``sampled`` ``[len(rows)]`` (the sampled
    token's log-probability), all on one device."""

    rows: list[int]
    ids: torch.Tensor
    values: torch.Tensor
    sampled: torch.Tensor

    def to(self, device: torch.device, non_blocking: bool) -> LogprobGroup:
        return LogprobGroup(
            self.rows,
            _copy(self.ids, device, non_blocking),
            _copy(self.values, device, non_blocking),
            _copy(self.sampled, device, non_blocking),
        )


def _copy(t: torch.Tensor, device: torch.device, non_blocking: bool) -> torch.Tensor:
    if t.device == device:
        return t
    if non_blocking and device.type == "cpu":
        # NOTE: pinned (from torch's caching host allocator), or the copy is not asynchronous.
        out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        return out.copy_(t, non_blocking=True)
    return t.to(device)


def logprob_groups(
    raw_logprobs: torch.Tensor, token_ids: torch.Tensor, top_n: Sequence[int | None]
) -> list[LogprobGroup]:
    """Top-n logprobs of the rows whose ``top_n`` is set, grouped by n, left on the device.

    NOTE: rows are taken as views (no index tensor): indexing a CUDA tensor with a host
    list copies the list synchronously and would stall the asynchronous engine."""
    by_n: dict[int, list[int]] = {}
    for i, n in enumerate(top_n):
        if n is not None:
            by_n.setdefault(n, []).append(i)
    groups: list[LogprobGroup] = []
    for n, rows in by_n.items():
        raw = torch.stack([raw_logprobs[i] for i in rows])
        sampled = torch.stack([raw_logprobs[i].gather(0, token_ids[i : i + 1])[0] for i in rows])
        if n > 0:
            values, ids = torch.topk(raw, n, dim=-1)
        else:
            values = raw.new_empty((len(rows), 0))
            ids = torch.empty((len(rows), 0), dtype=torch.long, device=raw.device)
        groups.append(LogprobGroup(rows, ids, values, sampled))
    return groups


@dataclass(slots=True)
class HostSample:
    """Host copies of a DeviceSample; valid once ``ready`` (if any) has completed."""

    token_ids: torch.Tensor
    logprobs: list[LogprobGroup]
    ready: torch.cuda.Event | None = None

    def output(self) -> SamplerOutput:
        """Wait for the copies (CUDA) and return the tokens and logprobs as Python lists."""
        if self.ready is not None:
            self.ready.synchronize()
        token_ids = [int(t) for t in self.token_ids.tolist()]
        logprobs: list[TokenLogprobs | None] = [None] * len(token_ids)
        for g in self.logprobs:
            for j, i in enumerate(g.rows):
                out: TokenLogprobs = dict(zip(g.ids[j].tolist(), g.values[j].tolist(), strict=True))
                out[token_ids[i]] = float(g.sampled[j])
                logprobs[i] = out
        return SamplerOutput(token_ids=token_ids, logprobs=logprobs)


@dataclass(slots=True)
class DeviceSample:
    """A step's sampled token ids ``[num_rows]`` int64 and logprob groups, on the device."""

    token_ids: torch.Tensor
    logprobs: list[LogprobGroup]

    def to_host(self) -> HostSample:
        """Start the device->host copies (non-blocking into pinned memory on CUDA, an event
        recorded after them); on CPU the tensors are already there."""
        cpu = torch.device("cpu")
        if self.token_ids.device.type != "cuda":
            return HostSample(self.token_ids, self.logprobs)
        token_ids = _copy(self.token_ids, cpu, non_blocking=True)
        groups = [g.to(cpu, non_blocking=True) for g in self.logprobs]
        ready = torch.cuda.Event()
        ready.record()
        return HostSample(token_ids, groups, ready)


@dataclass(slots=True)
class PendingTokens:
    """The step in flight's sampled ids on the device, for the next step's placeholder rows:
    ``token_ids[rows[request_id]]`` is the pending token of ``request_id``."""

    token_ids: torch.Tensor
    rows: dict[str, int]

    def sources(self, request_ids: Sequence[str]) -> list[int]:
        """Rows of ``token_ids`` holding these requests' pending tokens."""
        return [self.rows[rid] for rid in request_ids]

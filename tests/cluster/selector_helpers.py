"""Helpers for the selection-service tests (imported by module name: the test dir is on sys.path)."""

from __future__ import annotations

from cluster.selector.types import CandidateRow, Candidates, SelectionRequest


class FakeClock:
    """Monotonic clock the test advances by hand."""

    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, dt: float) -> None:
        self.t += dt


def request(
    num_blocks: int, block_size: int = 16, prefix: int = 0, **kw: object
) -> SelectionRequest:
    """A request whose block hashes are prefix*1000 + 1 .. + num_blocks."""
    hashes = [prefix * 1000 + i + 1 for i in range(num_blocks)]
    return SelectionRequest(
        request_id=str(kw.pop("request_id", f"q{prefix}-{num_blocks}")),
        block_hashes=hashes,
        num_prompt_tokens=int(kw.pop("num_prompt_tokens", num_blocks * block_size)),
        **kw,  # type: ignore[arg-type]
    )


def cands(*rows: CandidateRow) -> Candidates:
    return Candidates.from_rows(rows)

"""Batch buckets of the CUDA-graph decode path (replicas.cuda_graph); CPU-only logic."""

from __future__ import annotations

import pytest

from replicas.cuda_graph import bucket_sizes


@pytest.mark.parametrize("max_batch", [1, 3, 8, 9, 16, 17, 64, 100])
def test_buckets_cover_every_batch_with_little_padding(max_batch: int) -> None:
    sizes = bucket_sizes(max_batch)
    assert sizes == sorted(set(sizes)) and sizes[0] == 1
    assert sizes[-1] >= max_batch and (len(sizes) == 1 or sizes[-2] < max_batch)
    for n in range(1, max_batch + 1):
        b = min(s for s in sizes if s >= n)
        # NOTE: at most doubling below 16 rows, at most 15 padded rows above.
        assert b <= max(2 * n, n + 15)

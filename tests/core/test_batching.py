"""The automatic size of model calls for generated rows."""

from __future__ import annotations

import torch

from lumos.core.batching import (
    CPU_ELEMENTS_PER_CALL,
    MIN_ROWS_PER_CALL,
    chunks,
    rows_per_call,
)


def test_rows_per_call_keeps_cpu_calls_cache_sized_and_honours_batch_size():
    image, tokens = torch.rand(2, 3, 64, 64), torch.zeros(2, 16, dtype=torch.long)
    assert rows_per_call(None, (image,)) == CPU_ELEMENTS_PER_CALL // (3 * 64 * 64)
    assert rows_per_call(None, (image, tokens)) == CPU_ELEMENTS_PER_CALL // (3 * 64 * 64 + 16)
    assert rows_per_call(None, (torch.rand(1, 3, 512, 512),)) == MIN_ROWS_PER_CALL
    assert rows_per_call(7, (image,)) == 7


def test_chunks_cover_every_row_once():
    for n, size in [(10, 3), (10, None), (1, 5), (9, 9)]:
        covered = [i for s in chunks(n, size) for i in range(n)[s]]
        assert covered == list(range(n))

"""Memory-bounded chunking: `batch_size` caps the rows of every forward/backward, and results do
not depend on it (up to float rounding)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from lumos.core.errors import InputError

#: input elements per model call when `batch_size` is None and a method generates many rows
#: (perturbations, coalitions, metric curves). On the CPU a model is fastest with activations
#: that stay in cache: 1,000 rows of the zoo's 64×64 CNN run 1.4× faster in calls of 21 rows
#: (2^18 elements) than of 64, and 2.5× faster than in one call; ResNet-18 at 224×224 is
#: fastest with 4-8 rows, hence at least `MIN_ROWS_PER_CALL`. Accelerators want large batches:
#: 2^23 elements there.
CPU_ELEMENTS_PER_CALL = 2**18
MIN_ROWS_PER_CALL = 4
DEVICE_ELEMENTS_PER_CALL = 2**23


def check_batch_size(batch_size: int | None) -> int | None:
    if batch_size is None:
        return None
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size must be a positive int or None, got {batch_size!r}.")
    return batch_size


def check_count(value: object, name: str, minimum: int = 1) -> int:
    """A whole-number option (`n_steps`, `n_samples`, ...) of at least `minimum`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InputError(f"{name} must be an int >= {minimum}, got {value!r}.")
    return value


def rows_per_call(batch_size: int | None, rows: Sequence[torch.Tensor]) -> int:
    """`batch_size`, or when it is None the number of rows like `rows` (one example of each
    input tensor) that make one efficient model call on their device (see
    `CPU_ELEMENTS_PER_CALL`)."""
    if batch_size is not None:
        return batch_size
    per_row = sum(int(x[0].numel()) for x in rows)
    budget = CPU_ELEMENTS_PER_CALL if rows[0].device.type == "cpu" else DEVICE_ELEMENTS_PER_CALL
    return max(MIN_ROWS_PER_CALL, budget // max(per_row, 1))


def chunks(n_rows: int, batch_size: int | None) -> Iterator[slice]:
    """Slices covering `range(n_rows)` with at most `batch_size` rows each (all rows if None)."""
    step = n_rows if batch_size is None else batch_size
    for start in range(0, n_rows, max(step, 1)):
        yield slice(start, min(start + step, n_rows))

"""Memory-bounded chunking: `batch_size` caps the rows of every forward/backward, and results do
not depend on it (up to float rounding)."""

from __future__ import annotations

from collections.abc import Iterator

from lumos.core.errors import InputError


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


def chunks(n_rows: int, batch_size: int | None) -> Iterator[slice]:
    """Slices covering `range(n_rows)` with at most `batch_size` rows each (all rows if None)."""
    step = n_rows if batch_size is None else batch_size
    for start in range(0, n_rows, max(step, 1)):
        yield slice(start, min(start + step, n_rows))

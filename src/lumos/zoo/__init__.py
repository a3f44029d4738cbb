"""The zoo: small models trained here, on data shipped with scikit-learn or made on the fly.

```python
bundle = lumos.zoo.load("shapes")      # trained once, then loaded from the cache
x, y, masks = bundle.test_batch(8)     # images in [0, 1] with ground-truth object masks
```
Training is seeded and deterministic; the weights are cached with safetensors under
`$LUMOS_CACHE_DIR/zoo` (else `$XDG_CACHE_HOME/lumos/zoo`, else `~/.cache/lumos/zoo`).
"""

from __future__ import annotations

import time
from os import PathLike
from pathlib import Path

import torch

from lumos.core.errors import unknown_name
from lumos.zoo import cache
from lumos.zoo.bundle import Bundle
from lumos.zoo.catalog import ENTRIES
from lumos.zoo.images import image, images
from lumos.zoo.training import accuracy, fit

__all__ = ["Bundle", "image", "images", "load", "names"]


def names() -> list[str]:
    """The names `load` accepts."""
    return list(ENTRIES)


def load(
    name: str,
    *,
    cache_dir: str | PathLike[str] | None = None,
    retrain: bool = False,
    seed: int = 0,
) -> Bundle:
    """The zoo model `name`, trained with `seed` on first use (or when `retrain`), then cached.

    The data do not depend on `seed`: models trained with different seeds share one test set.
    Training runs on one thread, so the weights are the same on any machine (for one torch
    build), and it leaves the global random state and thread count as they were.
    """
    if name not in ENTRIES:
        raise unknown_name("zoo model", name, names())
    entry = ENTRIES[name]
    directory = Path(cache_dir) if cache_dir is not None else cache.default_cache_dir()
    stem = f"{name}-{entry.version}-seed{seed}"
    dataset = entry.data()
    with cache.lock(directory, stem), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = entry.build(dataset)
        metadata = None if retrain else cache.load(directory, stem, model)
        if metadata is None:
            start = time.perf_counter()
            fit(model, dataset.train, entry.recipe, seed=seed)
            metadata = {
                "name": name,
                "version": entry.version,
                "seed": seed,
                "accuracy": accuracy(model, dataset.test),
                "train_seconds": round(time.perf_counter() - start, 2),
                "torch": torch.__version__,
            }
            cache.save(directory, stem, model, metadata)
    return Bundle(
        name=name,
        model=model.eval(),
        task=entry.task,
        class_names=list(dataset.class_names),
        feature_names=None if dataset.feature_names is None else list(dataset.feature_names),
        input_shape=tuple(dataset.test.x.shape[1:]),
        accuracy=float(metadata["accuracy"]),
        default_layer=entry.default_layer,
        dataset=dataset,
    )

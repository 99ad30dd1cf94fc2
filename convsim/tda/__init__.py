"""Training-data attribution: which training messages a generated reply resembles most.

    store.py      one vector per training message (float16 memmap + content-hash index)
    search.py     FAISS cosine search over a store (exact when small, IVF when large), speaker filter
    index.py      `convsim tda index`: the run's training messages → vectors in RUN_DIR/tda/METHOD
    gradients.py  per-example LoRA gradients, randomly projected (the `gradients` method)
    query.py      `Attributor`: a reply → its nearest training messages (CLI and `chat --tda`)
    cli.py        `convsim tda index|query`

See `convsim.modeling.activations.embed_texts` for the activation vectors, `bench/tda_query.py` for query speed
and `bench/tda_canary.py` for how well each method finds planted training messages.

Names are imported lazily, so `convsim.tda.index` works where faiss is not installed.
"""

from __future__ import annotations

import importlib

_NAMES = {
    "Hit": "search",
    "VectorIndex": "search",
    "build_index": "search",
    "index_for_store": "search",
    "nearest": "search",
    "CorruptStore": "store",
    "NoStore": "store",
    "StaleStore": "store",
    "StoreError": "store",
    "VectorStore": "store",
    "content_key": "store",
    "record_key": "store",
}
__all__ = sorted(_NAMES)


def __getattr__(name: str):
    if name in _NAMES:
        return getattr(importlib.import_module(f"convsim.tda.{_NAMES[name]}"), name)
    raise AttributeError(f"module 'convsim.tda' has no attribute {name!r}")

"""Training-data attribution: which training messages a generated reply resembles most.

    store.py   one pooled hidden-state vector per training message (float16 memmap + content-hash index)
    search.py  FAISS cosine search over a store (exact when small, IVF when large), speaker filter

See `convsim.activations.embed_texts` for making the vectors, `bench/tda_query.py` for query speed.
"""
from convsim.tda.search import Hit, VectorIndex, build_index, index_for_store, nearest
from convsim.tda.store import (CorruptStore, NoStore, StaleStore, StoreError, VectorStore, content_key,
                               record_key)

__all__ = ["CorruptStore", "Hit", "NoStore", "StaleStore", "StoreError", "VectorIndex", "VectorStore",
           "build_index", "content_key", "index_for_store", "nearest", "record_key"]

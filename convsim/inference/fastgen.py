"""The CUDA fast path of generation: a static KV cache, reused across calls, so that transformers'
`generate` compiles the decode step once (torch.compile, mode "reduce-overhead" = CUDA graphs) and
replays it for every later token and every later call.

Plain `generate` on a small model is bound by Python overhead, not by the GPU (docs/PERFORMANCE.md);
replaying one captured graph per token removes that overhead. Shapes must stay
fixed for the graph to be replayed, so the cache length is rounded up to a bucket and the cache object
is kept on the model and reset between calls.

Used automatically by convsim.inference.generate when the model is on CUDA, the batch is 1 and no forward hooks
(steering, activation recording) sit on the decoder layers; `CONVSIM_FAST_GENERATE=0` turns it off, and
`CONVSIM_FAST_GENERATE=any` uses the static cache on any device (on the CPU transformers compiles nothing, so
this checks the cache's bucketing and reuse, not the speed-up).
bench/generate_speed.py measures it against plain `generate` on the same card.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

from convsim.modeling.layers import causal_lm

BUCKET = 512


def _base(model):
    return causal_lm(model)


def _hooked(model) -> bool:
    from convsim.modeling.layers import decoder_layers

    try:
        layers = decoder_layers(model)
    except Exception:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in layers)


_off = [0]


@contextmanager
def disabled():
    """Plain `generate` inside the block (e.g. samples drawn while training, where weights change)."""
    _off[0] += 1
    try:
        yield
    finally:
        _off[0] -= 1


def enabled(model, batch: int = 1) -> bool:
    """Whether the fast path applies to this model and call."""
    mode = os.environ.get("CONVSIM_FAST_GENERATE", "1")
    if mode == "0" or batch != 1 or _off[0]:
        return False
    p = next(model.parameters())
    return (p.device.type == "cuda" or mode == "any") and not _hooked(model)


def bucket(n: int) -> int:
    return max(BUCKET, -(-n // BUCKET) * BUCKET)


def static_cache(model, total_len: int):
    """A StaticCache of at least `total_len` positions, kept on the model and reset for reuse."""
    from transformers import StaticCache

    base = _base(model)
    size = bucket(total_len)
    caches = base.__dict__.setdefault("_convsim_static_caches", {})
    cache = caches.get(size)
    if cache is None:
        cache = StaticCache(config=base.config, max_cache_len=size)
        caches[size] = cache
    else:
        cache.reset()
    return cache


_broken: list[str] = []


def generate(model, input_ids, **kw):
    """`model.generate` through the fast path where it applies; falls back to the plain path (and stays
    there for this process, with one warning) if compiling fails on this machine."""
    batch = input_ids.shape[0] * kw.get("num_return_sequences", 1)
    if _broken or not enabled(model, batch):
        return model.generate(input_ids=input_ids, **kw)
    cache = static_cache(model, input_ids.shape[1] + kw.get("max_new_tokens", 96))
    try:
        return model.generate(input_ids=input_ids, past_key_values=cache, **kw)
    except Exception as e:  # an inductor/triton failure must not cost the user their reply
        import sys

        _broken.append(repr(e))
        print(
            f"warning: fast generation failed ({type(e).__name__}: {str(e)[:200]}); using plain generate",
            file=sys.stderr,
        )
        if "streamer" in kw:  # tokens may already have been streamed: the caller's next call goes plain
            raise
        return model.generate(input_ids=input_ids, **kw)

"""The cached frozen prefix: when only the top K decoder layers train and nothing below them does (no LoRA
there, the speaker-token rows frozen), the hidden states entering the first trained layer are a fixed
function of an example's tokens. They are computed once (without autograd) the first time an example is seen
in a training forward, kept in memory keyed by the example's tokens, and later training forwards run only
the top K layers, the final norm and the head from them.

    install_prefix_cache(peft_model, first=n_layers - k)   # in place; training forwards use the cache
    freeze_below(peft_model, first)                         # what must hold for the cache to be exact

The top layers see exactly what they see in the uncached forward: the model's own forward still runs, from
`inputs_embeds` = the cached states with the lower layers passed through, so it builds the same attention
masks (sliding-window and global), position ids and rotary embeddings from the same attention mask and
width. Batches must be right-padded with positions from 0 (the collator's padded batches): an example's
states at its real positions then do not depend on the batch it came in, and padding positions get zeros,
which no real position attends to and no label reads. Any other call (evaluation, generation, a KV cache,
explicit position ids as in padding-free batches) runs the plain forward.
"""

from __future__ import annotations

import contextlib
import types

import torch

from convsim.modeling.layers import backbone, causal_lm, decoder_layers


class _Pass(torch.nn.Module):
    """Stands in for a lower decoder layer in a cached forward: returns the hidden states it is given."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


class _Stop(Exception):
    pass


@contextlib.contextmanager
def passed_through(layers, first: int):
    """Context: layers[:first] replaced by pass-through modules (restored in `finally`)."""
    kept = [layers[i] for i in range(first)]
    try:
        for i in range(first):
            layers[i] = _Pass()
        yield
    finally:
        for i, layer in enumerate(kept):
            layers[i] = layer


def entering(model, layer_index: int, input_ids, attention_mask):
    """The hidden states entering decoder layer `layer_index` [B, T, H], from the model's own forward stopped
    there (no autograd)."""
    layer = decoder_layers(model)[layer_index]
    got = {}

    def grab(module, args, kwargs):
        got["h"] = args[0] if args else kwargs["hidden_states"]
        raise _Stop

    handle = layer.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            backbone(model)._convsim_plain_forward(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    except _Stop:
        pass
    finally:
        handle.remove()
    return got["h"]


def right_padded(attention_mask, width: int):
    """The real lengths of a right-padded batch's rows, or None when the mask is not of that form."""
    if attention_mask is None:
        return None
    m = attention_mask.bool()
    lengths = m.sum(1)
    if attention_mask.dim() != 2 or attention_mask.shape[1] != width:
        return None
    if not torch.equal(m, torch.arange(width, device=m.device)[None, :] < lengths[:, None]):
        return None
    return lengths.tolist()


class PrefixCache:
    """Hidden states entering decoder layer `first`, per example, keyed by the example's token ids."""

    def __init__(self, first: int):
        self.first = first
        self.states: dict[bytes, torch.Tensor] = {}
        self.built_tokens = 0

    def batch(self, model, input_ids, attention_mask, lengths):
        """[B, T, H] cached states for the batch (computed now for the rows not yet cached; zeros at padding)."""
        keys = [input_ids[i, :n].cpu().numpy().tobytes() for i, n in enumerate(lengths)]
        missing = [i for i, k in enumerate(keys) if k not in self.states]
        if missing:
            h = entering(model, self.first, input_ids[missing], attention_mask[missing])
            for j, i in enumerate(missing):
                self.states[keys[i]] = h[j, : lengths[i]].clone()
                self.built_tokens += lengths[i]
        rows = [self.states[k] for k in keys]
        out = rows[0].new_zeros(len(rows), input_ids.shape[1], rows[0].shape[-1])
        for i, r in enumerate(rows):
            out[i, : r.shape[0]] = r
        return out

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.states.values())


def _cached_forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, **kw):
    cache = self._convsim_prefix_cache
    lengths = None
    if (
        self.training
        and input_ids is not None
        and inputs_embeds is None
        and position_ids is None
        and not kw.get("use_cache")
        and kw.get("past_key_values") is None
        and kw.get("cache") is None
    ):
        lengths = right_padded(attention_mask, input_ids.shape[1])
    if lengths is None:
        return self._convsim_plain_forward(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            **kw,
        )
    h = cache.batch(self, input_ids, attention_mask, lengths)
    with passed_through(self.layers, cache.first):
        return self._convsim_plain_forward(inputs_embeds=h, attention_mask=attention_mask, **kw)


def install_prefix_cache(model, first: int) -> PrefixCache:
    """Make training forwards of the model's decoder stack start at layer `first` from cached states (see the
    module docstring). The caller makes sure nothing below layer `first` trains (`freeze_below`)."""
    stack = backbone(model)
    if getattr(stack, "_convsim_prefix_cache", None) is not None:
        return stack._convsim_prefix_cache
    if decoder_layers(model) is not getattr(stack, "layers", None):
        raise ValueError("the cached prefix needs the decoder layers at `<backbone>.layers`")
    stack._convsim_plain_forward = stack.forward
    stack._convsim_prefix_cache = PrefixCache(first)
    stack.forward = types.MethodType(_cached_forward, stack)
    return stack._convsim_prefix_cache


def prefix_cache(model) -> PrefixCache | None:
    """The model's prefix cache, or None when it has none."""
    return getattr(backbone(model), "_convsim_prefix_cache", None)


def freeze_below(model, first: int) -> list[str]:
    """Stop training every parameter below decoder layer `first`: the input embedding (the speaker-token rows,
    which then keep their initial values; with a tied head its speaker rows too, as they are the same rows) and
    the layers under `first`. Returns the names of the parameters frozen here."""
    below = [causal_lm(model).get_input_embeddings(), *list(decoder_layers(model))[:first]]
    ids = {id(p) for m in below for p in m.parameters()}
    frozen = []
    for name, p in model.named_parameters():
        if p.requires_grad and id(p) in ids:
            p.requires_grad_(False)
            frozen.append(name)
    return frozen

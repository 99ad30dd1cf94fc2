"""Where things are inside a causal language model, for every model family convsim loads: the model under
its wrappers, the decoder stack without the output head, the list of decoder layers (for hooks and
compilation), whether the head is tied to the input embedding, and the final logit soft-cap.

    layers = decoder_layers(peft_model)          # nn.ModuleList, through PEFT, DDP/FSDP and torch.compile
    hidden = backbone(peft_model)(input_ids=x).last_hidden_state

Every other module asks here instead of testing a model's class or name.
"""

from __future__ import annotations


def unwrap(model):
    """The model without the wrappers that only run it: DDP/FSDP (`.module`) and `torch.compile`
    (`._orig_mod`). A PEFT model stays a PEFT model (its forward is the one that trains)."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif hasattr(model, "module") and not hasattr(model, "get_base_model"):
            model = model.module
        else:
            return model


def causal_lm(model):
    """The transformers causal LM (`...ForCausalLM`): below the run wrappers and PEFT's."""
    model = unwrap(model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def backbone(model):
    """The decoder stack without the output head (on a large vocabulary the head dominates a forward)."""
    base = causal_lm(model)
    return getattr(base, base.base_model_prefix, base)


def text_config(model):
    """The language model's config (multimodal models keep it in `text_config`)."""
    cfg = causal_lm(model).config
    return getattr(cfg, "text_config", None) or cfg


def decoder_layers(model):
    """The model's list of decoder layers: the shortest-named `...layers` ModuleList with as many entries as
    the config has hidden layers. ValueError when there is none."""
    import torch.nn as nn

    base = causal_lm(model)
    n = getattr(text_config(base), "num_hidden_layers", None)
    best = None
    for name, mod in base.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) == n and name.endswith("layers"):
            if best is None or len(name) < len(best[0]):
                best = (name, mod)
    if best is None:
        raise ValueError("could not find the decoder layers of this model")
    return best[1]


def head_is_tied(model) -> bool:
    """Whether the output head multiplies by the input embedding's own weight (or there is no head)."""
    base = causal_lm(model)
    out, emb = base.get_output_embeddings(), base.get_input_embeddings()
    return out is None or out.weight.data_ptr() == emb.weight.data_ptr()


def logit_softcap(model) -> float | None:
    """The final logit soft-cap (Gemma: logits = tanh(logits / cap) * cap), or None."""
    return getattr(text_config(model), "final_logit_softcapping", None)

"""The default training backend: the base from `models.load_base` (or quantized with bitsandbytes), one
token per speaker, and PEFT's LoRA with the speaker rows trainable (`trainable_token_indices`). With
--lora-layers K, LoRA on the top K decoder layers only; with --cache-frozen-prefix as well, the speaker rows
are frozen and training forwards start from cached states at the first trained layer (`modeling.prefix`).

`load_peft(cfg, speakers, device, spec) -> (model, tok, ids)`, the interface every backend has
(`convsim.training.backends.build_model` picks one by `--backend`).
"""

from __future__ import annotations

from convsim.config import TrainConfig
from convsim.errors import UserError
from convsim.modeling.layers import head_is_tied
from convsim.training.model import (
    frozen_dtype,
    lora_layer_indices,
    lora_targets,
    sharded_training,
    speaker_rows,
    trainable_in_float32,
)


def load_peft(cfg: TrainConfig, speakers, device: str, spec):
    """(model, tok, ids): the base, the speaker tokens, and PEFT's LoRA with the speaker rows trainable."""
    from peft import LoraConfig, get_peft_model
    from convsim.modeling.models import load_base
    from convsim.modeling.speakers import add_speaker_tokens
    import torch

    if cfg.quantization:  # the base is loaded once, quantized (not loaded whole and then again)
        model, tok = _load_quantized(cfg, device)
    else:
        dtype = getattr(torch, frozen_dtype(cfg, device))  # frozen weights; what trains is float32 (below)
        model, tok = load_base(cfg.model, device=device, dtype=dtype)
    ids = {}
    if cfg.special_tokens:
        ids = add_speaker_tokens(model, tok, speakers, cfg.speaker_references, spec.reference_words, seed=cfg.seed)
    layers = lora_layer_indices(cfg, model)
    lora = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha or cfg.lora_r,
        lora_dropout=cfg.lora_dropout,
        use_rslora=cfg.use_rslora,
        target_modules=lora_targets(cfg, spec),
        layers_to_transform=layers,
        trainable_token_indices=speaker_rows(ids, head_is_tied(model)),
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    trainable_in_float32(model)
    from convsim.modeling.fastpeft import patch_trainable_tokens, show_tied_weights

    patch_trainable_tokens(model)
    if cfg.cache_frozen_prefix and sharded_training():
        raise UserError("--cache-frozen-prefix is not supported under FSDP (it swaps decoder layers per forward)")
    if cfg.cache_frozen_prefix:  # nothing below the top layers may train: the speaker rows keep their start
        from convsim.modeling.prefix import freeze_below, install_prefix_cache

        freeze_below(model, layers[0])
        install_prefix_cache(model, layers[0])
    if sharded_training():
        show_tied_weights(model)  # else FSDP2 shards a tied head's weight twice
    return model, tok, ids


def _load_quantized(cfg, device):
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise UserError("--quantization needs the bitsandbytes package (pip install bitsandbytes)") from None
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from convsim.modeling.models import resolve as resolve_model, weights_location, with_pad_token

    spec = resolve_model(cfg.model)
    where = weights_location(spec)
    q = (
        BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_quant_type="nf4")
        if cfg.quantization == "4bit"
        else BitsAndBytesConfig(load_in_8bit=True)
    )
    model = AutoModelForCausalLM.from_pretrained(where, quantization_config=q, device_map={"": device})
    return model, with_pad_token(AutoTokenizer.from_pretrained(where))

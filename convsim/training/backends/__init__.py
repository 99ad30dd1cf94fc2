"""Training backends: each loads the base, adds the speaker tokens and wraps the model in LoRA, behind one
interface, `load_X(cfg, speakers, device, spec) -> (model, tok, ids)`: `peft` (the default) and `unsloth`
(`--backend unsloth`). The backends import the shared settings from `convsim.training.model`, never
each other.

    model, tok, spec, ids = build_model(TrainConfig(model="tiny-gemma3"), ["Ana", "Ben"], "cpu")
"""

from __future__ import annotations

from convsim.config import TrainConfig
from convsim.errors import UserError


def build_model(cfg: TrainConfig, speakers, device: str):
    """(model, tok, spec, ids) for `convsim train`, from the backend `cfg.backend` names."""
    from convsim.modeling.models import resolve as resolve_model

    spec = resolve_model(cfg.model)
    if cfg.quantization and not device.startswith("cuda"):
        raise UserError(f"--quantization {cfg.quantization} needs a CUDA GPU (bitsandbytes); on CPU train without it")
    if cfg.backend == "unsloth":
        from convsim.training.backends.unsloth import load_unsloth

        model, tok, ids = load_unsloth(cfg, speakers, device, spec)
    else:
        from convsim.training.backends.peft import load_peft

        model, tok, ids = load_peft(cfg, speakers, device, spec)
    return model, tok, spec, ids

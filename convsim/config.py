"""Typed configuration: the dataclass is the config. `TrainConfig` holds every `convsim train` setting;
a YAML file holds the same fields (unknown keys are an error), command-line flags override it, and the
resolved config is saved in the run directory as `config.yaml`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from convsim.errors import UserError


@dataclass
class TrainConfig:
    model: str = "gemma-3-270m"
    targets: list[str] = field(default_factory=lambda: ["all"])
    epochs: float = 1.0
    batch_size: int = 8
    grad_accum: int = 1
    learning_rate: float = 2e-4
    warmup_ratio: float = 0.05
    weight_decay: float = 0.0
    max_steps: int = -1
    time_budget: float | None = None          # minutes
    max_seq_length: int = 512
    lora_r: int = 16
    lora_alpha: int | None = None             # default: = r (the seed used alpha = r with rsLoRA)
    lora_dropout: float = 0.0
    use_rslora: bool = True
    special_tokens: bool = True
    include_mlp: bool = True
    instruct_format: bool | None = None       # default: the model row's prompt style
    loss: str = "reply"                       # "reply" (only the reply) or "whole" (the seed's: all text)
    context_size: int = 8
    max_burst: int = 8
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    max_val_examples: int = 200
    eval_steps: int = 50
    save_steps: int = 50
    logging_steps: int = 10
    samples: int = 4                          # validation replies sampled at each evaluation
    seed: int = 0
    quantization: str | None = None           # "4bit" | "8bit" (CUDA)
    backend: str = "peft"                     # "peft" | "unsloth"
    speaker_references: dict[str, list[str]] = field(default_factory=dict)

    def validate(self) -> "TrainConfig":
        if self.loss not in ("reply", "whole"):
            raise UserError(f"--loss must be reply or whole, not {self.loss!r}")
        if self.quantization not in (None, "4bit", "8bit"):
            raise UserError(f"--quantization must be 4bit or 8bit, not {self.quantization!r}")
        if self.backend not in ("peft", "unsloth"):
            raise UserError(f"--backend must be peft or unsloth, not {self.backend!r}")
        for name in ("batch_size", "grad_accum", "lora_r", "max_seq_length", "context_size", "max_burst"):
            if getattr(self, name) < 1:
                raise UserError(f"{name.replace('_', '-')} must be at least 1")
        if self.epochs <= 0 and self.max_steps <= 0:
            raise UserError("give --epochs > 0 or --max-steps > 0")
        return self


def load_yaml(path: str | Path, cls=TrainConfig) -> dict:
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of settings")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise UserError(f"{path}: unknown setting(s) {', '.join(unknown)}")
    return data


def resolve(cls, yaml_path: str | None, overrides: dict):
    """Defaults ← YAML ← flags that were given (None means 'not given')."""
    values = load_yaml(yaml_path, cls) if yaml_path else {}
    values.update({k: v for k, v in overrides.items() if v is not None})
    return cls(**values)


def to_yaml(cfg) -> str:
    return yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False, allow_unicode=True)

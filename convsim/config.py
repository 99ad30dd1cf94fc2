"""Typed configuration: the dataclass is the config. `TrainConfig` holds every `convsim train` setting;
a YAML file holds the same fields (unknown keys are an error), command-line flags override it, and the
resolved config is saved in the run directory as `config.yaml`.
"""

from __future__ import annotations

import dataclasses
import types
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Union, get_args, get_origin, get_type_hints

import yaml

from convsim.errors import UserError, brief


@dataclass
class TrainConfig:
    model: str = "gemma-3-270m"
    targets: list[str] = field(default_factory=lambda: ["all"])
    extra_data: list[str] = field(default_factory=list)  # training-only data dirs (see `convsim train --help`)
    extra_data_ratio: float = 0.0  # at most this many extra messages per main training message (0: all)
    auto_extra_data: bool = True  # with no extra_data: use DATA_DIR/extra when it holds conversations
    pair_repeat: int = 1  # the chat's own training examples this many times per epoch (extra data once)
    epochs: float = 2.0
    batch_size: int = 32
    grad_accum: int = 1
    learning_rate: float = 2e-4
    warmup_ratio: float = 0.05
    weight_decay: float = 0.0
    max_steps: int = -1
    train_tokens: int | None = None  # an amount of work: about this many real training tokens, then stop
    time_budget: float | None = None  # minutes
    recipe: str = "auto"  # "auto": the CPU recipe on a machine without a GPU, else the GPU recipe; "cpu" | "gpu"
    cpu_minutes: float = 50.0  # the CPU recipe's work: what this many minutes of the machine's threads train
    max_seq_length: int = 512
    lora_r: int = 16
    lora_alpha: int | None = None  # default: = r (the seed used alpha = r with rsLoRA)
    lora_dropout: float = 0.0
    use_rslora: bool = True
    special_tokens: bool = True
    include_mlp: bool = True
    lora_layers: int | None = None  # LoRA on the top K decoder layers only; default: all of them
    cache_frozen_prefix: bool = False  # with lora_layers: train the top layers from cached lower states
    instruct_format: bool | None = None  # default: the model row's prompt style
    loss: str = "reply"  # "reply" (only the reply) or "whole" (the seed's: all text)
    context_size: int = 16
    max_burst: int = 8
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    max_val_examples: int = 200
    eval_steps: int = 50
    save_steps: int = 50
    logging_steps: int = 10
    samples: int = 4  # validation replies sampled at each evaluation
    seed: int = 0
    quantization: str | None = None  # "4bit" | "8bit" (CUDA)
    backend: str = "peft"  # "peft" | "unsloth"
    activation_checkpointing: bool | None = None  # default: on only for models of 1B parameters or more
    compile: bool | None = None  # torch.compile each decoder layer; default: on CUDA
    frozen_dtype: str | None = None  # "float32" | "bfloat16"; default bf16 on CUDA, native-bf16 CPUs
    group_by_length: bool | None = None  # batches of similar lengths (less padding); default: off
    packing: bool | None = None  # padding-free batches: a batch's examples in one row; default: off
    keep_best: bool = False  # end with the weights of the lowest validation loss seen
    speaker_references: dict[str, list[str]] = field(default_factory=dict)

    def validate(self) -> "TrainConfig":
        if self.loss not in ("reply", "whole"):
            raise UserError(f"--loss must be reply or whole, not {self.loss!r}")
        if self.quantization not in (None, "4bit", "8bit"):
            raise UserError(f"--quantization must be 4bit or 8bit, not {self.quantization!r}")
        if self.frozen_dtype not in (None, "float32", "bfloat16"):
            raise UserError(f"--frozen-dtype must be float32 or bfloat16, not {self.frozen_dtype!r}")
        if self.backend not in ("peft", "unsloth"):
            raise UserError(f"--backend must be peft or unsloth, not {self.backend!r}")
        for name in (
            "batch_size",
            "grad_accum",
            "lora_r",
            "max_seq_length",
            "context_size",
            "max_burst",
            "pair_repeat",
        ):
            if getattr(self, name) < 1:
                raise UserError(f"{name.replace('_', '-')} must be at least 1")
        if self.lora_layers is not None and self.lora_layers < 1:
            raise UserError(f"--lora-layers must be at least 1, not {self.lora_layers}")
        if self.cache_frozen_prefix and self.lora_layers is None:
            raise UserError("--cache-frozen-prefix needs --lora-layers K (the layers below the top K are cached)")
        if self.cache_frozen_prefix and self.packing:
            raise UserError("--cache-frozen-prefix works on padded batches; leave out --packing")
        if self.lora_layers is not None and self.backend != "peft":
            raise UserError("--lora-layers needs --backend peft")
        if self.extra_data_ratio < 0:
            raise UserError(f"--extra-data-ratio must be 0 or more, not {self.extra_data_ratio:g}")
        if self.recipe not in ("auto", "cpu", "gpu"):
            raise UserError(f"--recipe must be auto, cpu or gpu, not {self.recipe!r}")
        if self.cpu_minutes <= 0:
            raise UserError(f"--cpu-minutes must be more than 0, not {self.cpu_minutes:g}")
        if self.train_tokens is not None and self.train_tokens < 1:
            raise UserError(f"--train-tokens must be at least 1, not {self.train_tokens}")
        if self.train_tokens is not None and self.max_steps > 0:
            raise UserError("give --train-tokens or --max-steps, not both")
        if self.epochs <= 0 and self.max_steps <= 0:
            raise UserError("give --epochs > 0 or --max-steps > 0")
        return self


def safe_yaml(text: str):
    """YAML → plain data with the safe loader (no Python objects from tags like !!python/object/apply);
    libyaml's when installed: fast, and it refuses nesting deeper than 1000 levels at once instead of
    spending seconds in the pure-Python parser before a RecursionError."""
    return yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def yaml_problem(e: Exception) -> str:
    """One line saying what is wrong with a YAML text (libyaml's first line is only its context)."""
    problem = getattr(e, "problem", None)
    mark = getattr(e, "problem_mark", None)
    if problem:
        return f"{problem}{f' at line {mark.line + 1}' if mark is not None else ''}"
    return (str(e).splitlines() or [type(e).__name__])[0][:200]


def load_yaml(path: str | Path, cls=TrainConfig) -> dict:
    """The settings of a YAML config file, checked against the fields of `cls` (names and types)."""
    from convsim.fsutil import read_user_text

    text = read_user_text(path, "config file", max_bytes=1 << 20)
    try:
        data = safe_yaml(text)
    except (yaml.YAMLError, ValueError) as e:  # ValueError: a date-like scalar such as 2024-13-45
        raise UserError(f"{path}: not valid YAML ({yaml_problem(e)})") from None
    except RecursionError:
        raise UserError(f"{path}: YAML nested too deeply") from None
    if data is None:  # an empty file: no settings, the defaults
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of settings")
    known = get_type_hints(cls)
    unknown = sorted(str(k) for k in data if k not in {f.name for f in fields(cls)})
    if unknown:
        raise UserError(f"{path}: unknown setting(s) {', '.join(unknown)}")
    for name, value in data.items():
        if not _fits(value, known[name]):
            raise UserError(f"{path}: {name} must be {_describe(known[name])}, not {brief(value)}")
    return data


def _fits(value, tp) -> bool:
    """Does a YAML value fit a field's type (the type itself, from `typing.get_type_hints`)?"""
    origin, args = get_origin(tp), get_args(tp)
    if origin in (Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if isinstance(value, bool):  # YAML's true/false is never a number
        return False
    if tp is int:
        return isinstance(value, int)
    if tp is float:
        return isinstance(value, (int, float))
    if tp is str:
        return isinstance(value, str)
    if origin is list:
        return isinstance(value, list) and all(_fits(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(_fits(k, args[0]) and _fits(v, args[1]) for k, v in value.items())
    return False


def _describe(tp) -> str:
    """A field's type in words, for an error message."""
    origin, args = get_origin(tp), get_args(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is list:
        return f"a list of {_describe(args[0]).removeprefix('a ').removeprefix('an ')}s"
    if origin is dict:
        value = _describe(args[1])
        return (
            f"a mapping of names to {'lists' + value.removeprefix('a list') if value.startswith('a list') else value}"
        )
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false", type(None): "null"}
    return names.get(tp, getattr(tp, "__name__", str(tp)))


def resolve(cls, yaml_path: str | None, overrides: dict):
    """Defaults ← YAML ← flags that were given (None means 'not given')."""
    values = load_yaml(yaml_path, cls) if yaml_path else {}
    values.update({k: v for k, v in overrides.items() if v is not None})
    return cls(**values)


def to_yaml(cfg) -> str:
    return yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False, allow_unicode=True)

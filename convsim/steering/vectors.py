"""Steering vectors, the value: layer → direction with its metadata, arithmetic, save/load (safetensors
with the metadata as a JSON string; no pickle). Built by `convsim.steering.build`, applied by
`convsim.steering.apply`:

    v = from_phrases(model, tok, {"i feel happy": 0.25, "i feel sad": -0.25}, layers=-5)
    v.save("happy.safetensors");  v = SteeringVector.load("happy.safetensors")
    with steer(model, v, 4.0):                      # greedy, sampled or streamed generation inside
        reply(model, tok, fmt, history, "Ana")
    with apply_steer_arg(model, "happy.safetensors:4"): ...      # what `--steer VECTOR[:STRENGTH]` does

The hook point is the output of a decoder layer (the residual stream after that layer); layers are
absolute indices into `decoder_layers(model)`, and `layer_from_last=-5` means `decoder_layers[-5]`.
A phrase's activation is pooled over the phrase's own tokens: the BOS and an optional speaker-token
prefix give it context but are not pooled, padding never is. Files are safetensors with the metadata
as a JSON string (no pickle). `convsim steer` (steering/cli.py) builds vectors and sweeps strength.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import torch

from convsim.errors import UserError
from convsim.modeling.layers import decoder_layers, text_config

FORMAT = "convsim-steering-vector/1"
HOOK_POINT = "decoder_layer_output"  # the residual stream after the layer


# ----------------------------------------------------------------------------- model identity


def model_key(model) -> str:
    """A name for the base model that survives reloading: the last part of the path/hub id it was loaded
    from, else its architecture and size (random tiny models)."""
    cfg = text_config(model)
    path = getattr(cfg, "_name_or_path", "") or ""
    if path:
        return Path(path.rstrip("/")).name
    return f"{cfg.model_type}-h{cfg.hidden_size}-l{len(decoder_layers(model))}"


def model_shape(model) -> tuple[int, int]:
    """(hidden size, number of decoder layers)."""
    return int(text_config(model).hidden_size), len(decoder_layers(model))


def resolve_layers(layers: int | Sequence[int], num_layers: int) -> list[int]:
    """Absolute layer indices; negative ones count from the last layer (-1 = the last)."""
    out = []
    for l in [layers] if isinstance(layers, int) else list(layers):
        a = int(l) + num_layers if int(l) < 0 else int(l)
        if not 0 <= a < num_layers:
            raise UserError(
                f"layer {l} is out of range: the model has {num_layers} decoder layers "
                f"(use 0..{num_layers - 1}, or -1..-{num_layers} from the last)"
            )
        out.append(a)
    return sorted(set(out))


# ----------------------------------------------------------------------------- the value


@dataclass
class SteeringVector:
    """Directions to add to the residual stream, one per decoder layer, and what they fit."""

    directions: dict[int, torch.Tensor]  # absolute layer index -> [hidden_size] float32
    model: str  # model_key() of the base model it was built on
    hidden_size: int
    num_layers: int
    adapter_hash: str = "none"  # the adapter it was built with (steering works across them)
    base_model: str = ""  # human name (run's model row), shown in messages
    hook: str = HOOK_POINT
    method: str = ""  # how it was built: phrases, pairs-mean, pairs-pca, sentiment, ...
    info: dict = field(default_factory=dict)  # build settings: phrases, pool, alphas, counts

    def __post_init__(self):
        self.directions = {int(k): v.detach().float().cpu().reshape(-1) for k, v in self.directions.items()}
        for k, v in self.directions.items():
            assert v.numel() == self.hidden_size, f"layer {k}: {v.numel()} values, expected {self.hidden_size}"
            assert 0 <= k < self.num_layers, f"layer {k} outside 0..{self.num_layers - 1}"

    @property
    def layers(self) -> list[int]:
        return sorted(self.directions)

    def norms(self) -> dict[int, float]:
        return {k: float(v.norm()) for k, v in sorted(self.directions.items())}

    # arithmetic: layers missing on one side count as zero
    def _combine(self, other: "SteeringVector", sign: float, what: str) -> "SteeringVector":
        if not isinstance(other, SteeringVector):
            return NotImplemented
        if (self.model, self.hidden_size, self.num_layers, self.hook) != (
            other.model,
            other.hidden_size,
            other.num_layers,
            other.hook,
        ):
            raise UserError(
                f"cannot {what} steering vectors of different models or hook points "
                f"({self.model}/{self.hidden_size}x{self.num_layers} vs "
                f"{other.model}/{other.hidden_size}x{other.num_layers})"
            )
        dirs = {k: v.clone() for k, v in self.directions.items()}
        for k, v in other.directions.items():
            dirs[k] = dirs[k] + sign * v if k in dirs else sign * v
        return replace(
            self,
            directions=dirs,
            method=f"({self.method or '?'} {'+' if sign > 0 else '-'} {other.method or '?'})",
            info={},
        )

    def __add__(self, other):
        return self._combine(other, 1.0, "add")

    def __sub__(self, other):
        return self._combine(other, -1.0, "subtract")

    def __mul__(self, k):
        if not isinstance(k, (int, float)):
            return NotImplemented
        return replace(
            self,
            directions={l: v * float(k) for l, v in self.directions.items()},
            method=f"{float(k):g}*{self.method or '?'}",
        )

    __rmul__ = __mul__

    def __truediv__(self, k):
        return self * (1.0 / k) if isinstance(k, (int, float)) else NotImplemented

    def __neg__(self):
        return self * -1.0

    def at_layers(self, layers: Sequence[int]) -> "SteeringVector":
        """The same direction at other absolute layers (a single-layer vector is copied to each; the seed
        built at -5 and applied at -2)."""
        return replace(self, directions={l: self.direction_for(l) for l in layers})

    def normalized(self, fraction: float) -> "SteeringVector":
        """Each layer's direction rescaled to `fraction` of that layer's residual-stream norm (as recorded
        at build time in info["residual_norm"]), so that strength 1 adds that fraction at every layer; a
        multi-layer vector then spreads its push evenly instead of by each layer's raw difference."""
        res = self.info.get("residual_norm") or {}
        missing = [l for l in self.layers if str(l) not in res]
        if missing:
            raise UserError(f"the vector has no recorded residual norm for layer(s) {missing}; rebuild it")
        if not (math.isfinite(fraction) and fraction > 0):
            raise UserError(f"the normalising fraction must be a positive number, not {fraction!r}")
        dirs = {
            l: v * (float(fraction) * res[str(l)] / max(float(v.norm()), 1e-12)) for l, v in self.directions.items()
        }
        return replace(self, directions=dirs, info={**self.info, "normalized": float(fraction)})

    def direction_for(self, layer: int) -> torch.Tensor:
        if layer in self.directions:
            return self.directions[layer]
        if len(self.directions) == 1:
            return next(iter(self.directions.values()))
        raise UserError(f"the vector has no direction for layer {layer} (it has layers {self.layers})")

    def check_fits(self, model) -> None:
        """Refuse (UserError) a model of another base, hidden size or depth."""
        hidden, n = model_shape(model)
        problems = []
        if hidden != self.hidden_size:
            problems.append(f"hidden size {hidden} vs the vector's {self.hidden_size}")
        if n != self.num_layers:
            problems.append(f"{n} decoder layers vs the vector's {self.num_layers}")
        key = model_key(model)
        if key != self.model:
            problems.append(f"base model {key!r} vs the vector's {self.model!r}")
        if problems:
            raise UserError(
                f"this steering vector was built for {self.base_model or self.model} and does not fit "
                f"this model: {'; '.join(problems)}"
            )

    # files
    def metadata(self) -> dict:
        return {
            "format": FORMAT,
            "model": self.model,
            "base_model": self.base_model,
            "hidden_size": self.hidden_size,
            "num_layers": self.num_layers,
            "layer_numbering": "absolute index into decoder_layers(model)",
            "hook": self.hook,
            "adapter_hash": self.adapter_hash,
            "method": self.method,
            "layers": self.layers,
            "info": self.info,
        }

    def save(self, path) -> Path:
        from safetensors.torch import save_file
        from convsim.fsutil import atomic_path

        path = Path(path)
        tensors = {f"layer.{k}": v.contiguous() for k, v in self.directions.items()}
        with atomic_path(path) as tmp:  # owner-only: a vector can be built from private messages
            save_file(tensors, str(tmp), metadata={"convsim": json.dumps(self.metadata(), ensure_ascii=False)})
        return path

    @staticmethod
    def load(path) -> "SteeringVector":
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        if not path.is_file():
            raise UserError(f"steering vector {path} not found")
        try:
            with safe_open(str(path), framework="pt") as f:
                raw = (f.metadata() or {}).get("convsim")
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError, ValueError) as e:
            raise UserError(f"{path}: not a safetensors file ({str(e)[:120]})") from None
        try:
            meta = json.loads(raw)
            assert meta.get("format") == FORMAT
            dirs = {int(k.split(".", 1)[1]): v for k, v in tensors.items() if k.startswith("layer.")}
            assert dirs
            return SteeringVector(
                dirs,
                meta["model"],
                int(meta["hidden_size"]),
                int(meta["num_layers"]),
                meta.get("adapter_hash", "none"),
                meta.get("base_model", ""),
                meta.get("hook", HOOK_POINT),
                meta.get("method", ""),
                meta.get("info") or {},
            )
        except (TypeError, ValueError, KeyError, AssertionError):
            raise UserError(f"{path}: not a convsim steering vector (missing or bad metadata)") from None


def residual_norms(*acts: dict[int, torch.Tensor]) -> dict[str, float]:
    """Mean norm of the pooled activations per layer: the scale a strength should be judged against."""
    layers = acts[0].keys()
    return {str(l): round(float(torch.cat([a[l] for a in acts]).norm(dim=1).mean()), 2) for l in layers}


def suggest_strengths(vector: SteeringVector, fractions=(0.025, 0.05, 0.1, 0.15)) -> list[float]:
    """Strengths adding these fractions of the residual norm (around 0.1 moved sentiment clearly at a
    small perplexity cost on the embedded model); [1, 2, 4, 8] when the vector has no record of it."""
    res = vector.info.get("residual_norm") or {}
    ratios = [res[str(l)] / n for l, n in vector.norms().items() if str(l) in res and n > 0]
    if not ratios:
        return [1.0, 2.0, 4.0, 8.0]
    r = sum(ratios) / len(ratios)
    return [float(f"{f * r:.2g}") for f in fractions]


def new_vector(
    model,
    directions: dict[int, torch.Tensor],
    method: str,
    info: dict,
    base_model: str = "",
    adapter_hash: str = "none",
) -> SteeringVector:
    hidden, n = model_shape(model)
    return SteeringVector(
        directions, model_key(model), hidden, n, adapter_hash, base_model or model_key(model), HOOK_POINT, method, info
    )

"""Applying a steering vector: `steer()`, the context manager that adds one to the residual stream (the
output of decoder layers) while the model runs and removes its hooks in `finally`, and `--steer
VECTOR[:STRENGTH]` for the conversation commands.

    with steer(model, v, 4.0):                      # greedy, sampled or streamed generation inside
        reply(model, tok, fmt, history, "Ana")
    with apply_steer_arg(model, "happy.safetensors:4"): ...
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator, Sequence

import torch

from convsim.errors import UserError
from convsim.modeling.activations import layer_output
from convsim.modeling.layers import decoder_layers
from convsim.steering.vectors import SteeringVector, new_vector, resolve_layers


@contextlib.contextmanager
def steer(
    model,
    vector: SteeringVector,
    strength: float = 1.0,
    layers: Sequence[int] | int | None = None,
    positions: str | int = "all",
) -> Iterator[SteeringVector]:
    """Add `strength * vector` to the output hidden states of decoder layers while the block runs.

    layers: absolute (or negative) indices; default the vector's own. A single-layer vector is applied
    at whichever layers are named. positions: "all" steers every position of every pass (prompt and
    decode); "new" steers decode steps only (passes of one token: the seed's behaviour), so the prompt
    pass is untouched; an int p steers positions >= p of a longer pass, and every decode step (teacher
    forcing equivalent of "new" when p is the prompt length). The hooks live on the modules, not the
    thread, so generation in another thread (streaming) is steered too; they are removed in `finally`."""
    vector.check_fits(model)
    if positions not in ("all", "new") and not isinstance(positions, int):
        raise UserError(f"positions must be all, new or an index, not {positions!r}")
    mods = decoder_layers(model)
    absl = resolve_layers(layers, len(mods)) if layers is not None else vector.layers
    p = next(model.parameters())
    handles = []
    try:
        if strength != 0:
            for l in absl:
                delta = (float(strength) * vector.direction_for(l)).to(device=p.device, dtype=p.dtype)
                handles.append(mods[l].register_forward_hook(_adder(delta, positions)))
        yield vector
    finally:
        for h in handles:
            h.remove()


def _adder(delta: torch.Tensor, positions):
    def hook(module, args, output):
        h = layer_output(output)
        T = h.shape[1]
        if T == 1 or positions == "all":
            h2 = h + delta.to(h.dtype)
        elif positions == "new" or positions >= T:
            return None
        else:
            h2 = torch.cat([h[:, :positions], h[:, positions:] + delta.to(h.dtype)], dim=1)
        return (h2, *output[1:]) if isinstance(output, tuple) else h2

    return hook


def active_hooks(model) -> int:
    """How many forward hooks sit on the decoder layers (tests check steer() leaves none)."""
    return sum(len(m._forward_hooks) for m in decoder_layers(model))


# ----------------------------------------------------------------------------- `--steer VECTOR[:STRENGTH]`


def parse_steer_arg(arg: str, default_strength: float = 1.0) -> tuple[SteeringVector, float]:
    """ "vec.safetensors:4.0" -> (vector, 4.0); without ":STRENGTH" the strength is `default_strength`."""
    path, strength = arg, default_strength
    head, sep, tail = arg.rpartition(":")
    if sep and head:
        try:
            strength = float(tail)
            path = head
        except ValueError:
            pass
    if not math.isfinite(strength):
        raise UserError(f"--steer strength must be a finite number, not {tail!r}")
    return SteeringVector.load(path), strength


@contextlib.contextmanager
def apply_steer_arg(model, arg: str, positions: str = "new"):
    """Context manager for the conversation commands' `--steer VECTOR[:STRENGTH]`: decode steps only, as
    `convsim steer sweep` measures by default (the seed's behaviour)."""
    vector, strength = parse_steer_arg(arg)
    with steer(model, vector, strength, positions=positions) as v:
        yield v


def generate_with_steering(
    model,
    prompt: str,
    tokenizer,
    steering_vector,
    layer_from_last: int = -2,
    strength: float = 0.5,
    max_new_tokens: int = 100,
    temperature: float = 0.7,
    top_p: float = 0.95,
    positions: str = "new",
) -> str:
    """The seed's function: generate after a text prompt with the vector added at `layer_from_last`
    on decode steps (its behaviour); returns the new text. A plain tensor is accepted as the seed's was."""
    n = len(decoder_layers(model))
    if isinstance(steering_vector, torch.Tensor):
        steering_vector = new_vector(model, {n - 1: steering_vector}, "tensor", {})
    layer = resolve_layers(layer_from_last, n)
    dev = next(model.parameters()).device
    x = tokenizer(prompt, return_tensors="pt").to(dev)
    kw = dict(do_sample=True, temperature=temperature, top_p=top_p) if temperature > 0 else dict(do_sample=False)
    with steer(model, steering_vector, strength, layers=layer, positions=positions), torch.inference_mode():
        out = model.generate(**x, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, **kw)
    return tokenizer.decode(out[0, x["input_ids"].shape[1] :], skip_special_tokens=True)

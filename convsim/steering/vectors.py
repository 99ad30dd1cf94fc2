"""Steering vectors: a value type (layer → direction, with metadata), ways to build one, and `steer()`,
the context manager that adds one to a model's residual stream while it generates.

    v = from_phrases(model, tok, {"i feel happy": 0.25, "i feel sad": -0.25}, layers=-5)
    v.save("happy.safetensors");  v = SteeringVector.load("happy.safetensors")
    with steer(model, v, 4.0):                      # greedy, sampled or streamed generation inside
        reply(model, tok, fmt, history, "Ana")
    with apply_steer_arg(model, "happy.safetensors:4"): ...      # what `--steer VECTOR[:STRENGTH]` does

The hook point is the output of a decoder layer (the residual stream after that layer); layers are
absolute indices into `decoder_layers(model)`, and `layer_from_last=-5` means `decoder_layers[-5]`.
A phrase's activation is pooled over the phrase's own tokens: the BOS and an optional speaker-token
prefix give it context but are not pooled, padding never is. Files are safetensors with the metadata
as a JSON string (no pickle). `convsim steer` (steering_cli.py) builds vectors and sweeps strength.
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator, Sequence

import torch

from convsim.errors import UserError
from convsim.modeling.activations import POOLS, Pool
from convsim.modeling.layers import backbone, decoder_layers, text_config

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


# ----------------------------------------------------------------------------- activations


def _layer_output(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def encode_phrase(tok, text: str, prefix: Sequence[int] = ()) -> tuple[list[int], int]:
    """(ids, start): BOS + prefix + the phrase; `start` is where the phrase's own tokens begin."""
    head = ([tok.bos_token_id] if tok.bos_token_id is not None else []) + list(prefix)
    body = tok((" " + text.strip()) if prefix else text.strip(), add_special_tokens=False)["input_ids"]
    return head + body, len(head)


@torch.no_grad()
def pooled_states(
    model,
    tok,
    texts: Sequence[str],
    layers: Sequence[int],
    pool: str | Pool = "mean",
    prefix: Sequence[int] | Sequence[Sequence[int]] = (),
    batch_size: int = 16,
) -> dict[int, torch.Tensor]:
    """For each absolute layer, [len(texts), hidden] activations at that layer's output, pooled over each
    text's own tokens. `prefix` is one token list for all texts or one per text."""
    if not texts:
        raise UserError("no texts to build a steering vector from")
    pool_fn = POOLS[pool] if isinstance(pool, str) else pool
    per_text = bool(prefix) and isinstance(prefix[0], (list, tuple))
    mods = decoder_layers(model)
    dev = next(model.parameters()).device
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    out: dict[int, list[torch.Tensor]] = {l: [] for l in layers}
    for i in range(0, len(texts), batch_size):
        enc = [
            encode_phrase(tok, t, prefix[i + j] if per_text else prefix)
            for j, t in enumerate(texts[i : i + batch_size])
        ]
        T = max(len(ids) for ids, _ in enc)
        ids = torch.full((len(enc), T), pad, dtype=torch.long)
        attn = torch.zeros((len(enc), T), dtype=torch.long)
        pool_mask = torch.zeros((len(enc), T), dtype=torch.bool)
        for j, (row, start) in enumerate(enc):
            ids[j, : len(row)] = torch.tensor(row)
            attn[j, : len(row)] = 1
            pool_mask[j, start : len(row)] = True
            if start >= len(row):  # an empty phrase: pool its last context token instead
                pool_mask[j, len(row) - 1] = True
        got: dict[int, torch.Tensor] = {}
        handles = [
            mods[l].register_forward_hook(lambda m, a, o, l=l: got.__setitem__(l, _layer_output(o).detach()))
            for l in layers
        ]
        try:
            backbone(model)(input_ids=ids.to(dev), attention_mask=attn.to(dev), use_cache=False)
        finally:
            for h in handles:
                h.remove()
        for l in layers:
            out[l].append(pool_fn(got[l].float(), pool_mask.to(dev)).cpu())
    return {l: torch.cat(v) for l, v in out.items()}


def speaker_prefix(tok, fmt, speaker: str | None) -> list[int]:
    """The speaker's tag ids (the optional phrase prefix), or nothing."""
    if not speaker:
        return []
    from convsim.data.examples import tag_ids

    if speaker not in fmt.speakers:
        raise UserError(f"unknown speaker {speaker!r}; this run knows {', '.join(fmt.speakers)}")
    return tag_ids(tok, fmt, speaker)


# ----------------------------------------------------------------------------- building


def from_phrases(
    model,
    tok,
    weights: dict[str, float],
    layers: int | Sequence[int] = -5,
    pos_alpha: float = 1.0,
    neg_alpha: float = 1.0,
    pool: str = "mean",
    prefix: Sequence[int] = (),
    **meta,
) -> SteeringVector:
    """The seed's recipe: each phrase's pooled activation times |weight|; positive and negative phrases
    averaged separately; vector = pos_alpha * mean(pos) - neg_alpha * mean(neg). No normalisation."""
    pos = [(p, w) for p, w in weights.items() if w > 0]
    neg = [(p, w) for p, w in weights.items() if w < 0]
    if not pos and not neg:
        raise UserError("the phrases need non-zero weights (positive pulls toward, negative away)")
    absl = resolve_layers(layers, model_shape(model)[1])
    texts = [p for p, _ in pos + neg]
    acts = pooled_states(model, tok, texts, absl, pool, prefix)
    scale = torch.tensor([abs(float(w)) for _, w in pos + neg])[:, None]
    dirs = {}
    for l, a in acts.items():
        a = a * scale
        v = torch.zeros(a.shape[1])
        if pos:
            v = v + pos_alpha * a[: len(pos)].mean(0)
        if neg:
            v = v - neg_alpha * a[len(pos) :].mean(0)
        dirs[l] = v
    info = {
        "phrases": {p: float(w) for p, w in weights.items()},
        "pos_alpha": pos_alpha,
        "neg_alpha": neg_alpha,
        "pool": pool if isinstance(pool, str) else "custom",
        "prefix_ids": list(prefix),
        "residual_norm": residual_norms(acts),
    }
    return new_vector(model, dirs, "phrases", info, **meta)


def from_pairs(
    model,
    tok,
    pairs: Sequence[tuple[str, str]],
    layers: int | Sequence[int] = -5,
    method: str = "mean",
    pool: str = "mean",
    prefix: Sequence[int] = (),
    **meta,
) -> SteeringVector:
    """Contrastive pairs (toward, away): the mean of the differences, or ("pca") the first principal
    component of the differences (uncentred, so the shared shift counts), sign-aligned with their mean
    and scaled to the differences' mean projection on it."""
    if not pairs:
        raise UserError("no contrastive pairs given")
    if method not in ("mean", "pca"):
        raise UserError(f"unknown pairs method {method!r}: use mean or pca")
    absl = resolve_layers(layers, model_shape(model)[1])
    pos = pooled_states(model, tok, [p for p, _ in pairs], absl, pool, prefix)
    neg = pooled_states(model, tok, [n for _, n in pairs], absl, pool, prefix)
    dirs = {l: aggregate(pos[l] - neg[l], method) for l in absl}
    return new_vector(
        model,
        dirs,
        f"pairs-{method}",
        {"pairs": len(pairs), "pool": pool, "prefix_ids": list(prefix), "residual_norm": residual_norms(pos, neg)},
        **meta,
    )


def aggregate(diffs: torch.Tensor, method: str = "mean") -> torch.Tensor:
    """[N, H] differences -> one [H] direction."""
    mean = diffs.mean(0)
    if method == "mean" or diffs.shape[0] < 2:
        return mean
    _, _, vh = torch.linalg.svd(diffs.double(), full_matrices=False)
    pc = vh[0].float()
    if torch.dot(pc, mean) < 0:
        pc = -pc
    return pc * (diffs @ pc).mean()


def from_texts(
    model,
    tok,
    positive: Sequence[str],
    negative: Sequence[str],
    layers: int | Sequence[int] = -5,
    pool: str = "mean",
    prefix_pos=(),
    prefix_neg=(),
    method: str = "texts",
    info: dict | None = None,
    **meta,
) -> SteeringVector:
    """Two unpaired sets of texts: mean(positive) - mean(negative) activations."""
    if not positive or not negative:
        raise UserError(f"need texts on both sides (got {len(positive)} positive, {len(negative)} negative)")
    absl = resolve_layers(layers, model_shape(model)[1])
    p = pooled_states(model, tok, list(positive), absl, pool, prefix_pos)
    n = pooled_states(model, tok, list(negative), absl, pool, prefix_neg)
    dirs = {l: p[l].mean(0) - n[l].mean(0) for l in absl}
    return new_vector(
        model,
        dirs,
        method,
        {
            "positive": len(positive),
            "negative": len(negative),
            "pool": pool,
            "residual_norm": residual_norms(p, n),
            **(info or {}),
        },
        **meta,
    )


def vader():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def sentiment_texts(messages: Sequence, k: int = 64, margin: float = 0.05) -> tuple[list, list]:
    """The `k` most positive and `k` most negative messages by VADER compound score (ties by order);
    only messages clearly on their side (|compound| > margin) count."""
    an = vader()
    scored = [(an.polarity_scores(m.text)["compound"], i, m) for i, m in enumerate(messages)]
    pos = sorted((s for s in scored if s[0] > margin), key=lambda s: (-s[0], s[1]))[:k]
    neg = sorted((s for s in scored if s[0] < -margin), key=lambda s: (s[0], s[1]))[:k]
    return [m for _, _, m in pos], [m for _, _, m in neg]


def from_sentiment(model, tok, fmt, messages: Sequence, k: int = 64, layers=-5, pool="mean", **meta) -> SteeringVector:
    """A person's own happy-minus-sad direction: their most positive vs most negative messages by VADER,
    each read after its author's speaker tag."""
    pos, neg = sentiment_texts(messages, k)
    if len(pos) < 2 or len(neg) < 2:
        raise UserError(
            f"too few clearly positive ({len(pos)}) or negative ({len(neg)}) messages to build a "
            "sentiment vector; use --phrases or --pairs"
        )
    return from_texts(
        model,
        tok,
        [m.text for m in pos],
        [m.text for m in neg],
        layers,
        pool,
        [speaker_prefix(tok, fmt, m.speaker) for m in pos],
        [speaker_prefix(tok, fmt, m.speaker) for m in neg],
        "sentiment",
        {"k": k, "speakers": sorted({m.speaker for m in pos + neg})},
        **meta,
    )


def from_speakers(
    model, tok, fmt, messages: Sequence, speaker: str, other: str, k: int = 256, layers=-5, pool="mean", **meta
) -> SteeringVector:
    """Toward `speaker`'s way of writing, away from `other`'s: mean activation of up to `k` messages
    each (the text alone, no tag, so the direction is about what they write)."""
    a = [m.text for m in messages if m.speaker == speaker][:k]
    b = [m.text for m in messages if m.speaker == other][:k]
    return from_texts(
        model, tok, a, b, layers, pool, (), (), "speakers", {"toward": speaker, "away": other, "k": k}, **meta
    )


# ----------------------------------------------------------------------------- applying


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
        h = _layer_output(output)
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


# ----------------------------------------------------------------------------- the seed's API


def generate_steering_vector(
    model,
    tokenizer,
    steer_dict: dict[str, float],
    pos_alpha: float = 1.0,
    neg_alpha: float = 1.0,
    layer_from_last: int = -5,
    prefix: Sequence[int] = (),
    pool: str = "mean",
) -> SteeringVector:
    """The seed's function name: `from_phrases` at one layer counted from the last."""
    return from_phrases(model, tokenizer, steer_dict, layer_from_last, pos_alpha, neg_alpha, pool, prefix)


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

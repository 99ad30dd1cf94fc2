"""What `convsim serve` loads: the runs (one base model, each run's LoRA adapter beside the others under
its own PEFT adapter name, each run's own tokenizer) and the steering vectors.

    model, entries = load_runs(["runs/a", "runs/b"])        # runs of another base are refused
    vectors = load_vectors(["happy.safetensors:4"], entries, model)

Two runs' people may share the same new token ids: each run keeps its tokenizer, and the adapter switch
(`model.set_adapter`) switches PEFT's trained speaker-token rows with the LoRA weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from convsim.errors import UserError
from convsim.inference import nocopy


@dataclass
class RunEntry:
    """A run served by this server: its adapter (by PEFT name), tokenizer and people."""

    name: str  # unique among the served runs: the run directory's name
    run: object  # convsim.runs.Run
    tok: object
    adapter: str  # the PEFT adapter name
    attributor: object = None
    guard: object = None  # convsim.inference.nocopy.CopyIndex of the run's training messages, or None

    @property
    def fmt(self):
        return self.run.fmt

    @property
    def speakers(self) -> list[str]:
        """The models served: the people the run simulates (never the --extra-data speakers)."""
        return self.run.people

    @property
    def names(self) -> list[str]:
        """Every name a history may hold."""
        return self.run.speakers


@dataclass
class Vector:
    name: str
    vector: object  # convsim.steering.vectors.SteeringVector
    default: float  # strength used when a request says nothing about steering
    source: str

    def slider(self) -> float:
        """Half-width of the page's slider: twice the default, or the vector's suggested range."""
        from convsim.steering.vectors import suggest_strengths

        top = max(abs(self.default) * 2, 1.0 if self.default else 2 * max(suggest_strengths(self.vector)))
        return math.ceil(top * 10) / 10  # a whole number of the page's 0.1 steps


def _adapter_file(run) -> str:
    f = Path(run.adapter_dir) / "adapter_model.safetensors"
    if not f.is_file():
        # PEFT would fall back to adapter_model.bin, a pickle: never load one from a run directory
        raise UserError(
            f"{run.adapter_dir}: no adapter_model.safetensors (convsim loads adapters only as "
            "safetensors, never pickled .bin files)"
        )
    return str(run.adapter_dir)


def load_runs(run_dirs, device: str | None = None, dtype=None, copy_guard: bool = True):
    """(model with one adapter per run, [RunEntry]) for runs that share one base model."""
    from transformers import AutoTokenizer
    from convsim.modeling.fastpeft import patch_trainable_tokens
    from convsim.modeling.models import load_base
    from convsim.runs import open_run

    if not run_dirs:
        raise UserError("give at least one run directory")
    runs = [open_run(d) for d in run_dirs]
    base = runs[0].model_name
    for r in runs[1:]:
        if r.model_name != base:
            raise UserError(
                f"{r.path} was trained on {r.model_name!r}, {runs[0].path} on {base!r}: one server "
                "serves runs of one base model (start another server for the other)"
            )
    seen = set()
    if len({Path(r.path).resolve() for r in runs}) != len(runs):
        raise UserError("the same run directory is given twice")
    for r in runs:
        _adapter_file(r)
    model, _ = load_base(base, device, dtype)
    toks = [AutoTokenizer.from_pretrained(str(r.path / "tokenizer")) for r in runs]
    rows = max(len(t) for t in toks)
    if rows > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(rows, mean_resizing=False)
    from peft import PeftModel

    entries = []
    for i, (r, tok) in enumerate(zip(runs, toks)):
        stem = name = Path(r.path).resolve().name
        k = 1
        while name in seen:  # runs/a/me and runs/b/me: me, me-2
            k += 1
            name = f"{stem}-{k}"
        seen.add(name)
        adapter = f"run{i}"
        if i == 0:
            model = PeftModel.from_pretrained(model, _adapter_file(r), adapter_name=adapter)
        else:
            model.load_adapter(_adapter_file(r), adapter_name=adapter)
        guard = nocopy.for_run(r, tok) if copy_guard else None
        entries.append(RunEntry(name, r, tok, adapter, guard=guard))
    model.set_adapter(entries[0].adapter)
    patch_trainable_tokens(model)
    model.eval()
    return model, entries


def load_vectors(steer_args, entries, model) -> dict[str, Vector]:
    """`--steer VECTOR[:STRENGTH]` files, then every vector in each run's `steering/` directory (strength
    0 unless asked for); each checked against the model now rather than per request."""
    from convsim.steering.apply import parse_steer_arg
    from convsim.steering.vectors import SteeringVector

    out: dict[str, Vector] = {}

    def add(name, vector, default, source):
        if name in out:
            raise UserError(f"two steering vectors are named {name!r} ({out[name].source} and {source}): rename one")
        vector.check_fits(model)
        out[name] = Vector(name, vector, float(default), source)

    for arg in steer_args or ():
        vector, strength = parse_steer_arg(arg)
        path = arg.rsplit(":", 1)[0] if not Path(arg).exists() else arg
        add(Path(path).stem, vector, strength, path)
    for e in entries:
        for f in sorted((Path(e.run.path) / "steering").glob("*.safetensors")):
            if f.stem not in out or Path(out[f.stem].source).resolve() != f.resolve():
                add(f.stem, SteeringVector.load(f), 0.0, str(f))
    return out

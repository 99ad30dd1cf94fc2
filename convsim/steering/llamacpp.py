"""Steering vectors for llama.cpp: the control-vector GGUF that `llama-cli --control-vector-scaled FILE SCALE`
(and llama-server, and anything else linking llama.cpp's `common`) reads.

    convsim steer export happy.safetensors --format gguf --out happy.gguf
    llama-cli -m exports/ana/model.gguf --control-vector-scaled happy.gguf 2.0 ...

The layout, as llama.cpp's loader (`common_control_vector_load` in common/common.cpp) and its graph
(`llama_adapter_cvec`, `build_cvec` in src/) use it:

- one F32 tensor of shape [n_embd] per steered layer, named `direction.N`;
- llama.cpp adds `scale * direction.N` to the output of its block N (0-based; the residual stream after
  the block, `l_out`), at every position of every pass. That is convsim's hook point and numbering:
  convsim's layer k is `decoder_layers(model)[k]`, steered at its output, so it is written as
  `direction.k`. llama.cpp never steers block 0 (its loader rejects `direction.0`), so a vector with a
  direction at layer 0 cannot be exported;
- SCALE is convsim's strength: `steer()` adds `strength * direction` as stored (no normalising at apply
  time; `--normalize` at build time already rescaled the stored directions), and llama.cpp adds
  `scale * direction`, so the directions are written unchanged;
- `general.architecture = controlvector`, `controlvector.model_hint`, `controlvector.layer_count` (the
  number of direction tensors), as llama.cpp's cvector-generator writes them. The loader reads none of
  these keys: it checks only each tensor's name, type and shape, and the model's n_embd when applying.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from convsim.errors import UserError
from convsim.steering.vectors import HOOK_POINT, SteeringVector

FORMATS = ("gguf",)
ARCH = "controlvector"


def control_vector_tensors(vector: SteeringVector) -> dict[str, np.ndarray]:
    """`direction.N` -> float32 [hidden_size] for each of the vector's layers, in llama.cpp's numbering."""
    if vector.hook != HOOK_POINT:
        raise UserError(f"cannot export a vector hooked at {vector.hook!r}; llama.cpp steers {HOOK_POINT}")
    if 0 in vector.directions:
        raise UserError(
            "the vector has a direction at layer 0, which llama.cpp cannot steer (its control vectors start "
            "at the output of layer 1); rebuild it at other layers (--layer)"
        )
    return {f"direction.{l}": vector.directions[l].numpy().astype(np.float32) for l in vector.layers}


def control_vector_metadata(vector: SteeringVector) -> dict[str, str | int]:
    """The key/value pairs beside the tensors (architecture first, as GGUFWriter writes it)."""
    return {
        "general.architecture": ARCH,
        f"{ARCH}.model_hint": vector.base_model or vector.model,
        f"{ARCH}.layer_count": len(vector.layers),
    }


def check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise UserError(f"unknown steering export format {fmt!r}; supported: {', '.join(FORMATS)}")
    return fmt


def write_control_vector(vector: SteeringVector, path) -> Path:
    """Write `vector` as llama.cpp's control-vector GGUF at `path` (atomically, owner-only: a vector can be
    built from private messages). Refuses a path that exists."""
    import gguf

    from convsim.fsutil import atomic_path

    path = Path(path)
    if path.exists() or path.is_symlink():
        raise UserError(f"--out {path} exists; remove it or choose another name")
    tensors = control_vector_tensors(vector)
    meta = control_vector_metadata(vector)
    with atomic_path(path) as tmp:
        w = gguf.GGUFWriter(str(tmp), meta["general.architecture"])
        w.add_string(f"{ARCH}.model_hint", meta[f"{ARCH}.model_hint"])
        w.add_int32(f"{ARCH}.layer_count", meta[f"{ARCH}.layer_count"])
        for name, data in tensors.items():
            w.add_tensor(name, data)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return path


def export_vector(vector_path, fmt: str, out) -> dict:
    """Load a convsim vector file and write it in `fmt`; returns a summary for the command to print."""
    check_format(fmt)
    out = Path(out)
    if out.exists() or out.is_symlink():
        raise UserError(f"--out {out} exists; remove it or choose another name")
    vector = SteeringVector.load(vector_path)
    write_control_vector(vector, out)
    return {
        "vector": str(vector_path),
        "out": str(out),
        "format": fmt,
        "layers": vector.layers,
        "llama_cpp_layers": [f"direction.{l}" for l in vector.layers],
        "hidden_size": vector.hidden_size,
        "model": vector.base_model or vector.model,
    }

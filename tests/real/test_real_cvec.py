"""Tier 3: a steering vector built on a run of the embedded Gemma 3 270M, exported with `convsim steer export
--format gguf`, is read by llama.cpp's own control-vector loader (`llama-cli --control-vector-scaled`),
changes its greedy output, and steers it exactly as convsim's `steer(model, v, S, positions="all")` steers
the fp32 model: the same greedy tokens at scale S as convsim at strength S. Files llama.cpp must refuse
(another hidden size, a direction at layer 0) make it fail, which shows it reads the file at all.

Needs a `llama-cli` built from llama.cpp's source (the version llama-cpp-python vendors); its path is in
CONVSIM_LLAMA_CLI (.ci/run builds it).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from convsim.inference.generate import greedy_ids
from tests.real.llama_helpers import HISTORY, run_llama

pytestmark = pytest.mark.real

N_TOKENS = 16
STRENGTHS = (4.0, -8.0)


def greedy_steered(model, ids: list[int], vector, strength: float) -> list[int]:
    from convsim.steering.apply import steer

    with steer(model, vector, strength, positions="all"):
        return greedy_ids(model, ids, N_TOKENS)


def write_raw_cvec(path: Path, tensors: dict[str, np.ndarray]) -> Path:
    """A control-vector GGUF written directly with gguf-py, for the files convsim refuses to write."""
    import gguf

    w = gguf.GGUFWriter(str(path), "controlvector")
    for name, data in tensors.items():
        w.add_tensor(name, data.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_llama_cpp_reads_and_applies_exported_vector(real_run, tmp_path):
    from convsim.cli import main
    from convsim.data.examples import render
    from convsim.runs import open_run
    from convsim.steering.vectors import SteeringVector

    phrases = Path(__file__).parents[2] / "examples" / "steer-happy.yaml"
    vec = tmp_path / "happy.safetensors"
    assert main(["steer", "build", str(real_run), "--phrases", str(phrases), "--out", str(vec)]) == 0
    cvec = tmp_path / "happy.gguf"
    assert main(["steer", "export", str(vec), "--format", "gguf", "--out", str(cvec)]) == 0
    out = tmp_path / "f16"
    assert main(["export", str(real_run), "--format", "gguf", "--out", str(out), "--as", "Ana"]) == 0
    gguf_model = out / "model.gguf"

    run = open_run(real_run)
    model, tok = run.load(device="cpu", dtype=torch.float32)
    ids = render(tok, run.fmt, HISTORY, "Ana").input_ids
    v = SteeringVector.load(vec)

    plain = run_llama(gguf_model, N_TOKENS)
    assert plain.returncode == 0, plain.stderr[-2000:]
    assert plain.stdout == tok.decode(greedy_steered(model, ids, v, 0.0))
    for s in STRENGTHS:
        p = run_llama(gguf_model, N_TOKENS, "--control-vector-scaled", str(cvec), f"{s:g}")
        assert p.returncode == 0, p.stderr[-2000:]
        assert "control vector" not in p.stderr  # the loader logs only its failures
        want = tok.decode(greedy_steered(model, ids, v, s))
        assert p.stdout == want, (s, p.stdout, want)
        assert p.stdout != plain.stdout, f"scale {s} did not change llama.cpp's greedy output"

    # llama.cpp reads the file: one of another hidden size, or with a direction at layer 0, is refused
    d = v.directions[v.layers[0]].numpy()
    wrong = write_raw_cvec(tmp_path / "wrong-size.gguf", {f"direction.{v.layers[0]}": d[:-1]})
    p = run_llama(gguf_model, N_TOKENS, "--control-vector-scaled", str(wrong), "1")
    assert p.returncode != 0 and "control vector n_embd does not match model" in p.stderr, p.stderr[-2000:]
    at0 = write_raw_cvec(tmp_path / "at0.gguf", {"direction.0": d})
    p = run_llama(gguf_model, N_TOKENS, "--control-vector-scaled", str(at0), "1")
    assert p.returncode != 0 and "invalid (zero) direction tensor layer index" in p.stderr, p.stderr[-2000:]

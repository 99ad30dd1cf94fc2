"""`convsim steer export --format gguf`: a steering vector as llama.cpp's control-vector GGUF, read back with
gguf-py: tensor names and layer numbering, dtype and shape, values, metadata, and that llama.cpp's
`scale * direction.N` at block N's output is exactly what convsim's `steer(model, v, scale)` adds there;
bad input is one `error:` line, exit 2, nothing written. (llama.cpp itself loads an exported vector in
tests/real/test_real_cvec.py.)
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import cli
from convsim.cli import main
from convsim.modeling.layers import decoder_layers
from convsim.modeling.models import load
from convsim.steering.apply import steer
from convsim.steering.build import from_phrases
from convsim.steering.vectors import SteeringVector

HAPPY = {"i feel happy": 0.25, "i feel sad": -0.25, "life is amazing": 0.25, "life is terrible": -0.25}


@pytest.fixture(scope="module")
def tiny():
    return load("tiny-gemma3", device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def vec_file(tiny, tmp_path_factory):
    model, tok = tiny
    n = len(decoder_layers(model))
    v = from_phrases(model, tok, HAPPY, layers=list(range(1, n)))
    return v.save(tmp_path_factory.mktemp("vec") / "happy.safetensors")


def read_gguf(path):
    import gguf

    r = gguf.GGUFReader(str(path))
    fields = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    return fields, {t.name: t for t in r.tensors}


def test_export_writes_llama_cpp_control_vector(vec_file, tmp_path):
    import gguf

    v = SteeringVector.load(vec_file)
    out = tmp_path / "happy.gguf"
    p = cli("steer", "export", vec_file, "--format", "gguf", "--out", out, "--json")
    summary = json.loads(p.stdout.strip().splitlines()[-1])
    assert summary["llama_cpp_layers"] == [f"direction.{l}" for l in v.layers]
    assert (out.stat().st_mode & 0o077) == 0
    assert [x.name for x in tmp_path.iterdir()] == ["happy.gguf"]  # no temporary left beside it

    fields, tensors = read_gguf(out)
    assert fields == {
        "general.architecture": "controlvector",
        "controlvector.model_hint": v.base_model,
        "controlvector.layer_count": len(v.layers),
    }
    assert sorted(tensors) == sorted(f"direction.{l}" for l in v.layers)  # convsim layer k -> direction.k
    for l in v.layers:
        t = tensors[f"direction.{l}"]
        assert t.tensor_type == gguf.GGMLQuantizationType.F32
        assert list(t.shape) == [v.hidden_size]  # 1-D, n_embd
        np.testing.assert_array_equal(np.asarray(t.data), v.directions[l].numpy())  # unscaled: scale = strength


def block_output(model, layer: int, ids) -> torch.Tensor:
    seen = []
    hook = decoder_layers(model)[layer].register_forward_hook(
        lambda m, a, o: seen.append((o[0] if isinstance(o, tuple) else o).detach().clone())
    )
    try:
        with torch.inference_mode():
            model(input_ids=ids)
    finally:
        hook.remove()
    return seen[0]


def test_llama_cpp_scale_adds_what_convsim_strength_adds(tiny, vec_file, tmp_path):
    """llama.cpp adds `scale * direction.N` to the output of its block N at every position; steer() with the
    same strength (positions="all") must change block N's output by exactly that."""
    model, tok = tiny
    v = SteeringVector.load(vec_file)
    out = tmp_path / "v.gguf"
    assert main(["steer", "export", str(vec_file), "--out", str(out)]) == 0
    _, tensors = read_gguf(out)
    first = v.layers[0]  # the first steered block: nothing upstream of it moves
    ids = torch.tensor([tok("hey how are you").input_ids])
    scale = 2.5
    plain = block_output(model, first, ids)
    with steer(model, v, scale, positions="all"):
        steered = block_output(model, first, ids)  # hooked after steer's own hook: sees its addition
    want = scale * torch.from_numpy(np.array(tensors[f"direction.{first}"].data))
    torch.testing.assert_close(steered - plain, want.expand_as(plain), rtol=0, atol=1e-5)


def one_error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_bad_input_is_one_error_line_and_nothing_written(tiny, vec_file, tmp_path, capsys):
    out = tmp_path / "out.gguf"
    assert "unknown steering export format 'ggml'" in one_error(
        capsys, ["steer", "export", str(vec_file), "--format", "ggml", "--out", str(out)]
    )
    assert not out.exists()

    out.write_bytes(b"keep me")
    assert "exists" in one_error(capsys, ["steer", "export", str(vec_file), "--out", str(out)])
    assert out.read_bytes() == b"keep me"
    out.unlink()

    text = tmp_path / "notes.txt"
    text.write_text("not a vector\n")
    assert "not a safetensors file" in one_error(capsys, ["steer", "export", str(text), "--out", str(out)])
    assert "not found" in one_error(capsys, ["steer", "export", str(tmp_path / "nope.safetensors"), "--out", str(out)])

    from safetensors.torch import save_file

    plain = tmp_path / "plain.safetensors"  # a safetensors file that is not a convsim vector
    save_file({"x": torch.zeros(3)}, str(plain))
    assert "not a convsim steering vector" in one_error(capsys, ["steer", "export", str(plain), "--out", str(out)])

    model, tok = tiny
    at0 = from_phrases(model, tok, HAPPY, layers=[0, 1]).save(tmp_path / "at0.safetensors")
    assert "layer 0" in one_error(capsys, ["steer", "export", str(at0), "--out", str(out)])

    assert not out.exists()
    assert sorted(x.name for x in tmp_path.iterdir()) == ["at0.safetensors", "notes.txt", "plain.safetensors"]

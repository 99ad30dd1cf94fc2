"""`convsim export --format gguf`: the file holds the merged weights with llama.cpp's Gemma 3 transforms,
the speaker tokens as USER_DEFINED tokens, and a Modelfile; bad input is a clear error with nothing
written. (llama.cpp itself runs the file in tests/real/test_real_gguf.py.)
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import cli


@pytest.fixture(scope="module")
def gemma_run(tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp("runs") / "tiny-g3"
    cli("train", data_dir, "--out", out, "--model", "tiny-gemma3", "--max-steps", "2", "--batch-size", "8", "--json")
    return out


def merged_state(run_dir):
    from convsim.export.hf import merge
    from convsim.runs import open_run

    run = open_run(run_dir)
    model, tok = run.load(device="cpu", dtype=torch.float32)
    merged, _ = merge(model, tok, run.fmt)
    return {k: v.detach().float().numpy() for k, v in merged.state_dict().items()}, tok


def test_gguf_export_f16_and_q8(gemma_run, tmp_path, capsys):
    import gguf
    from gguf.quants import dequantize

    from convsim.cli import main

    want, tok = merged_state(gemma_run)
    for quant in ("f16", "q8_0"):
        out = tmp_path / quant
        assert main(["export", str(gemma_run), "--format", "gguf", "--out", str(out), "--quant", quant, "--json"]) == 0
        summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert summary["quant"] == quant and summary["persona"] in ("Ana", "Ben")
        assert {p.name for p in out.iterdir()} == {"model.gguf", "Modelfile", "README.md", "convsim-format.json"}
        assert (out.stat().st_mode & 0o077) == 0
        assert "FROM ./model.gguf" in (out / "Modelfile").read_text()

        r = gguf.GGUFReader(str(out / "model.gguf"))
        f = r.fields
        assert f["general.architecture"].contents() == "gemma3"
        tokens = f["tokenizer.ggml.tokens"].contents()
        types = f["tokenizer.ggml.token_type"].contents()
        assert len(tokens) == len(tok)
        for name in ("[Ana]", "[Ben]"):
            i = tok.convert_tokens_to_ids(name)
            assert tokens[i] == name and types[i] == gguf.TokenType.USER_DEFINED
        assert f["tokenizer.ggml.bos_token_id"].contents() == tok.bos_token_id
        assert f["gemma3.block_count"].contents() == 2

        t = {x.name: x for x in r.tensors}
        assert "output.weight" not in t  # tied head: llama.cpp reuses token_embd
        tol = 1e-2 if quant == "f16" else 5e-2
        for hf_name, gguf_name, shift in (
            ("model.embed_tokens.weight", "token_embd.weight", 0.0),
            ("model.layers.0.self_attn.q_proj.weight", "blk.0.attn_q.weight", 0.0),
            ("model.layers.1.mlp.down_proj.weight", "blk.1.ffn_down.weight", 0.0),
            ("model.layers.0.input_layernorm.weight", "blk.0.attn_norm.weight", 1.0),
            ("model.layers.0.self_attn.q_norm.weight", "blk.0.attn_q_norm.weight", 1.0),
            ("model.layers.1.pre_feedforward_layernorm.weight", "blk.1.ffn_norm.weight", 1.0),
            ("model.norm.weight", "output_norm.weight", 1.0),
        ):
            x = t[gguf_name]
            got = dequantize(x.data, x.tensor_type).reshape(want[hf_name].shape)
            if want[hf_name].ndim == 1:
                assert x.tensor_type == gguf.GGMLQuantizationType.F32
            else:
                expect = gguf.GGMLQuantizationType.F16 if quant == "f16" else gguf.GGMLQuantizationType.Q8_0
                assert x.tensor_type == expect
            np.testing.assert_allclose(got, want[hf_name] + shift, atol=tol * max(1.0, np.abs(want[hf_name]).max()))


def test_gguf_bad_input(tiny_run, gemma_run, tmp_path, capsys):
    from convsim.cli import main

    out = tmp_path / "llama"
    assert main(["export", str(tiny_run), "--format", "gguf", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "Gemma3ForCausalLM" in err  # names what is supported
    assert not out.exists() and not list(tmp_path.iterdir())
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("x")
    assert main(["export", str(gemma_run), "--format", "gguf", "--out", str(busy)]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["export", str(gemma_run), "--format", "gguf", "--out", str(tmp_path / "n"), "--as", "Nobody"]) == 2
    assert "unknown speaker" in capsys.readouterr().err
    assert not (tmp_path / "n").exists()

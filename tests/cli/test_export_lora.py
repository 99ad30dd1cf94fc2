"""`convsim export --format lora`: the LoRA unmerged, with a base that holds the speaker tokens. The PEFT
part (base/ + peft/) reloaded with plain transformers + PEFT gives the run's logits, and holds nothing vLLM
refuses; the GGUF LoRA has llama.cpp's adapter keys, tensor names and the shapes its loader checks against the
base GGUF, PEFT's values, and an alpha that gives PEFT's scale under llama.cpp's alpha / r; bad input is one
`error:` line, exit 2, nothing written. (llama.cpp itself applies the files in tests/real/test_real_lora.py.)
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from conftest import cli
from convsim.cli import main

# the PEFT target modules convsim trains and the GGUF tensors llama.cpp names them (Gemma 3)
GGUF_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


@pytest.fixture(scope="module")
def moved_run(tmp_path_factory, data_dir):
    """A tiny-gemma3 run whose every trained tensor (LoRA A and B, speaker rows) is moved well away from where
    two steps leave it, so that a misplaced row, pair or scale shows in the logits."""
    from safetensors.torch import load_file, save_file

    out = tmp_path_factory.mktemp("runs") / "tiny-g3"
    cli("train", data_dir, "--out", out, "--model", "tiny-gemma3", "--max-steps", "2", "--batch-size", "8", "--json")
    f = out / "adapter" / "adapter_model.safetensors"
    g = torch.Generator().manual_seed(0)
    moved = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in load_file(f).items()}
    save_file(moved, f, {"format": "pt"})
    return out


@pytest.fixture(scope="module")
def exported(moved_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("exports") / "lora"
    p = cli("export", moved_run, "--format", "lora", "--out", out, "--as", "Ana", "--json")
    return out, json.loads(p.stdout.strip().splitlines()[-1])


def probe_ids(tok, fmt):
    from convsim.data.examples import render
    from convsim.data.schema import Message

    history = [Message("Ana", "hey how are you"), Message("Ben", "Not bad."), Message("Ana", "lol yes")]
    return render(tok, fmt, history, "Ben").input_ids


def test_peft_part_reloads_to_the_runs_logits(moved_run, exported):
    from peft import PeftModel
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from convsim.runs import open_run

    out, summary = exported
    assert summary["format"] == "lora" and summary["persona"] == "Ana"
    assert summary["files"] == {
        "base": "base",
        "peft": "peft",
        "base_gguf": "tiny-g3-base.gguf",
        "lora_gguf": "tiny-g3-lora.gguf",
    }
    assert {p.name for p in out.iterdir()} == {
        "base",
        "peft",
        "tiny-g3-base.gguf",
        "tiny-g3-lora.gguf",
        "Modelfile",
        "README.md",
        "convsim-format.json",
    }
    assert (out.stat().st_mode & 0o077) == 0

    run = open_run(moved_run)
    model, tok = run.load(device="cpu", dtype=torch.float32)
    ids = probe_ids(tok, run.fmt)
    assert tok.convert_tokens_to_ids("[Ana]") in ids and tok.convert_tokens_to_ids("[Ben]") in ids
    with torch.inference_mode():
        want = model(input_ids=torch.tensor([ids])).logits

    # what vLLM's loader accepts: LoRA pairs only, no trainable-token rows, modules_to_save unset
    cfg = json.loads((out / "peft" / "adapter_config.json").read_text())
    assert cfg["trainable_token_indices"] is None and cfg["modules_to_save"] is None and not cfg["use_dora"]
    with safe_open(out / "peft" / "adapter_model.safetensors", "pt") as f:
        keys = list(f.keys())
    assert keys and all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys)

    for d in ("base", "peft"):  # the tokenizer beside each has the run's speaker tokens at the run's ids
        t = AutoTokenizer.from_pretrained(out / d)
        assert [t.convert_tokens_to_ids(f"[{s}]") for s in ("Ana", "Ben")] == [
            run.meta.speaker_token_ids[s] for s in ("Ana", "Ben")
        ]
    base = AutoModelForCausalLM.from_pretrained(out / "base", dtype=torch.float32)
    with torch.inference_mode():
        no_lora = base(input_ids=torch.tensor([ids])).logits
    assert (no_lora - want).abs().max() > 1e-2  # the LoRA matters, so the comparison below means something
    applied = PeftModel.from_pretrained(base, out / "peft").eval()
    with torch.inference_mode():
        got = applied(input_ids=torch.tensor([ids])).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_gguf_lora_layout_matches_llama_cpp(moved_run, exported):
    import gguf
    from gguf.quants import dequantize
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from convsim.runs import open_run

    out, summary = exported
    run = open_run(moved_run)
    cfg = json.loads((out / "peft" / "adapter_config.json").read_text())
    r = cfg["r"]
    peft_tensors = load_file(out / "peft" / "adapter_model.safetensors")

    lr = gguf.GGUFReader(str(out / "tiny-g3-lora.gguf"))
    fields = {k: f.contents() for k, f in lr.fields.items() if not k.startswith("GGUF.")}
    assert fields["general.type"] == "adapter"
    assert fields["general.architecture"] == "gemma3"
    assert fields["adapter.type"] == "lora"
    alpha = fields["adapter.lora.alpha"]
    assert lr.fields["adapter.lora.alpha"].types == [gguf.GGUFValueType.FLOAT32]  # llama.cpp reads an f32

    lora = {t.name: t for t in lr.tensors}
    n_layers = 2
    want_names = {
        f"blk.{i}.{g}.weight.lora_{ab}" for i in range(n_layers) for g in GGUF_NAMES.values() for ab in ("a", "b")
    }
    assert set(lora) == want_names
    base = {t.name: t for t in gguf.GGUFReader(str(out / "tiny-g3-base.gguf")).tensors}
    for i in range(n_layers):
        for hf, g in GGUF_NAMES.items():
            a, b = lora[f"blk.{i}.{g}.weight.lora_a"], lora[f"blk.{i}.{g}.weight.lora_b"]
            w = base[f"blk.{i}.{g}.weight"]
            assert a.tensor_type == b.tensor_type == gguf.GGMLQuantizationType.F32
            # llama.cpp's loader: a is [in, r], b is [r, out], against the base tensor's [in, out]
            assert list(a.shape) == [w.shape[0], r] and list(b.shape) == [r, w.shape[1]]
            key = f"base_model.model.model.layers.{i}.{hf}"
            np.testing.assert_array_equal(a.data, peft_tensors[f"{key}.lora_A.weight"].numpy())
            np.testing.assert_array_equal(b.data, peft_tensors[f"{key}.lora_B.weight"].numpy())

    # llama.cpp adds (alpha / r) * b·a: the same delta PEFT adds (rsLoRA or not, from PEFT's own scaling)
    applied = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(out / "base", dtype=torch.float32), out / "peft"
    )
    layer = applied.base_model.model.model.layers[1].self_attn.q_proj
    peft_delta = layer.scaling["default"] * (layer.lora_B["default"].weight @ layer.lora_A["default"].weight)
    a, b = lora["blk.1.attn_q.weight.lora_a"].data, lora["blk.1.attn_q.weight.lora_b"].data
    np.testing.assert_allclose((alpha / r) * (b @ a), peft_delta.detach().numpy(), rtol=1e-5, atol=1e-6)
    assert summary["llama_cpp_alpha"] == pytest.approx(alpha)

    # the base GGUF: speaker tokens as USER_DEFINED, their trained rows, the other weights unmerged
    br = gguf.GGUFReader(str(out / "tiny-g3-base.gguf"))
    tokens = br.fields["tokenizer.ggml.tokens"].contents()
    types = br.fields["tokenizer.ggml.token_type"].contents()
    model, _ = run.load(device="cpu", dtype=torch.float32, adapter=False)
    for s, i in run.meta.speaker_token_ids.items():
        assert tokens[i] == f"[{s}]" and types[i] == gguf.TokenType.USER_DEFINED
    rows = load_file(moved_run / "adapter" / "adapter_model.safetensors")[
        "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"
    ].numpy()
    emb = base["token_embd.weight"]
    emb = dequantize(emb.data, emb.tensor_type).reshape(-1, rows.shape[1])
    idx = sorted(run.meta.speaker_token_ids.values())
    np.testing.assert_allclose(emb[idx], rows, atol=2e-3)
    q = dequantize(base["blk.1.attn_q.weight"].data, base["blk.1.attn_q.weight"].tensor_type)
    stock = model.model.layers[1].self_attn.q_proj.weight.detach().numpy()
    np.testing.assert_allclose(q.reshape(stock.shape), stock, atol=2e-3)

    modelfile = (out / "Modelfile").read_text()
    assert "FROM ./tiny-g3-base.gguf\nADAPTER ./tiny-g3-lora.gguf\n" in modelfile
    readme = (out / "README.md").read_text()
    assert "--enable-lora --lora-modules ana=" in readme and "--lora " in readme


def test_lora_bad_input(tiny_run, moved_run, tmp_path, capsys):
    out = tmp_path / "x"
    assert main(["export", str(tiny_run), "--format", "lora", "--out", str(out)]) == 2  # tiny-llama
    err = capsys.readouterr().err
    assert err.startswith("error:") and err.count("\n") == 1 and "Gemma3ForCausalLM" in err
    assert not list(tmp_path.iterdir())

    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep").write_text("x")
    assert main(["export", str(moved_run), "--format", "lora", "--out", str(busy)]) == 2
    assert "--force" in capsys.readouterr().err and [p.name for p in busy.iterdir()] == ["keep"]

    no_adapter = tmp_path / "untrained"
    shutil.copytree(moved_run, no_adapter, ignore=shutil.ignore_patterns("adapter", "checkpoints"))
    assert main(["export", str(no_adapter), "--format", "lora", "--out", str(out)]) == 2
    assert "no trained adapter" in capsys.readouterr().err and not out.exists()

    p = cli("export", moved_run, "--format", "loar", "--out", out, check=False)
    assert p.returncode == 2 and "invalid choice: 'loar'" in p.stderr and not out.exists()
    assert {p.name for p in tmp_path.iterdir()} == {"busy", "untrained"}  # no temporary left behind

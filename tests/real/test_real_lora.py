"""Tier 3: a run of the embedded Gemma 3 270M exported with `--format lora` runs in llama.cpp as a base GGUF
with the LoRA GGUF applied on top, through llama-cpp-python (`Llama(..., lora_path=...)`) and through the
documented `llama-cli -m BASE --lora LORA`: its greedy tokens are convsim's own in fp32, and the base alone
gives others (so the adapter is applied, not ignored).

The llama-cli half needs a `llama-cli` built from llama.cpp's source (the version llama-cpp-python vendors);
its path is in CONVSIM_LLAMA_CLI (.ci/run builds it).
"""

from __future__ import annotations

import pytest
import torch

from convsim.export.gguf_file import llama_greedy
from convsim.inference.generate import greedy_ids
from tests.real.llama_helpers import HISTORY, PROMPT, llama_cpp_module, run_llama

pytestmark = pytest.mark.real

N_GREEDY = 32
N_CLI = 16


@pytest.fixture(scope="module")
def lora_export(real_run, tmp_path_factory):
    from convsim.cli import main

    out = tmp_path_factory.mktemp("exports") / "lora"
    assert main(["export", str(real_run), "--format", "lora", "--out", str(out), "--as", "Ana"]) == 0
    return out, out / "real-base.gguf", out / "real-lora.gguf"


@pytest.fixture(scope="module")
def convsim_greedy(real_run):
    from convsim.data.examples import render
    from convsim.runs import open_run

    run = open_run(real_run)
    model, tok = run.load(device="cpu", dtype=torch.float32)
    ids = render(tok, run.fmt, HISTORY, "Ana").input_ids
    return tok, ids, greedy_ids(model, ids, N_GREEDY)


def test_base_plus_lora_gguf_in_llama_cpp_python(lora_export, convsim_greedy):
    llama_cpp = llama_cpp_module()
    _, base, lora = lora_export
    tok, ids, want = convsim_greedy
    opts = dict(n_ctx=512, n_threads=2, logits_all=True, verbose=False)

    llm = llama_cpp.Llama(str(base), lora_path=str(lora), **opts)
    assert llm.tokenize(PROMPT.encode()) == ids
    got = llama_greedy(llm, ids, N_GREEDY)
    llm.close()
    assert got == want, (tok.decode(got), tok.decode(want))

    plain = llama_cpp.Llama(str(base), **opts)
    alone = llama_greedy(plain, ids, N_GREEDY)
    plain.close()
    assert alone != want, "the base alone decodes like the run: this comparison shows nothing about the LoRA"


def test_documented_llama_cli_command(lora_export, convsim_greedy):
    _, base, lora = lora_export
    tok, _, want = convsim_greedy
    p = run_llama(base, N_CLI, "--lora", str(lora))
    assert p.returncode == 0, p.stderr[-2000:]
    assert "tensors from lora file" in p.stderr, p.stderr[-2000:]  # llama.cpp's adapter loader ran
    assert p.stdout == tok.decode(want[:N_CLI])

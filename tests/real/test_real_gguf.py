"""Tier 3: a run of the embedded Gemma 3 270M exported to GGUF (f16, q8_0) runs in llama.cpp
(llama-cpp-python, the `gguf-runtime` extra): speaker tokens are single tokens, the documented prompt
tokenizes to convsim's ids, f16 greedy-decodes the same tokens as convsim in fp32, and generation
stops at the next speaker's token."""

from __future__ import annotations

import pytest
import torch

from convsim.export.gguf_file import llama_greedy
from convsim.inference.generate import greedy_ids
from tests.real.llama_helpers import HISTORY, PROMPT, llama_cpp_module

pytestmark = pytest.mark.real

N_GREEDY = 32


def test_gguf_runs_in_llama_cpp(real_run, tmp_path):
    llama_cpp = llama_cpp_module()
    from convsim.cli import main
    from convsim.data.examples import render
    from convsim.runs import open_run

    run = open_run(real_run)
    model, tok = run.load(device="cpu", dtype=torch.float32)
    ids = render(tok, run.fmt, HISTORY, "Ana").input_ids
    want = greedy_ids(model, ids, N_GREEDY)
    text = PROMPT
    speaker_ids = {s: tok.convert_tokens_to_ids(f"[{s}]") for s in ("Ana", "Ben")}

    for quant in ("f16", "q8_0"):
        out = tmp_path / quant
        assert (
            main(["export", str(real_run), "--format", "gguf", "--out", str(out), "--quant", quant, "--as", "Ana"]) == 0
        )
        llm = llama_cpp.Llama(str(out / "model.gguf"), n_ctx=512, n_threads=2, logits_all=True, verbose=False)
        for s, i in speaker_ids.items():  # one token, even without special-token parsing
            assert llm.tokenize(f"[{s}]".encode(), add_bos=False, special=False) == [i]
        assert llm.tokenize(text.encode(), add_bos=True, special=True) == ids
        got = llama_greedy(llm, ids, N_GREEDY)
        if quant == "f16":
            assert got == want, (tok.decode(got), tok.decode(want))

        # stops at the next speaker's token, as the Modelfile's `stop` does in Ollama
        seq = llama_greedy(llm, ids, 64)
        assert speaker_ids["Ben"] in seq, "the model never handed over to Ben: nothing to stop at"
        cut = seq.index(speaker_ids["Ben"])
        llm.reset()
        res = llm.create_completion(ids, max_tokens=64, temperature=0.0, stop=["[Ben]"])
        choice = res["choices"][0]
        assert choice["finish_reason"] == "stop"
        assert choice["text"] == llm.detokenize(seq[:cut]).decode("utf-8", errors="replace")
        assert "[Ben]" not in choice["text"]
        llm.close()

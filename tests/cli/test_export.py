"""`convsim export`: the merged model loads with plain transformers and replies exactly as convsim does;
the trained speaker-token rows survive the merge (untied and tied output heads).
"""

from __future__ import annotations

import json

import pytest
import torch

from convsim.data.schema import Message

from conftest import cli

HISTORIES = [
    [Message("Ben", "are you coming tonight?")],
    [
        Message("Ana", "hey how are you"),
        Message("Ben", "Not bad. Working late again."),
        Message("Ana", "lol yes"),
        Message("Ben", "Maybe tomorrow then."),
    ],
]


def plain_reply(model, tok, prompt_text: str, stops: list[int], speaker: str, max_new_tokens: int) -> list[str]:
    """What a user of the export does with transformers alone (as its README says)."""
    x = tok(prompt_text, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(
            **x,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=stops,
            temperature=None,
            top_p=None,
            top_k=None,
        )
    new = out[0, x.input_ids.shape[1] :].tolist()
    new = new[: next((i for i, t in enumerate(new) if t in stops), len(new))]
    return [m.strip() for m in tok.decode(new).split(f"[{speaker}]") if m.strip()]


def test_export_round_trip(tiny_run, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from convsim.data.examples import render
    from convsim.inference.bursts import without_repeats
    from convsim.inference.generate import SampleConfig, reply
    from convsim.runs import open_run

    out = tmp_path / "export"
    summary = json.loads(cli("export", tiny_run, "--out", out, "--json").stdout)
    assert summary["merge_max_logit_diff"] < 1e-3
    names = {p.name for p in out.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "tokenizer.json",
        "convsim-format.json",
        "README.md",
    } <= names
    assert not any(n.startswith("adapter") for n in names)  # standalone: no PEFT files
    assert (out.stat().st_mode & 0o077) == 0  # owner-only, like the chat it learned

    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    card = json.loads((out / "convsim-format.json").read_text())
    assert model.get_input_embeddings().weight.shape[0] == len(tok) == model.config.vocab_size
    assert set(model.generation_config.eos_token_id) == {
        card["speakers"]["Ana"]["ids"][0],
        card["speakers"]["Ben"]["ids"][0],
        tok.eos_token_id,
        tok.pad_token_id,
    }

    run = open_run(tiny_run)
    peft_model, run_tok = run.load(device="cpu", dtype=torch.float32)
    # a plain runtime stops wherever a stop token comes, so compare with convsim's hold-off of stops for the
    # first tokens turned off (min_new_tokens=0); with it on, convsim differs exactly where the model would
    # otherwise stop at once (tests/unit/test_readable_output.py)
    cfg = SampleConfig(temperature=0, max_new_tokens=24, min_new_tokens=0)
    compared = 0
    for history in HISTORIES:
        for speaker in ("Ana", "Ben"):
            want = reply(peft_model, run_tok, run.fmt, history, speaker, cfg)[0]
            ids = render(run_tok, run.fmt, history, speaker).input_ids
            text = "".join(f"[{m.speaker}] {m.text}\n" for m in history) + f"[{speaker}]"
            assert tok(text).input_ids == ids  # the documented format gives convsim's exact tokens
            stops = card["speakers"][speaker]["stop_token_ids"]
            got = plain_reply(model, tok, text, stops, speaker, cfg.max_new_tokens)
            # convsim also ends a burst where a message repeats the one before; a plain runtime does not
            assert without_repeats(got) == want, (history, speaker)
            # the default generation_config stops at every speaker token: the burst's first message
            first = plain_reply(model, tok, text, model.generation_config.eos_token_id, speaker, cfg.max_new_tokens)
            assert first in ([], want[:1]), (first, want)  # [] when the burst opens with an empty message
            compared += bool(want)
    assert compared >= 1, "the tiny model said nothing at all: the comparison would be empty"

    # in this process from here on (the subprocess above was the whole command; imports are slow)
    from convsim.cli import main

    out2 = tmp_path / "export-ana"  # --as: the generation config is one speaker's
    assert main(["export", str(tiny_run), "--out", str(out2), "--as", "Ana", "--dtype", "bfloat16"]) == 0
    cfg2 = json.loads((out2 / "generation_config.json").read_text())
    assert cfg2["eos_token_id"] == card["speakers"]["Ana"]["stop_token_ids"]
    assert json.loads((out2 / "config.json").read_text())["dtype"] == "bfloat16"
    capsys.readouterr()
    assert main(["export", str(tiny_run), "--out", str(out)]) == 2  # never overwrites by accident
    assert "--force" in capsys.readouterr().err
    assert main(["export", str(tiny_run), "--out", str(tmp_path / "x"), "--as", "Nobody"]) == 2
    assert "unknown speaker" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("name", ["tiny-gemma3", "tiny-llama"])
def test_merge_keeps_trained_speaker_rows(name, tmp_path):
    """Trainable-token rows (and LoRA) changed far from their start must land in the merged embedding
    and output head, tied (gemma3) or not (llama), and survive save + plain reload."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from convsim.data.examples import PromptFormat
    from convsim.export.hf import merge
    from convsim.modeling.models import load_base
    from convsim.modeling.speakers import add_speaker_tokens

    model, tok = load_base(name, device="cpu", dtype=torch.float32)
    ids = add_speaker_tokens(model, tok, ["Ana", "Ben"])
    tt = {"embed_tokens": sorted(ids.values())}
    tied = model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    if not tied:
        tt["lm_head"] = sorted(ids.values())
    peft_model = get_peft_model(
        model,
        LoraConfig(
            r=4,
            target_modules=["q_proj", "v_proj"],
            task_type="CAUSAL_LM",
            trainable_token_indices=tt,
            init_lora_weights=False,
        ),
    )
    torch.manual_seed(0)
    with torch.no_grad():
        for p in peft_model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))  # as if trained: far from the initial rows
    fmt = PromptFormat("base", ("Ana", "Ben"))
    x = torch.tensor([[tok.bos_token_id, ids["Ben"], 100, 200, ids["Ana"], 300, ids["Ana"]]])
    with torch.no_grad():
        want = peft_model(input_ids=x).logits
    merged, diff = merge(peft_model, tok, fmt)
    assert diff < 1e-3 and type(merged).__name__.endswith("ForCausalLM")
    merged.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert again.config.tie_word_embeddings == tied
    with torch.no_grad():
        got = again(input_ids=x).logits
    assert (got - want).abs().max().item() < 1e-3
    assert (got[0, :, list(ids.values())] - want[0, :, list(ids.values())]).abs().max().item() < 1e-3

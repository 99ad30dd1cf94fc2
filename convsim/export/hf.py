"""`convsim export`: one standalone model directory for engines that know nothing of convsim or PEFT.

    convsim export runs/me --out exports/me                  # fp32 safetensors, stops at any speaker
    convsim export runs/me --out exports/ana --as Ana --dtype bfloat16

The LoRA adapter is merged into the base weights (`merge_and_unload`), and the trained speaker-token
rows land in the embedding (and in the output head, tied or not); the export checks that the merged
model gives the same logits as base + adapter on a probe prompt before it writes anything. Written:
standard `config.json` + `model.safetensors`, the tokenizer with the speaker tokens, a
`generation_config.json` whose stop tokens are the other speakers' tokens + eos, `convsim-format.json`
(the prompt format, machine-readable) and a README.md. Plain `AutoModelForCausalLM` /
`AutoTokenizer` load it; vLLM serves it; llama.cpp's `convert_hf_to_gguf.py` reads it.
"""

from __future__ import annotations

import json
from pathlib import Path

from convsim.errors import UserError

HELP = (
    "Write a merged standalone model (base + LoRA + speaker tokens): a transformers directory with its tokenizer "
    "and prompt format, or (--format gguf) one GGUF file with an Ollama Modelfile; or (--format lora) the LoRA "
    "adapter unmerged, for vLLM / PEFT and as a llama.cpp GGUF LoRA, with a base that holds the speaker tokens."
)
EXAMPLES = """
  convsim export runs/me --out exports/me
  convsim export runs/me --out exports/ana --as Ana --dtype bfloat16   # stops only when someone else speaks
  convsim export runs/me --format gguf --out exports/ana-gguf --as Ana --quant q8_0   # llama.cpp / Ollama
  convsim export runs/me --format lora --out exports/ana-lora --as Ana   # vLLM --enable-lora, llama.cpp --lora
"""
DTYPES = ("float32", "bfloat16", "float16")
FORMATS = ("hf", "gguf", "lora")
QUANTS = ("f16", "q8_0", "q4_k_m")
PROBE = ["hey, how are you?", "fine thanks! and you?", "see you tonight then", "ok :)"]


def add_arguments(p):
    p.add_argument("run_dir")
    p.add_argument("--out", required=True, help="directory to write (must be new or empty, unless --force)")
    p.add_argument(
        "--as",
        dest="speaker",
        metavar="NAME",
        help="write generation_config for this person: stop only at the others' tokens, so a reply "
        "can be a burst of several messages (default: the run's only target, else stop at "
        "every speaker token: one message per call); gguf: the Modelfile's persona (default: the run's "
        "first target)",
    )
    p.add_argument(
        "--format",
        choices=FORMATS,
        default="hf",
        help="hf: a transformers directory (default); gguf: one .gguf for llama.cpp + an Ollama Modelfile; "
        "lora: the LoRA unmerged (PEFT dir and GGUF LoRA) + a base with the speaker tokens (HF dir and GGUF)",
    )
    p.add_argument(
        "--dtype", choices=DTYPES, default="float32", help="hf weights on disk, lora: its base/ (default float32)"
    )
    p.add_argument(
        "--quant",
        choices=QUANTS,
        default="f16",
        help="gguf weights, lora: its base GGUF (default f16; q4_k_m needs llama-cpp-python)",
    )
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")
    p.add_argument("--json", action="store_true", help="print a JSON summary")


def stop_ids(tok, fmt, speaker: str | None) -> list[int]:
    """Token ids that end a reply, as convsim's generation ends it: the other speakers' tokens (every
    speaker's without `speaker`), eos, end of turn and pad."""
    from convsim.data.examples import end_of_turn_id, tag_ids

    ids = []
    if fmt.special_tokens:
        for s in fmt.speakers:
            if s != speaker:
                ids += tag_ids(tok, fmt, s)
    ids += [tok.eos_token_id, end_of_turn_id(tok)]
    if tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id:
        ids.append(tok.pad_token_id)  # convsim's generation stops there too
    return list(dict.fromkeys(i for i in ids if i is not None))


def set_generation_config(model, tok, fmt, speaker: str | None) -> list[int]:
    """The model's generation_config as convsim samples: its stop tokens (returned), bos/pad, sampling."""
    stops = stop_ids(tok, fmt, speaker)
    g = model.generation_config
    g.bos_token_id, g.pad_token_id = tok.bos_token_id, tok.pad_token_id
    g.eos_token_id = stops
    g.do_sample, g.temperature, g.top_p, g.max_new_tokens = True, 0.7, 0.95, 96
    if not fmt.special_tokens:  # plain-text tags span several tokens: engines stop on the text
        from convsim.modeling.speakers import speaker_token

        g.stop_strings = [speaker_token(s) for s in fmt.speakers if s != speaker]
    return stops


def probe_logits(model, tok, fmt):
    """fp32 logits of a short probe conversation: what an export must reproduce before it is written."""
    import torch
    from convsim.data.examples import render
    from convsim.data.schema import Message

    speakers = list(fmt.speakers)
    history = [Message(speakers[i % len(speakers)], t) for i, t in enumerate(PROBE)]
    ids = render(tok, fmt, history, speakers[0]).input_ids
    x = torch.tensor([ids], device=next(model.parameters()).device)
    with torch.inference_mode():
        return model(input_ids=x).logits.float()


def check_same_logits(want, got, what: str) -> float:
    """The largest logit difference; raises (nothing gets written) if it is not a rounding difference."""
    diff = (want - got).abs().max().item()
    tol = 1e-3 * max(1.0, want.abs().max().item())
    if not diff <= tol:
        raise RuntimeError(
            f"{what} disagrees with base + adapter (max logit difference {diff:.2e}); not writing a broken export"
        )
    return diff


def merge(model, tok, fmt):
    """base + adapter → one plain model; raises if the merged logits differ from the adapter's."""
    want = probe_logits(model, tok, fmt)
    merged = model.merge_and_unload()
    return merged, check_same_logits(want, probe_logits(merged, tok, fmt), "merged model")


def format_card(run, tok, fmt, speaker: str | None, stops: list[int]) -> dict:
    """convsim-format.json: everything a program needs to build prompts and stop where convsim stops."""
    from convsim.data.examples import render, tag_ids
    from convsim.data.schema import Message
    from convsim.modeling.speakers import speaker_token

    speakers = list(fmt.speakers)
    who = speaker or speakers[0]
    other = next((s for s in speakers if s != who), who)
    example = render(tok, fmt, [Message(other, "are you coming tonight?")], who).input_ids
    return {
        "format": "convsim-export",
        "version": 1,
        "style": fmt.style,
        "special_tokens": fmt.special_tokens,
        "message_line": "[Name] text\\n",
        "prompt": (
            "bos, then one `[Name] text\\n` line per message (oldest first), then the token of the person "
            "who speaks next; the model writes that person's reply burst: messages separated by their "
            "own token, ended by another speaker's token or eos"
            if fmt.style == "base"
            else "the chat template with the system prompt and the history as `[Name] text` lines in one user "
            "turn, then the token of the person who speaks next"
        ),
        "system_prompt": fmt.system_prompt() if fmt.style == "instruct" else None,
        "example_prompt": tok.decode(example, skip_special_tokens=False),
        "example_prompt_ids": example,
        "speakers": {
            s: {"token": speaker_token(s), "ids": tag_ids(tok, fmt, s), "stop_token_ids": stop_ids(tok, fmt, s)}
            for s in speakers
        },
        "generation_config_speaker": speaker,
        "generation_config_stop_token_ids": stops,
        "sampling": {"temperature": 0.7, "top_p": 0.95, "max_new_tokens": 96},
        "source": {"run": run.path.name, "base_model": run.model_name, "adapter_hash": run.adapter_hash},
    }


README = """# {name}: a convsim export

A language model fine-tuned to continue a chat between {people}. Merged from `{base}` and the convsim
LoRA adapter `{adapter}`, with one added token per person ({tokens}). It may reproduce the private
messages it was trained on: share it as you would share the chat.

## Prompt format

{prompt_help}

    {example}

The reply is that person's *burst*: one or more messages, each after their own token, until another
person's token (or eos) comes. `convsim-format.json` has the token ids and, per person, the ids to stop at.

`generation_config.json` stops at {stop_help}.

## transformers

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained("{dir}")
model = AutoModelForCausalLM.from_pretrained("{dir}")
x = tok({example_py}, return_tensors="pt")        # adds bos
out = model.generate(**x, max_new_tokens=96)        # stop tokens come from generation_config.json
stops = set(model.generation_config.eos_token_id)
new = out[0, x.input_ids.shape[1]:].tolist()
new = new[:next((i for i, t in enumerate(new) if t in stops), len(new))]
messages = [m.strip() for m in tok.decode(new).split("{who_token}") if m.strip()]
```

Split on the speaker's token before dropping special tokens (`skip_special_tokens=True` would glue the
messages of a burst together).

## vLLM

    vllm serve {dir}
    # completions endpoint: {{"prompt": <as above>, "stop_token_ids": {who_stops},
    #                        "skip_special_tokens": false, "max_tokens": 96}}

## llama.cpp

    python convert_hf_to_gguf.py {dir} --outfile model.gguf
"""


PROMPT_HELP = {
    "base": "One line `[Name] text\\n` per message, oldest first, after the tokenizer's bos; the prompt ends with "
    "the token of the person who speaks next, for example:",
    "instruct": "The chat template, with a system prompt and the history as `[Name] text` lines in one user turn; "
    "the prompt ends with the token of the person who speaks next, for example:",
}


def write_readme(path: Path, shown: Path, run, fmt, card: dict, speaker: str | None) -> None:
    speakers = list(fmt.speakers)
    who = speaker or speakers[0]
    tokens = ", ".join(f"`[{s}]`" for s in speakers)
    if speaker:
        stop_help = f"the other people's tokens and eos, so `{speaker}`'s replies may be several messages"
    else:
        stop_help = (
            "every person's token and eos: one message per call. For bursts, pass the stop ids of the "
            "person who speaks from `convsim-format.json` (or export with `--as NAME`)"
        )
    example = card["example_prompt"]
    text = README.format(
        name=run.path.name,
        people=", ".join(speakers),
        base=run.model_name,
        adapter=run.adapter_hash,
        tokens=tokens,
        prompt_help=PROMPT_HELP[fmt.style],
        example=example.replace("\n", "\\n"),
        stop_help=stop_help,
        dir=str(shown),
        example_py=json.dumps(example.removeprefix(str(card.get("bos") or ""))),
        who_token=f"[{who}]",
        who_stops=card["speakers"][who]["stop_token_ids"],
    )
    (path / "README.md").write_text(text, encoding="utf-8")


def check_out(out: Path, run_, force: bool) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise UserError(f"{out} exists and is not empty; pass --force to replace it")
    if out.resolve() == run_.path.resolve() or run_.path.resolve() in out.resolve().parents:
        raise UserError("--out must not be inside the run directory")


def run(args):
    import time

    import torch

    from convsim.fsutil import atomic_dir
    from convsim.runs import open_run

    run_ = open_run(args.run_dir)
    speaker = run_.check_person(args.speaker) if args.speaker else (run_.people[0] if len(run_.people) == 1 else None)
    out = Path(args.out)
    check_out(out, run_, args.force)
    t0 = time.time()
    model, tok = run_.load(device="cpu", dtype=torch.float32)  # merge in fp32, cast after
    fmt = run_.fmt
    merged, diff = merge(model, tok, fmt)
    merged.to(getattr(torch, args.dtype))
    stops = set_generation_config(merged, tok, fmt, speaker)
    card = format_card(run_, tok, fmt, speaker, stops)
    card["bos"] = (
        tok.bos_token if tok.bos_token_id is not None and card["example_prompt_ids"][:1] == [tok.bos_token_id] else None
    )
    card["merge_max_logit_diff"] = diff
    card["dtype"] = args.dtype
    with atomic_dir(out) as tmp:  # owner-only: the weights remember the chat
        merged.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "convsim-format.json").write_text(
            json.dumps(card, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
        )
        write_readme(tmp, out, run_, fmt, card, speaker)
    out.chmod(0o700)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    summary = {
        "out": str(out),
        "dtype": args.dtype,
        "speaker": speaker,
        "stop_token_ids": stops,
        "merge_max_logit_diff": diff,
        "mb": round(size / 1e6, 2),
        "seconds": round(time.time() - t0, 1),
    }
    if args.json:
        print(json.dumps(summary))
    else:
        print(
            f"exported {run_.path} → {out} ({summary['mb']} MB, {args.dtype}; merged logits within {diff:.1e}); "
            f"load it with AutoModelForCausalLM.from_pretrained({str(out)!r}); see {out}/README.md"
        )
    return 0

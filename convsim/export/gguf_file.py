"""`convsim export RUN --format gguf`: one GGUF file of the merged model for llama.cpp, Ollama, LM Studio.

    convsim export runs/me --format gguf --out exports/me-gguf              # f16
    convsim export runs/me --format gguf --out exports/ana --quant q8_0 --as Ana

Written with the llama.cpp project's own Python package (`gguf`): its writer, its HF -> GGUF tensor-name
map and its Q8_0 quantizer; q4_k_m is quantized from the f16 file by llama.cpp itself (llama-cpp-python's
`llama_model_quantize`), as gguf-py has no k-quant writer. The transforms are the ones llama.cpp's `convert_hf_to_gguf.py` applies to a
Gemma 3 checkpoint: every RMSNorm weight gets +1 (Gemma's norm multiplies by `1 + w`; llama.cpp's by
`w`), the embedding is stored unscaled (llama.cpp's Gemma 3 graph multiplies by sqrt(hidden) itself),
the tied output head is not written, 1-D tensors stay F32.

The vocabulary is SentencePiece-style (`tokenizer.ggml.model = llama`): tokens, scores and token types.
Where the base model came from a GGUF (the embedded default) its own token table is copied, so the
base vocabulary is exactly llama.cpp's; otherwise it is derived from `tokenizer.json` (BPE with byte
fallback): a merged piece scores minus its merge rank, which orders merges as SentencePiece does.
Each speaker token is appended as a USER_DEFINED token: llama.cpp and Ollama read `[Ana]` in a prompt
as that one token (no special-token flag needed) and write it back as text, so stop strings match it.

Beside the GGUF: an Ollama `Modelfile` (see convsim/export/ollama.py), `convsim-format.json`, README.md.

Longer than most modules: the tensor transforms, the vocabulary and what this writer refuses to convert are
one file format, and `--format lora` writes its base through the same writer.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import NamedTuple

from convsim.errors import UserError

SUPPORTED = ("Gemma3ForCausalLM",)
GGUF_NAME = "model.gguf"
LLAMA_QUANTS = ("q4_k_m",)  # quantized by llama.cpp itself (needs llama-cpp-python)
SWA_PERIOD = 6  # llama.cpp builds Gemma 3 with five sliding-window layers, then one global layer
USER_DEFINED_SCORE = -1000.0  # what llama.cpp's converter gives added tokens


def _gemma3_text_config(config):
    return getattr(config, "text_config", None) or config


def check_supported(model) -> None:
    """Refuse, with the supported list, what this writer cannot convert faithfully."""
    arch = (getattr(model.config, "architectures", None) or [type(model).__name__])[0]
    if type(model).__name__ not in SUPPORTED and arch not in SUPPORTED:
        raise UserError(
            f"cannot write GGUF for a {type(model).__name__} base model; supported: {', '.join(SUPPORTED)} "
            "(Gemma 3 text models). Use `--format hf` and llama.cpp's convert_hf_to_gguf.py for others"
        )
    c = _gemma3_text_config(model.config)
    types = list(getattr(c, "layer_types", None) or [])
    want = ["full_attention" if (i + 1) % SWA_PERIOD == 0 else "sliding_attention" for i in range(len(types))]
    if types and types != want:
        raise UserError(
            "cannot write GGUF: this Gemma 3 model's sliding-window layer pattern differs from the one "
            "llama.cpp builds (five sliding layers, then one global)"
        )


# ---------------------------------------------------------------- vocabulary


def _byte_piece(tok: str) -> bool:
    return re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", tok) is not None


def _is_byte_level(data: dict) -> bool:
    pre = data.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    return any(p.get("type") == "ByteLevel" for p in parts)


def vocab_from_tokenizer_json(data: dict) -> tuple[str, list[str], list[float], list[int], list[str]]:
    """(tokenizer model, tokens, scores, token types, merges) for llama.cpp from a `tokenizer.json` whose
    model is BPE: with byte fallback (how transformers stores a SentencePiece BPE model such as Gemma's)
    it becomes llama.cpp's SentencePiece tokenizer (`llama`, scores, no merges); byte-level (GPT-2 style)
    becomes `gpt2` with its merges."""
    import gguf

    T = gguf.TokenType
    model = data["model"]
    spm = model.get("type") == "BPE" and bool(model.get("byte_fallback"))
    if not spm and not (model.get("type") == "BPE" and _is_byte_level(data)):
        raise UserError(
            "cannot write GGUF: the tokenizer is neither a SentencePiece-style BPE (byte fallback) nor a byte-level BPE"
        )
    vocab: dict[str, int] = dict(model["vocab"])
    added = {a["id"]: a for a in data.get("added_tokens", [])}
    for a in added.values():
        vocab.setdefault(a["content"], a["id"])
    n = max(vocab.values()) + 1
    if len(set(vocab.values())) != n:
        raise UserError("cannot write GGUF: the tokenizer's ids have gaps")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    rank: dict[str, int] = {}
    for k, m in enumerate(merges):
        a, b = m.split(" ", 1)
        rank.setdefault(a + b, k)
    tokens = [""] * n
    for t, i in vocab.items():
        tokens[i] = t
    unk = model.get("unk_token")
    scores, types = [], []
    for i, t in enumerate(tokens):
        if i in added:
            types.append(T.CONTROL if added[i].get("special") else T.USER_DEFINED)
            scores.append(USER_DEFINED_SCORE)
        elif spm and t == unk:
            types.append(T.UNKNOWN)
            scores.append(0.0)
        elif spm and _byte_piece(t):
            types.append(T.BYTE)
            scores.append(0.0)
        else:
            types.append(T.NORMAL)
            scores.append(-float(rank[t]) if t in rank else -float(len(rank) + i))
    return ("llama" if spm else "gpt2"), tokens, scores, [int(x) for x in types], ([] if spm else merges)


def source_gguf_vocab(path: Path) -> tuple[list[str], list[float], list[int]]:
    """The token table of a GGUF file (the base model's own, as llama.cpp wrote it)."""
    import gguf

    r = gguf.GGUFReader(str(path))
    f = r.fields
    return (
        list(f["tokenizer.ggml.tokens"].contents()),
        [float(x) for x in f["tokenizer.ggml.scores"].contents()],
        [int(x) for x in f["tokenizer.ggml.token_type"].contents()],
    )


def build_vocab(tok, n_rows: int, base_gguf: Path | None, speaker_tokens: list[str]):
    """The GGUF token table for the run's tokenizer: the base's (from its GGUF where there is one),
    then the speaker tokens as USER_DEFINED at their ids."""
    import gguf

    kind, tokens, scores, types, merges = vocab_from_tokenizer_json(json.loads(tok.backend_tokenizer.to_str()))
    if base_gguf is not None and kind == "llama":
        bt, bs, bty = source_gguf_vocab(base_gguf)
        if len(bt) > len(tokens):
            raise UserError(f"cannot write GGUF: base GGUF vocabulary ({len(bt)}) larger than the tokenizer's")
        tokens[: len(bt)], scores[: len(bt)], types[: len(bt)] = bt, bs, bty
    for name in speaker_tokens:
        i = tok.convert_tokens_to_ids(name)
        if i is None or i == tok.unk_token_id or i >= len(tokens):
            raise UserError(f"cannot write GGUF: no token for {name} in the run's tokenizer")
        tokens[i], scores[i], types[i] = name, USER_DEFINED_SCORE, int(gguf.TokenType.USER_DEFINED)
    if len(tokens) != n_rows:
        raise UserError(f"cannot write GGUF: the tokenizer has {len(tokens)} tokens but the embedding {n_rows} rows")
    return kind, tokens, scores, types, merges


# ---------------------------------------------------------------- tensors


def gguf_tensors(model, quant: str):
    """(gguf name, array, raw dtype or None) for every tensor, transformed and quantized as llama.cpp's
    converter does for Gemma 3."""
    import gguf
    import numpy as np
    import torch

    c = _gemma3_text_config(model.config)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA3, c.num_hidden_layers)
    sd = model.state_dict()
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    tied = head is None or head.weight.data_ptr() == emb.data_ptr() or torch.equal(head.weight, emb)
    for hf_name, t in sd.items():
        if hf_name.endswith("lm_head.weight") and tied:
            continue
        new = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise UserError(f"cannot write GGUF: no GGUF name for tensor {hf_name}")
        x = t.detach().to(torch.float32)
        if hf_name.endswith("norm.weight"):
            x = x + 1.0
        a = x.cpu().numpy()
        if a.ndim == 1:
            yield new, a.astype(np.float32), None
        elif quant == "q8_0" and a.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0] == 0:
            q = gguf.GGMLQuantizationType.Q8_0
            yield new, gguf.quants.quantize(a, q), q
        else:
            yield new, a.astype(np.float16), None


def llama_quantize(src: Path, dst: Path, quant: str) -> None:
    """k-quants with llama.cpp's own quantizer (gguf-py has none), through llama-cpp-python."""
    try:
        import llama_cpp
    except ImportError:
        raise UserError(
            f"--quant {quant} uses llama.cpp's quantizer: pip install -e '.[gguf-runtime]' (llama-cpp-python)"
        ) from None
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = {"q4_k_m": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M}[quant]
    if llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params) != 0:
        raise RuntimeError(f"llama.cpp could not quantize {src} to {quant}")


def write_gguf(path: Path, model, tok, quant: str, name: str, base_gguf: Path | None, speaker_tokens: list[str]):
    if quant in LLAMA_QUANTS:  # write f16, then let llama.cpp quantize it
        f16 = path.with_name(path.name + ".f16")
        try:
            write_gguf(f16, model, tok, "f16", name, base_gguf, speaker_tokens)
            llama_quantize(f16, path, quant)
        finally:
            f16.unlink(missing_ok=True)
        return
    import gguf

    check_supported(model)
    c = _gemma3_text_config(model.config)
    n_rows = model.get_input_embeddings().weight.shape[0]
    kind, tokens, scores, types, merges = build_vocab(tok, n_rows, base_gguf, speaker_tokens)

    w = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.GEMMA3])
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(name)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    rope = getattr(c, "rope_parameters", None) or {}
    full = rope.get("full_attention", rope) if isinstance(rope, dict) else {}
    w.add_rope_freq_base(float(full.get("rope_theta", 1_000_000.0)))
    if full.get("rope_type") == "linear" and full.get("factor"):
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(full["factor"]))
    if getattr(c, "final_logit_softcapping", None):
        w.add_final_logit_softcapping(c.final_logit_softcapping)
    if getattr(c, "sliding_window", None):
        w.add_sliding_window(c.sliding_window)
    ftype = {"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[quant]
    w.add_file_type(ftype)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)

    w.add_tokenizer_model(kind)
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    if kind == "llama":
        w.add_token_scores(scores)
    else:
        w.add_token_merges(merges)
    for key, tid in (
        ("bos", tok.bos_token_id),
        ("eos", tok.eos_token_id),
        ("unk", tok.unk_token_id),
        ("pad", tok.pad_token_id),
    ):
        if tid is not None:
            getattr(w, f"add_{key}_token_id")(tid)
    if "<end_of_turn>" in tokens:
        w.add_eot_token_id(tokens.index("<end_of_turn>"))
    w.add_add_bos_token(tok.bos_token_id is not None)
    w.add_add_eos_token(False)
    if kind == "llama":
        w.add_add_space_prefix(False)
    if getattr(tok, "chat_template", None):
        w.add_chat_template(tok.chat_template)

    for tname, arr, raw in gguf_tensors(model, quant):
        w.add_tensor(tname, arr, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# ---------------------------------------------------------------- the command

README = """# {name}: a convsim export for llama.cpp / Ollama

`{gguf}` is the merged model ({base} + the convsim LoRA adapter, {quant}) with one token per person
({tokens}). It may reproduce the private messages it was trained on: share it as you would share the chat.

## Ollama

    ollama create {ollama_name} -f {dir}/Modelfile
    ollama run {ollama_name}

You write {other}'s messages; the model answers as {persona} and stops when someone else would speak.

## llama.cpp

    llama-cli -m {dir}/{gguf} -p '[{other}] hey, how are you?\\n[{persona}]' -n 96 -r '[{other}]'

The prompt is one `[Name] text` line per message, then the token of the person who speaks next (llama.cpp
adds bos). Stop at the other speakers' tokens. `convsim-format.json` has the token ids.
"""


def check_quant_available(quant: str) -> None:
    if quant in LLAMA_QUANTS:
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            raise UserError(
                f"--quant {quant} uses llama.cpp's quantizer: pip install -e '.[gguf-runtime]' (llama-cpp-python)"
            ) from None


def check_run(run_, model) -> None:
    """Refuse a run (its loaded model, adapter on or not) whose model or prompt format this writer cannot
    convert faithfully."""
    check_supported(model.get_base_model() if hasattr(model, "get_base_model") else model)
    fmt = run_.fmt
    if not fmt.special_tokens:
        raise UserError("cannot write GGUF for a run without speaker tokens (trained with plain-text tags)")
    if fmt.style != "base":
        raise UserError("cannot write GGUF: only runs with the base prompt style are supported")


def ollama_name(persona: str) -> str:
    return re.sub(r"[^a-z0-9_-]+", "-", persona.lower()).strip("-") or "clone"


def base_gguf_path(model_name: str) -> Path | None:
    from convsim.modeling.models import embedded_gguf, resolve

    return embedded_gguf() if resolve(model_name).source == "embedded" else None


class GGUFSource(NamedTuple):
    """A run opened for a GGUF export (`--format gguf` or `lora`): checked, loaded in fp32 on the CPU."""

    run: object
    out: Path
    model: object
    tok: object
    fmt: object
    speakers: list[str]
    persona: str  # whom the Modelfile's prompt answers as: --as, else the run's first target
    started: float


def open_for_gguf(args) -> GGUFSource:
    """The checks and loading that every GGUF export starts with: the person, the out dir, the quant, the
    model and the prompt format. Each refusal is a UserError raised before anything is written."""
    import time

    import torch

    from convsim.export.hf import check_out
    from convsim.runs import open_run

    run_ = open_run(args.run_dir)
    speaker = run_.check_speaker(args.speaker) if args.speaker else None
    out = Path(args.out)
    check_out(out, run_, args.force)
    check_quant_available(args.quant)
    started = time.time()
    model, tok = run_.load(device="cpu", dtype=torch.float32)
    check_run(run_, model)
    speakers = list(run_.fmt.speakers)
    persona = speaker or (run_.targets[0] if run_.targets else speakers[0])
    return GGUFSource(run_, out, model, tok, run_.fmt, speakers, persona, started)


def run(args):
    import time

    from convsim.export.hf import format_card, merge
    from convsim.export.ollama import modelfile
    from convsim.fsutil import atomic_dir
    from convsim.modeling.speakers import speaker_token

    run_, out, model, tok, fmt, speakers, persona, t0 = open_for_gguf(args)
    merged, diff = merge(model, tok, fmt)
    merged.eval()
    card = format_card(run_, tok, fmt, persona, [])
    card.update({"format": "convsim-export-gguf", "gguf": GGUF_NAME, "quant": args.quant, "merge_max_logit_diff": diff})
    base = base_gguf_path(run_.model_name)
    with atomic_dir(out) as tmp:  # owner-only: the weights remember the chat
        write_gguf(tmp / GGUF_NAME, merged, tok, args.quant, run_.path.name, base, [speaker_token(s) for s in speakers])
        (tmp / "Modelfile").write_text(modelfile(GGUF_NAME, speakers, persona), encoding="utf-8")
        (tmp / "convsim-format.json").write_text(
            json.dumps(card, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
        )
        other = next((s for s in speakers if s != persona), persona)
        (tmp / "README.md").write_text(
            README.format(
                name=run_.path.name,
                gguf=GGUF_NAME,
                base=run_.model_name,
                quant=args.quant,
                tokens=", ".join(f"`[{s}]`" for s in speakers),
                ollama_name=ollama_name(persona),
                dir=str(out),
                other=other,
                persona=persona,
            ),
            encoding="utf-8",
        )
    out.chmod(0o700)
    size = (out / GGUF_NAME).stat().st_size
    summary = {
        "out": str(out),
        "format": "gguf",
        "quant": args.quant,
        "persona": persona,
        "bytes": size,
        "merge_max_logit_diff": diff,
        "seconds": round(time.time() - t0, 1),
    }
    if args.json:
        print(json.dumps(summary))
    else:
        print(
            f"exported {run_.path} → {out}/{GGUF_NAME} ({size / 1e6:.1f} MB, {args.quant}) + Modelfile for "
            f"{persona}; run it with: ollama create NAME -f {out}/Modelfile && ollama run NAME"
        )
    return 0


def llama_greedy(llm, ids: list[int], n: int) -> list[int]:
    """`n` greedy tokens after `ids` from a llama-cpp-python `Llama` (created with `logits_all=True`), token by
    token from its own scores: what the exported file gives in llama.cpp, to hold against `greedy_ids`."""
    import numpy as np

    llm.reset()
    llm.eval(ids)
    got = []
    for _ in range(n):
        t = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        got.append(t)
        llm.eval([t])
    return got

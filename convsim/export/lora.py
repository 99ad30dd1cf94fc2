"""`convsim export RUN --format lora`: the run's LoRA adapter, not merged, for engines that apply an adapter
to a base model when they load it: vLLM (`--enable-lora`), PEFT, llama.cpp (`--lora`), Ollama (`ADAPTER`).

    convsim export runs/me --format lora --out exports/me-lora --as Ana

None of these engines takes new tokens from an adapter: vLLM serves every adapter with its base model's
vocabulary and refuses PEFT's trainable-token rows, and a GGUF LoRA holds only lora_a/lora_b pairs of tensors
the base already has. So the export has two parts: a base that holds the run's speaker tokens with their
trained embedding rows (no LoRA merged in), and the LoRA alone.

    OUT/base/            transformers directory of that base, with the tokenizer (vLLM, PEFT)
    OUT/peft/            the PEFT adapter with the LoRA weights only (its speaker rows are in base/), tokenizer
    OUT/NAME-base.gguf   the same base for llama.cpp (the writer of convsim/export/gguf_file.py, `--quant`)
    OUT/NAME-lora.gguf   the LoRA in llama.cpp's adapter format (F32 tensors)
    OUT/Modelfile        Ollama: FROM the base GGUF, ADAPTER the LoRA GGUF
    OUT/convsim-format.json, README.md

Before anything is written, base/ with peft/ applied by PEFT must give the run's logits on a probe
conversation. The GGUF LoRA's layout is llama.cpp's (`src/llama-adapter.cpp`, `convert_lora_to_gguf.py`):
`general.type = adapter`, `adapter.type = lora`, `adapter.lora.alpha`, and per target `<gguf tensor>.lora_a`
(ggml shape [in, r], PEFT's lora_A as stored) and `<gguf tensor>.lora_b` ([r, out], PEFT's lora_B). Gemma's
norm and embedding transforms concern only the base file: the adapter touches neither.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from convsim.errors import UserError

PEFT_PREFIX = "base_model.model."
ROWS_SUFFIX = ".token_adapter.trainable_tokens_delta"
LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])\.weight$")
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's allowed --max-lora-rank values


def split_adapter(adapter_dir: Path) -> tuple[dict, dict, dict]:
    """(adapter_config, LoRA tensors by PEFT key, speaker rows by module name) of a run's PEFT adapter."""
    from safetensors.torch import load_file

    config = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    if config.get("peft_type") != "LORA" or config.get("use_dora"):
        raise UserError("--format lora exports plain LoRA adapters (not DoRA or other PEFT methods)")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise UserError("--format lora needs one rank and alpha for every layer (llama.cpp has one alpha)")
    lora, rows = {}, {}
    for key, t in load_file(str(adapter_dir / "adapter_model.safetensors")).items():
        if key.endswith(ROWS_SUFFIX):
            rows[key.removeprefix(PEFT_PREFIX).removesuffix(ROWS_SUFFIX)] = t
        elif LORA_KEY.match(key):
            lora[key] = t
        else:
            raise UserError(f"cannot export the adapter alone: it holds {key}, neither a LoRA pair nor speaker rows")
    return config, lora, rows


def token_indices(config: dict, module: str) -> list[int]:
    """The token ids PEFT's `trainable_token_indices` gives the rows of `module` (a list means embed_tokens)."""
    tti = config.get("trainable_token_indices") or {}
    if isinstance(tti, list):
        tti = {"embed_tokens": tti}
    short = module.rsplit(".", 1)[-1]
    if short not in tti:
        raise UserError(f"adapter_config.json names no token ids for the rows of {module}")
    return list(tti[short])


def base_with_rows(run_, config: dict, rows: dict):
    """The run's base model with its tokenizer's speaker tokens, whose embedding rows (and output-head rows,
    where trained separately) are the trained ones; no LoRA."""
    import torch

    base, tok = run_.load(device="cpu", dtype=torch.float32, adapter=False)
    with torch.no_grad():
        for module, t in rows.items():
            w = base.get_submodule(module).weight
            idx = torch.tensor(token_indices(config, module))
            if t.shape != (len(idx), w.shape[1]) or int(idx.max()) >= w.shape[0]:
                raise UserError(f"the adapter's rows for {module} do not fit the base model")
            w[idx] = t.to(w.dtype)
    base.eval()
    return base, tok


def llama_cpp_alpha(config: dict) -> float:
    """`adapter.lora.alpha` for llama.cpp. PEFT scales B·A by alpha / r, or by alpha / sqrt(r) with rsLoRA;
    llama.cpp always by adapter.lora.alpha / r (r from the tensors), so this is PEFT's scale times r."""
    r, alpha = config["r"], config["lora_alpha"]
    scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    return float(scale * r)


def write_peft(path: Path, config: dict, lora: dict, tok) -> None:
    """The PEFT adapter without trainable-token rows (they are in the base), as vLLM and PEFT load it."""
    from safetensors.torch import save_file

    path.mkdir()
    save_file({k: v.contiguous() for k, v in lora.items()}, str(path / "adapter_model.safetensors"), {"format": "pt"})
    cfg = {**config, "trainable_token_indices": None}
    (path / "adapter_config.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
    tok.save_pretrained(path)


def write_lora_gguf(path: Path, lora: dict, config: dict, n_layers: int, name: str) -> None:
    """The LoRA pairs as llama.cpp's GGUF adapter for a Gemma 3 base."""
    import gguf

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA3, n_layers)
    tensors = {}
    for key, t in lora.items():
        m = LORA_KEY.match(key)
        hf_name = m["module"].removeprefix(PEFT_PREFIX) + ".weight"
        new = names.get_name(hf_name, try_suffixes=(".weight",))
        if new is None:
            raise UserError(f"cannot write a GGUF LoRA: no GGUF name for {hf_name}")
        # numpy (r, in) and (out, r) are ggml [in, r] and [r, out]: what llama.cpp's loader checks against
        # the base tensor ([in, out]) and multiplies as b·(a·x)
        tensors[f"{new}.lora_{m['which'].lower()}"] = t.float().numpy()
    w = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.GEMMA3])
    w.add_type(gguf.GGUFType.ADAPTER)
    w.add_name(name)
    w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, llama_cpp_alpha(config))
    for tname in sorted(tensors):
        w.add_tensor(tname, tensors[tname])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def check_split(model, base, peft_dir: Path, tok, fmt) -> float:
    """base + the written LoRA-only adapter, applied by PEFT, against the run's model (raises if they
    differ); leaves `base` without the adapter."""
    from peft import PeftModel

    from convsim.export.hf import check_same_logits, probe_logits

    want = probe_logits(model, tok, fmt)
    applied = PeftModel.from_pretrained(base, str(peft_dir))
    diff = check_same_logits(want, probe_logits(applied, tok, fmt), "base with speaker rows + LoRA-only adapter")
    applied.unload()
    return diff


README = """# {name}: the convsim LoRA of `{base}`, unmerged

Two parts: a base model that holds the speaker tokens ({tokens}) with the embedding rows this run trained,
and the LoRA adapter alone. No engine adds tokens from an adapter, so the adapter goes on this base, not on
the stock `{base}`. Both remember the chat they were trained on: share them as you would share the chat.

The prompt: one `[Name] text` line per message, oldest first, then the token of the person who speaks next
(the engine adds bos); stop at the other speakers' tokens. `convsim-format.json` has the token ids.

## vLLM

    vllm serve {dir}/base --enable-lora --lora-modules {lora_name}={dir}/peft{max_rank}
    # completions endpoint: {{"model": "{lora_name}", "prompt": "[{other}] hey, how are you?\\n[{persona}]",
    #   "stop_token_ids": {stops}, "skip_special_tokens": false, "max_tokens": 96}}

## PEFT

```python
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("{dir}/base"), "{dir}/peft")
tok = AutoTokenizer.from_pretrained("{dir}/base")
```

## llama.cpp

    llama-cli -m {dir}/{base_gguf} --lora {dir}/{lora_gguf} \\
        -p '[{other}] hey, how are you?\\n[{persona}]' -n 96 -r '[{other}]'

## Ollama

    ollama create {ollama_name} -f {dir}/Modelfile && ollama run {ollama_name}
"""


def run(args):
    import time

    import torch

    from convsim.export.gguf_file import base_gguf_path, ollama_name, open_for_gguf, write_gguf
    from convsim.export.hf import format_card, set_generation_config, stop_ids
    from convsim.export.ollama import modelfile
    from convsim.fsutil import atomic_dir
    from convsim.modeling.speakers import speaker_token

    run_, out, model, tok, fmt, speakers, persona, t0 = open_for_gguf(args)
    config, lora, rows = split_adapter(run_.adapter_dir)
    base, _ = base_with_rows(run_, config, rows)
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", run_.path.name).strip("-.") or "run"
    base_gguf, lora_gguf = f"{stem}-base.gguf", f"{stem}-lora.gguf"
    stops = stop_ids(tok, fmt, persona)
    card = format_card(run_, tok, fmt, persona, stops)
    with atomic_dir(out) as tmp:  # owner-only: the weights remember the chat
        write_peft(tmp / "peft", config, lora, tok)
        diff = check_split(model, base, tmp / "peft", tok, fmt)
        del model
        n_layers = base.config.get_text_config().num_hidden_layers
        write_lora_gguf(tmp / lora_gguf, lora, config, n_layers, f"{run_.path.name} LoRA")
        write_gguf(
            tmp / base_gguf, base, tok, args.quant, f"{run_.path.name} base", base_gguf_path(run_.model_name),
            [speaker_token(s) for s in speakers],
        )  # fmt: skip
        set_generation_config(base, tok, fmt, persona)
        base.to(getattr(torch, args.dtype)).save_pretrained(tmp / "base")
        tok.save_pretrained(tmp / "base")
        (tmp / "Modelfile").write_text(modelfile(base_gguf, speakers, persona, adapter=lora_gguf), encoding="utf-8")
        card.update(
            {
                "format": "convsim-export-lora",
                "files": {"base": "base", "peft": "peft", "base_gguf": base_gguf, "lora_gguf": lora_gguf},
                "quant": args.quant,
                "dtype": args.dtype,
                "lora_r": config["r"],
                "lora_alpha": config["lora_alpha"],
                "use_rslora": bool(config.get("use_rslora")),
                "llama_cpp_alpha": llama_cpp_alpha(config),
                "split_max_logit_diff": diff,
            }
        )
        (tmp / "convsim-format.json").write_text(
            json.dumps(card, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
        )
        other = next((s for s in speakers if s != persona), persona)
        max_rank = next(r for r in VLLM_RANKS if r >= config["r"])
        (tmp / "README.md").write_text(
            README.format(
                name=run_.path.name,
                base=run_.model_name,
                tokens=", ".join(f"`[{s}]`" for s in speakers),
                dir=str(out),
                lora_name=ollama_name(persona),
                max_rank=f" --max-lora-rank {max_rank}" if max_rank > 16 else "",
                other=other,
                persona=persona,
                stops=card["speakers"][persona]["stop_token_ids"],
                base_gguf=base_gguf,
                lora_gguf=lora_gguf,
                ollama_name=ollama_name(persona),
            ),
            encoding="utf-8",
        )
    out.chmod(0o700)
    sizes = {
        key: sum(f.stat().st_size for f in ([p] if p.is_file() else p.rglob("*")) if f.is_file())
        for key, p in (
            ("base", out / "base"),
            ("peft", out / "peft"),
            ("base_gguf", out / base_gguf),
            ("lora_gguf", out / lora_gguf),
        )
    }
    summary = {
        "out": str(out),
        "format": "lora",
        "quant": args.quant,
        "persona": persona,
        "files": card["files"],
        "bytes": sizes,
        "llama_cpp_alpha": llama_cpp_alpha(config),
        "split_max_logit_diff": diff,
        "seconds": round(time.time() - t0, 1),
    }
    if args.json:
        print(json.dumps(summary))
    else:
        print(
            f"exported {run_.path} → {out}: base/ + peft/ (vLLM, PEFT), {base_gguf} + {lora_gguf} "
            f"({sizes['lora_gguf'] / 1e6:.1f} MB; llama.cpp --lora), Modelfile (Ollama); see {out}/README.md"
        )
    return 0

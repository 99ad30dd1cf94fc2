"""`convsim export`: the command. `--format hf` (default) writes a transformers directory
(convsim/export/hf.py); `--format gguf` one GGUF file and an Ollama Modelfile (convsim/export/gguf_file.py);
`--format lora` the LoRA unmerged, with a base that holds the speaker tokens (convsim/export/lora.py)."""

from __future__ import annotations

from convsim.export.hf import EXAMPLES, HELP, add_arguments

__all__ = ["EXAMPLES", "HELP", "add_arguments", "run"]


def run(args):
    if args.format == "lora":
        from convsim.export.lora import run as run_lora

        return run_lora(args)
    if args.format == "gguf":
        from convsim.export.gguf_file import run as run_gguf

        return run_gguf(args)
    from convsim.export.hf import run as run_hf

    return run_hf(args)

"""What the real tier's llama.cpp tests share: the probe conversation, its prompt as llama.cpp reads it, and
the `llama-cli` binary (built from llama.cpp's source by .ci/run; its path in CONVSIM_LLAMA_CLI)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from convsim.data.schema import Message

CLI_ENV = "CONVSIM_LLAMA_CLI"
HISTORY = [
    Message("Ana", "hey how are you"),
    Message("Ben", "Not bad. Working late again."),
    Message("Ana", "lol yes"),
    Message("Ben", "Maybe tomorrow then."),
]
PROMPT = "".join(f"[{m.speaker}] {m.text}\n" for m in HISTORY) + "[Ana]"  # llama.cpp adds bos itself


def llama_cli() -> str:
    """The llama-cli binary; a missing one fails the test (never a silent skip: the proof is the point)."""
    path = os.environ.get(CLI_ENV, "")
    if not (path and os.access(path, os.X_OK)):
        pytest.fail(f"{CLI_ENV} must name a llama-cli binary built from llama.cpp's source (see .ci/run)")
    return path


def llama_cpp_module():
    """llama-cpp-python, or a failed test that says how to install it."""
    try:
        import llama_cpp
    except ImportError:
        pytest.fail("llama-cpp-python is not installed: pip install -e '.[gguf-runtime]'")
    return llama_cpp


def run_llama(model: Path, n_tokens: int, *extra: str, prompt: str = PROMPT) -> subprocess.CompletedProcess:
    """Greedy completion of `prompt` by llama-cli, no chat template, prompt not echoed; stdout is the
    generated text (llama-cli ends it with a blank line, removed here)."""
    args = [llama_cli(), "-m", str(model), "-p", prompt, "-n", str(n_tokens), "--temp", "0", "--top-k", "1"]
    args += ["-no-cnv", "--no-display-prompt", "--no-warmup", "-c", "256", "-t", "2", "--seed", "0", *extra]
    p = subprocess.run(args, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=300)
    p.stdout = p.stdout.removesuffix("\n\n")
    return p

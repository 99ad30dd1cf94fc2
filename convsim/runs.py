"""The run directory: everything needed to reload a fine-tuned model exactly as it was trained.

    RUN_DIR/
      run.json            base model, prompt format, speakers and their token ids, split, adapter hash
      config.yaml         the resolved TrainConfig
      data/conversations.jsonl   the conversations the run used (owner-only)
      adapter/            standard PEFT adapter (PeftModel.from_pretrained loads it)
      tokenizer/          tokenizer with the speaker tokens
      checkpoints/        trainer checkpoints (resume with --continue-training)
      metrics.jsonl       train/validation loss by step;  samples.jsonl: validation samples
      logs/               TensorBoard events

    run = open_run("runs/demo"); model, tok = run.load()
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from convsim.data.examples import PromptFormat
from convsim.data.schema import Conversation, read_conversations
from convsim.errors import UserError


def extra_prefixes(n_dirs: int) -> tuple[str, ...]:
    """The id prefixes of `convsim train --extra-data` conversations in a run's data (`x0:`, `x1:`, ...)."""
    return tuple(f"x{k}:" for k in range(n_dirs))


def dir_hash(path: Path) -> str:
    """sha256 over the adapter's files (names + bytes), to tie artifacts to one adapter."""
    h = hashlib.sha256()
    for f in sorted(p for p in Path(path).rglob("*") if p.is_file()):
        h.update(f.relative_to(path).as_posix().encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


@dataclass
class Run:
    path: Path
    meta: dict

    @property
    def model_name(self) -> str:
        return self.meta["model"]

    @property
    def speakers(self) -> list[str]:
        return list(self.meta["speakers"])

    @property
    def targets(self) -> list[str]:
        return list(self.meta.get("targets") or self.meta["speakers"])

    @property
    def fmt(self) -> PromptFormat:
        return PromptFormat(style=self.meta["prompt_style"], speakers=tuple(self.speakers),
                            special_tokens=self.meta["special_tokens"], chat_template=self.meta.get("chat_template"))

    @property
    def adapter_dir(self) -> Path:
        return self.path / "adapter"

    @property
    def adapter_hash(self) -> str:
        return self.meta.get("adapter_hash") or "none"

    @cached_property
    def conversations(self) -> list[Conversation]:
        return read_conversations(self.path / "data")

    def split(self, name: str) -> list[Conversation]:
        ids = set(self.meta["split"][name])
        return [c for c in self.conversations if c.id in ids]

    def is_extra(self, c: Conversation) -> bool:
        """Whether a conversation came from `--extra-data` (training only, not the chat the run is about)."""
        n = len((self.meta.get("extra_data") or {}).get("dirs", []))
        return n > 0 and c.id.startswith(extra_prefixes(n))

    def check_speaker(self, name: str) -> str:
        if name not in self.speakers:
            raise UserError(f"unknown speaker {name!r}; this run knows {', '.join(self.speakers)}")
        return name

    def other_speaker(self, name: str) -> str:
        others = [s for s in self.speakers if s != name]
        return others[0] if others else name

    def load(self, device: str | None = None, dtype=None, adapter: bool = True):
        from convsim.modeling.models import load
        return load(self.model_name, adapter=self.adapter_dir if adapter else None,
                    tokenizer_dir=self.path / "tokenizer", device=device, dtype=dtype)


def open_run(path) -> Run:
    p = Path(path)
    if not (p / "run.json").exists():
        raise UserError(f"{p} is not a run directory (no run.json); train one with `convsim train`")
    meta = json.loads((p / "run.json").read_text(encoding="utf-8"))
    if not (p / "adapter" / "adapter_config.json").exists():
        raise UserError(f"{p} has no trained adapter yet (was training interrupted? resume with --continue-training)")
    return Run(p, meta)

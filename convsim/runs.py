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

`RunMeta` is run.json, typed: its fields and their defaults are the one statement of what a run records
(run dirs written by earlier versions load with those defaults; keys this version does not know are kept).
`convsim train` writes it; everything that reads a run reads it through `Run.meta`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, fields
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


RUN_JSON = "run.json"


@dataclass
class RunMeta:
    """run.json. Field order is the file's key order."""

    model: str
    prompt_style: str  # "base" or "instruct"
    special_tokens: bool
    speakers: list[str]
    targets: list[str] | None = None  # None: every speaker
    speaker_token_ids: dict[str, int] = field(default_factory=dict)
    loss: str = "reply"
    context_size: int = 8
    max_burst: int = 8
    seed: int = 0
    split: dict[str, list[str]] = field(default_factory=lambda: {"train": [], "val": [], "test": []})
    examples: dict[str, int] = field(default_factory=dict)
    status: str = "training"  # "training" until the adapter is written, then "done"
    resumed_from: str | None = None
    extra_data: dict | None = None  # `--extra-data`: dirs, counts, speakers found only there
    # written once training is done (LATE)
    activation_checkpointing: bool | None = None
    compiled_layers: int | None = None
    group_by_length: bool | None = None
    packing: bool | None = None
    frozen_dtype: str | None = None
    adapter_hash: str | None = None
    train_seconds: float | None = None
    tokens_per_s: float | None = None
    world_size: int | None = None
    global_step: int | None = None
    train_loss: float | None = None
    eval_loss: float | None = None
    device: str | None = None
    kept_best: dict | None = None
    stop_reason: str | None = None
    chat_template: str | None = None  # an instruct run's template, when it differs from the tokenizer's
    other: dict = field(default_factory=dict)  # keys this version does not know, written back unchanged

    LATE = (
        "activation_checkpointing",
        "compiled_layers",
        "group_by_length",
        "packing",
        "frozen_dtype",
        "adapter_hash",
        "train_seconds",
        "tokens_per_s",
        "world_size",
        "global_step",
        "train_loss",
        "eval_loss",
        "device",
        "kept_best",
        "stop_reason",
    )
    REQUIRED = ("model", "prompt_style", "special_tokens", "speakers")

    @classmethod
    def from_json(cls, data: dict, where: str = RUN_JSON) -> "RunMeta":
        if not isinstance(data, dict):
            raise UserError(f"{where}: expected a JSON object")
        missing = [k for k in cls.REQUIRED if k not in data]
        if missing:
            raise UserError(f"{where}: missing {', '.join(missing)}; is this a convsim run directory?")
        known = {f.name for f in fields(cls)} - {"other"}
        return cls(
            **{k: v for k, v in data.items() if k in known}, other={k: v for k, v in data.items() if k not in known}
        )

    def to_json(self) -> dict:
        """The file's content: a run still training has none of the LATE keys yet; `chat_template` only
        when there is one."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if (
                f.name == "other"
                or (f.name in self.LATE and self.status != "done")
                or (f.name == "chat_template" and v is None)
            ):
                continue
            out[f.name] = v
        return {**out, **self.other}

    def get(self, key: str, default=None):
        """Mapping-style read (`meta.get("context_size")`), for code written when run.json was a dict; a
        field left at None gives `default`."""
        v = getattr(self, key) if key in self.__dataclass_fields__ and key != "other" else self.other.get(key)
        return default if v is None else v

    def __getitem__(self, key: str):
        if key in self.__dataclass_fields__ and key != "other":
            return getattr(self, key)
        return self.other[key]


def read_meta(run_dir) -> RunMeta:
    path = Path(run_dir) / RUN_JSON
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        raise UserError(f"{path}: not valid JSON") from None
    return RunMeta.from_json(data, str(path))


def write_meta(run_dir, meta: RunMeta) -> None:
    from convsim.fsutil import write_json

    write_json(Path(run_dir) / RUN_JSON, meta.to_json())


@dataclass
class Run:
    path: Path
    meta: RunMeta

    @property
    def model_name(self) -> str:
        return self.meta.model

    @property
    def speakers(self) -> list[str]:
        """Every name with a speaker token: the people, the others of the chat, and the speakers found only in
        `--extra-data` (context the model reads, never someone it plays)."""
        return list(self.meta.speakers)

    @property
    def targets(self) -> list[str]:
        return list(self.meta.targets or self.meta.speakers)

    @property
    def people(self) -> list[str]:
        """The people this run simulates (its target speakers): what every listing of "the people" shows and
        who the model may play. Speakers found only in --extra-data are never among them, also in a run.json
        from before targets were recorded."""
        only_extra = set((self.meta.extra_data or {}).get("speakers_only_here", []))
        return [s for s in self.targets if s not in only_extra]

    @property
    def fmt(self) -> PromptFormat:
        return PromptFormat(
            style=self.meta.prompt_style,
            speakers=tuple(self.speakers),
            special_tokens=self.meta.special_tokens,
            chat_template=self.meta.chat_template,
        )

    @property
    def adapter_dir(self) -> Path:
        return self.path / "adapter"

    @property
    def adapter_hash(self) -> str:
        return self.meta.adapter_hash or "none"

    @cached_property
    def conversations(self) -> list[Conversation]:
        return read_conversations(self.path / "data")

    def split(self, name: str) -> list[Conversation]:
        ids = set(self.meta.split[name])
        return [c for c in self.conversations if c.id in ids]

    def is_extra(self, c: Conversation) -> bool:
        """Whether a conversation came from `--extra-data` (training only, not the chat the run is about)."""
        n = len((self.meta.extra_data or {}).get("dirs", []))
        return n > 0 and c.id.startswith(extra_prefixes(n))

    def check_speaker(self, name: str) -> str:
        """`name` if it is any speaker of the run (someone who may appear in a history)."""
        if name not in self.speakers:
            raise UserError(f"unknown speaker {name!r}; this run knows {', '.join(self.speakers)}")
        return name

    def check_person(self, name: str) -> str:
        """`name` if the run simulates them (someone the model may play or be asked about)."""
        if name in self.people:
            return name
        if name not in self.speakers:
            raise UserError(f"unknown speaker {name!r}; this run knows {', '.join(self.people)}")
        only_extra = name in (self.meta.extra_data or {}).get("speakers_only_here", [])
        why = (
            "they appear only in --extra-data, as context" if only_extra else "the run was not trained on their replies"
        )
        raise UserError(f"{name!r} is not one of this run's people ({', '.join(self.people)}): {why}")

    def other_speaker(self, name: str) -> str:
        """Who talks to `name` by default: another of the people, else another speaker of the chat."""
        others = [s for s in self.people if s != name] or [s for s in self.speakers if s != name]
        return others[0] if others else name

    def load(self, device: str | None = None, dtype=None, adapter: bool = True):
        from convsim.modeling.models import load

        return load(
            self.model_name,
            adapter=self.adapter_dir if adapter else None,
            tokenizer_dir=self.path / "tokenizer",
            device=device,
            dtype=dtype,
        )


def open_run(path) -> Run:
    p = Path(path)
    if not (p / "run.json").exists():
        raise UserError(f"{p} is not a run directory (no run.json); train one with `convsim train`")
    meta = read_meta(p)
    if not (p / "adapter" / "adapter_config.json").exists():
        raise UserError(f"{p} has no trained adapter yet (was training interrupted? resume with --continue-training)")
    return Run(p, meta)

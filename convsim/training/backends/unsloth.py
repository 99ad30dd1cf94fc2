"""`convsim train --backend unsloth`: the model of `convsim train`, loaded and LoRA-wrapped by Unsloth.

`load_unsloth(cfg, speakers, device, spec)` returns `(model, tok, ids)` as `backends.peft.load_peft`
does, with the same settings:

- the base from `unsloth.FastLanguageModel.from_pretrained` on the local directory convsim resolves for
  `--model` (the embedded model's converted cache `$CONVSIM_HOME/models/gemma-3-270m`, a local path, a hub
  id from the Hugging Face cache, or a tiny test model written once under `$CONVSIM_HOME/models/`), in
  bfloat16 (what `training.model.frozen_dtype` picks on a CUDA card), 4/8-bit from `--quantization`,
  `max_seq_length` from the config;
- convsim's own tokenizer (as `models.load_base` loads it, pad = eos where there is none), not Unsloth's;
- one speaker token per person from `speakers.add_speaker_tokens` (same references, same seed);
- `FastLanguageModel.get_peft_model` with the LoRA of `build_model` (`peft_kwargs`): r, alpha (or r),
  dropout, rsLoRA, the attention (+ MLP) projections, `random_state` = seed, and the speaker rows
  trainable through PEFT's `trainable_token_indices` (Unsloth hands unknown keywords to `LoraConfig`;
  bench/unsloth_speed.py trains this way); trainable weights in float32 and the fast
  speaker-row forward (`fastpeft.patch_trainable_tokens`), as in `build_model`.

Unsloth patches transformers, peft and trl as they are imported, so it must be imported before them.
`convsim.cli.main` calls `import_first(argv)` before it loads any command: with `--backend unsloth` on
the command line (or `backend: unsloth` in the `--config` YAML) it imports unsloth then. A caller that
trains in-process (`convsim.training.recipe.run(args)`) must `import unsloth` first itself; `require_unsloth` (called
by `load_unsloth`) refuses with a `UserError` when transformers/peft/trl came first.

Run it on a CUDA machine with unsloth installed (unsloth 2026.10 pins transformers <= 5.17, trl <= 1.15):

    convsim train data/ --out runs/u --backend unsloth --batch-size 32 --max-steps 30 --json
    bash tools/gpu/unsloth_train.sh        # on the lent GPU machine, with the carried wheels

Without unsloth, or without a GPU, `--backend unsloth` ends with one `error:` line and exit status 2.
"""

from __future__ import annotations

import os
import sys

from convsim.errors import UserError

# Unsloth's patches apply to these only when it is imported before them.
PATCHED = ("transformers", "peft", "trl")
NOT_INSTALLED = "--backend unsloth needs the unsloth package on a CUDA machine (pip install unsloth)"

_state: dict = {}  # "late": modules imported before unsloth; "error": why importing it failed


def environment() -> None:
    """Offline, quiet, and Unsloth's generated code kept out of the working directory (as
    bench/unsloth_speed.py sets them). Only defaults: set any of them to override. Must run before
    unsloth (and huggingface_hub, which reads HF_HUB_OFFLINE once) is imported."""
    from convsim.modeling.models import convsim_home

    for k in (
        "HF_HUB_OFFLINE",
        "TRANSFORMERS_OFFLINE",
        "HF_DATASETS_OFFLINE",
        "UNSLOTH_DISABLE_STATISTICS",
        "UNSLOTH_OFFLINE",
        "UNSLOTH_SKIP_TORCHVISION_CHECK",
    ):
        os.environ.setdefault(k, "1")
    os.environ.setdefault("UNSLOTH_COMPILE_LOCATION", str(convsim_home() / "unsloth_compiled_cache"))


def wants_unsloth(argv) -> bool:
    """`--backend unsloth` (or `--backend=unsloth`) in `argv`, or `backend: unsloth` in its `--config` YAML."""
    argv = [str(a) for a in argv]
    for i, a in enumerate(argv):
        if a == "--backend=unsloth" or (a == "--backend" and argv[i + 1 : i + 2] == ["unsloth"]):
            return True
    for i, a in enumerate(argv):
        path = (
            a.split("=", 1)[1]
            if a.startswith("--config=")
            else (argv[i + 1] if a == "--config" and i + 1 < len(argv) else None)
        )
        if path:
            try:  # convsim's own reader: bounded, refuses FIFOs, devices and YAML bombs
                from convsim.config import load_yaml

                if load_yaml(path).get("backend") == "unsloth":
                    return True
            except Exception:  # noqa: BLE001 - a bad --config is reported by the command itself
                continue
    return False


def import_first(argv) -> bool:
    """The CLI's hook (before any command module loads): when `argv` asks for the Unsloth backend, set
    `environment()` and import unsloth now, ahead of transformers/peft/trl. Never raises: a failure is
    kept and reported as a `UserError` by `require_unsloth` once training starts. Returns whether
    unsloth is imported."""
    if not wants_unsloth(argv):
        return False
    _import()
    return "unsloth" in sys.modules


def _import():
    if "unsloth" in sys.modules:
        return sys.modules["unsloth"]
    environment()
    _state["late"] = [m for m in PATCHED if m in sys.modules]
    try:
        import unsloth
    except ImportError as e:
        _state["error"] = (
            NOT_INSTALLED
            if getattr(e, "name", None) == "unsloth"
            else f"--backend unsloth: importing unsloth failed ({_one_line(e)})"
        )
        return None
    except BaseException as e:  # noqa: BLE001 - unsloth raises NotImplementedError/SystemExit without a GPU
        if isinstance(e, KeyboardInterrupt):
            raise
        _state["error"] = f"--backend unsloth: importing unsloth failed ({_one_line(e)}); it needs a CUDA GPU"
        return None
    return unsloth


def _one_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}".strip().replace("\n", " | ")[:300]


def require_unsloth(device: str):
    """unsloth, imported before transformers/peft/trl, on a CUDA device; else a `UserError` saying which."""
    if "unsloth" not in sys.modules:
        if "error" in _state:  # the CLI's early import failed: say why
            raise UserError(_state["error"])
        late = [m for m in PATCHED if m in sys.modules]
        if late:
            try:
                import importlib.util

                installed = importlib.util.find_spec("unsloth") is not None
            except (ImportError, ValueError):
                installed = False
            if not installed:
                raise UserError(NOT_INSTALLED)
            raise UserError(
                f"--backend unsloth: unsloth must be imported before {', '.join(late)} (it patches "
                "them as they load); run `convsim train ... --backend unsloth`, whose command line "
                "imports it first, or put `import unsloth` at the top of your script"
            )
    unsloth = _import()
    if unsloth is None:
        raise UserError(_state.get("error", NOT_INSTALLED))
    if _state.get("late"):
        raise UserError(
            f"--backend unsloth: {', '.join(_state['late'])} was imported before unsloth, so its "
            "patches are missing; import unsloth first"
        )
    if not device.startswith("cuda") or getattr(unsloth, "_IS_CPU_BACKEND", False):
        raise UserError("--backend unsloth needs a CUDA GPU")
    return unsloth


# ----------------------------------------------------------------------------- settings (pure)


def peft_kwargs(cfg, spec, ids: dict, tied: bool = True, checkpointing: bool = False) -> dict:
    """Keywords for `FastLanguageModel.get_peft_model`: the LoRA `build_model` gives `peft.LoraConfig`."""
    from convsim.training.model import lora_targets, speaker_rows

    kw = dict(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha or cfg.lora_r,
        lora_dropout=cfg.lora_dropout,
        use_rslora=cfg.use_rslora,
        target_modules=lora_targets(cfg, spec),
        bias="none",
        random_state=cfg.seed,
        use_gradient_checkpointing=bool(checkpointing),
    )
    tt = speaker_rows(ids, tied)
    if tt:
        kw["trainable_token_indices"] = tt
    return kw


def load_kwargs(cfg, where: str, dtype, checkpointing: bool = False) -> dict:
    """Keywords for `FastLanguageModel.from_pretrained` on the local directory (or cached hub id) `where`."""
    return dict(
        model_name=str(where),
        max_seq_length=cfg.max_seq_length,
        dtype=dtype,
        load_in_4bit=cfg.quantization == "4bit",
        load_in_8bit=cfg.quantization == "8bit",
        full_finetuning=False,
        fix_tokenizer=False,
        use_exact_model_name=True,
        use_gradient_checkpointing=bool(checkpointing),
    )


# ----------------------------------------------------------------------------- model


def model_dir(spec) -> str:
    """Where Unsloth loads `spec` from: `models.weights_location`, or for a tiny test model (built in memory
    by `load_base`) a copy saved once under $CONVSIM_HOME/models/."""
    from convsim.modeling import models

    if spec.source != "tiny":
        return models.weights_location(spec)
    target = models.convsim_home() / "models" / spec.name
    if not (target / "config.json").is_file():
        import torch
        from convsim.fsutil import atomic_dir

        with atomic_dir(target) as tmp:
            models._tiny_model(spec, torch.float32).save_pretrained(tmp)
            models.tiny_tokenizer().save_pretrained(tmp)
    return str(target)


def convsim_tokenizer(spec, where: str):
    """The tokenizer `models.load_base` would give, with its pad-token rule."""
    from convsim.modeling import models

    if spec.source == "tiny":
        return models.with_pad_token(models.tiny_tokenizer())
    from transformers import AutoTokenizer

    return models.with_pad_token(AutoTokenizer.from_pretrained(where))


def load_unsloth(cfg, speakers, device: str, spec):
    """(model, tok, ids) for `convsim train --backend unsloth`: see the module's docstring."""
    require_unsloth(device)
    from unsloth import FastLanguageModel
    import torch
    from convsim.modeling.fastpeft import patch_trainable_tokens
    from convsim.modeling.speakers import add_speaker_tokens
    from convsim.modeling.layers import head_is_tied
    from convsim.training.model import frozen_dtype, trainable_in_float32, wants_checkpointing

    where = model_dir(spec)
    tok = convsim_tokenizer(spec, where)
    dtype = getattr(torch, frozen_dtype(cfg, device))  # bfloat16 on a CUDA card that has it
    checkpointing = bool(cfg.activation_checkpointing)
    kw = load_kwargs(cfg, where, dtype, checkpointing)
    if ":" in device:  # cuda:N (torchrun/accelerate): that card
        kw["device_map"] = {"": device}
    try:
        model, _unsloth_tok = FastLanguageModel.from_pretrained(**kw)
    except (OSError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise UserError(f"--backend unsloth: cannot load {spec.name} from {where}: {first}") from None
    ids = {}
    if cfg.special_tokens:
        ids = add_speaker_tokens(model, tok, speakers, cfg.speaker_references, spec.reference_words, seed=cfg.seed)
    tied = head_is_tied(model)
    checkpointing = wants_checkpointing(cfg, model)  # as asked, else for models of 1B parameters or more
    model = FastLanguageModel.get_peft_model(model, **peft_kwargs(cfg, spec, ids, tied, checkpointing))
    frozen = sum(1 for n, p in model.named_parameters() if "trainable_tokens_delta" in n and not p.requires_grad)
    rows = unfreeze_speaker_rows(model)
    if ids and not rows:
        raise RuntimeError("unsloth's get_peft_model made no trainable speaker rows (trainable_token_indices ignored)")
    trainable_in_float32(model)
    patch_trainable_tokens(model)
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(
        f"unsloth: {n:,} trainable parameters (LoRA + {rows} speaker-row tensor{'s' * (rows != 1)}; "
        f"{frozen} of them re-enabled after get_peft_model froze them)",
        file=sys.stderr,
        flush=True,
    )
    return model, tok, ids


def unfreeze_speaker_rows(model) -> int:
    """Unsloth's get_peft_model ends with `prepare_model_for_training`, which leaves only LoRA matrices
    trainable (unsloth_zoo/training_utils.py: requires_grad False for every other parameter), so PEFT's
    trainable-token deltas - the speaker rows - would stay frozen at their initial values. Make them
    trainable again; returns how many there are."""
    n = 0
    for name, p in model.named_parameters():
        if "trainable_tokens_delta" in name:
            p.requires_grad_(True)
            n += 1
    return n

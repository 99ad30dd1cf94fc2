"""`convsim train --backend unsloth` (issue #4) on the CPU, where Unsloth cannot run: the settings
convsim/training/backends/unsloth.py hands Unsloth are those of build_model's PEFT path, `load_unsloth` builds the
same model as build_model when a stand-in `unsloth` does what Unsloth does with them (its
`get_peft_model` passes every keyword `LoraConfig` knows to `LoraConfig`), the CLI imports unsloth before
transformers/peft/trl, and without unsloth (or a GPU) `--backend unsloth` ends with exit status 2.
The real thing runs on a GPU machine: tools/gpu/unsloth_train.sh.

    pytest tests/cli/test_unsloth_backend.py        # ~30 s on 2 CPU cores
"""

import inspect
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

from convsim.training.backends import unsloth as ub
from convsim.config import TrainConfig
from convsim.errors import UserError
from convsim.modeling.models import resolve

ROOT = Path(__file__).resolve().parents[2]


def _peft_path(cfg, speakers=("Ana", "Ben")):
    from convsim.training.backends import build_model

    return build_model(cfg, list(speakers), "cpu")


@pytest.mark.parametrize(
    "model,extra",
    [
        ("tiny-gemma3", {}),  # tied head: the speaker rows of embed_tokens only
        ("tiny-llama", {}),  # untied: lm_head's rows too
        ("tiny-llama", {"lora_alpha": 32, "lora_r": 8, "lora_dropout": 0.1, "use_rslora": False, "include_mlp": False}),
        ("tiny-gemma3", {"special_tokens": False, "seed": 3}),
    ],
)
def test_peft_kwargs_are_build_models_lora(model, extra):
    cfg = TrainConfig(model=model, **extra).validate()
    spec = resolve(model)
    peft_model, _tok, _spec, ids = _peft_path(cfg)
    want = peft_model.peft_config["default"]
    tied = spec.tiny_config["tie_word_embeddings"]
    kw = ub.peft_kwargs(cfg, spec, ids, tied=tied)
    assert kw["r"] == want.r and kw["lora_alpha"] == want.lora_alpha
    assert kw["lora_dropout"] == want.lora_dropout and kw["use_rslora"] == want.use_rslora
    assert set(kw["target_modules"]) == set(want.target_modules)
    assert kw.get("trainable_token_indices") == want.trainable_token_indices
    assert kw["random_state"] == cfg.seed and kw["use_gradient_checkpointing"] is False and kw["bias"] == "none"
    # what Unsloth does with them (vision.py/llama.py: every keyword LoraConfig takes goes to LoraConfig);
    # the rest are Unsloth's own
    from peft import LoraConfig

    allowed = inspect.signature(LoraConfig).parameters
    assert {k for k in kw if k not in allowed} == {"random_state", "use_gradient_checkpointing"}
    made = LoraConfig(**{k: v for k, v in kw.items() if k in allowed}, task_type="CAUSAL_LM")
    assert made.trainable_token_indices == want.trainable_token_indices


def test_load_kwargs():
    cfg = TrainConfig(max_seq_length=384, quantization="4bit").validate()
    kw = ub.load_kwargs(cfg, "/m", "bf16")
    assert (kw["model_name"], kw["max_seq_length"], kw["dtype"], kw["load_in_4bit"], kw["load_in_8bit"]) == (
        "/m",
        384,
        "bf16",
        True,
        False,
    )
    assert kw["fix_tokenizer"] is False and kw["full_finetuning"] is False and kw["use_exact_model_name"] is True
    kw = ub.load_kwargs(TrainConfig(quantization="8bit").validate(), "/m", None)
    assert (kw["load_in_4bit"], kw["load_in_8bit"]) == (False, True)
    kw = ub.load_kwargs(TrainConfig().validate(), "/m", None, checkpointing=True)
    assert (kw["load_in_4bit"], kw["load_in_8bit"], kw["use_gradient_checkpointing"]) == (False, False, True)


def test_wants_unsloth(tmp_path):
    assert ub.wants_unsloth(["d", "--out", "o", "--backend", "unsloth"])
    assert ub.wants_unsloth(["d", "--backend=unsloth"])
    assert not ub.wants_unsloth(["d", "--backend", "peft"]) and not ub.wants_unsloth(["d", "--backend"])
    assert not ub.wants_unsloth(["unsloth", "--out", "unsloth"])
    y = tmp_path / "t.yaml"
    y.write_text("backend: unsloth\nlora_r: 8\n")
    assert ub.wants_unsloth(["d", "--config", str(y)]) and ub.wants_unsloth(["d", f"--config={y}"])
    y.write_text("lora_r: 8\n")
    assert not ub.wants_unsloth(["d", "--config", str(y)]) and not ub.wants_unsloth(["d", "--config", "/nonexistent"])


# ----------------------------------------------------------------------------- a stand-in for unsloth


def fake_unsloth(calls: list):
    """An `unsloth` module whose FastLanguageModel loads with transformers and wraps with PEFT the way
    Unsloth 2026.10 does: from_pretrained(model_name, dtype, ...), and get_peft_model(model, **kw) ->
    LoraConfig of the keywords it knows, then everything but the LoRA matrices frozen."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    class FastLanguageModel:
        @staticmethod
        def from_pretrained(model_name, dtype=None, **kw):
            calls.append(("from_pretrained", model_name, dtype, kw))
            return (
                AutoModelForCausalLM.from_pretrained(model_name, dtype=dtype),
                AutoTokenizer.from_pretrained(model_name),
            )

        @staticmethod
        def get_peft_model(model, **kw):
            calls.append(("get_peft_model", kw))
            allowed = inspect.signature(LoraConfig).parameters
            model = get_peft_model(
                model, LoraConfig(**{k: v for k, v in kw.items() if k in allowed}, task_type="CAUSAL_LM")
            )
            # then, as Unsloth's post_patch_model -> unsloth_zoo prepare_model_for_training: only LoRA
            # matrices stay trainable (the speaker rows' trainable_tokens_delta is frozen)
            for name, p in model.named_parameters():
                p.requires_grad_(".lora_A." in name or ".lora_B." in name)
            return model

    return types.SimpleNamespace(FastLanguageModel=FastLanguageModel, _IS_CPU_BACKEND=False, __name__="unsloth")


@pytest.mark.parametrize("model", ["tiny-gemma3", "tiny-llama"])
def test_load_unsloth_builds_build_models_model(model, tmp_path, monkeypatch):
    import torch

    monkeypatch.setenv("CONVSIM_HOME", str(tmp_path / "home"))
    calls = []
    monkeypatch.setitem(sys.modules, "unsloth", fake_unsloth(calls))
    monkeypatch.setattr(ub, "_state", {})
    cfg = TrainConfig(model=model, max_seq_length=256, seed=5).validate()
    spec = resolve(model)
    # "cuda" passes the device check; on this CPU-only machine frozen_dtype gives float32
    got, tok, ids = ub.load_unsloth(cfg, ["Ana", "Ben"], "cuda", spec)
    want, want_tok, _spec, want_ids = _peft_path(cfg)
    assert ids == want_ids and len(tok) == len(want_tok) and tok.pad_token == want_tok.pad_token
    assert tok("[Ana] hi")["input_ids"] == want_tok("[Ana] hi")["input_ids"]
    (_, where, dtype, kw), (_, peft_kw) = calls
    assert where == str(tmp_path / "home" / "models" / model) and dtype == torch.float32
    assert kw["max_seq_length"] == 256 and peft_kw["random_state"] == 5
    # the same trainable tensors, starting from the same values (base weights and speaker rows included)
    g, w = dict(got.named_parameters()), dict(want.named_parameters())
    assert {n for n, p in g.items() if p.requires_grad} == {n for n, p in w.items() if p.requires_grad}
    assert all(p.dtype == torch.float32 for p in g.values() if p.requires_grad)
    for n, p in w.items():
        if "lora_B" in n or "lora_A" not in n:  # lora_A is random (seeded differently), B starts at 0
            assert torch.equal(g[n], p), n
    # the fast speaker-row forward is on (fastpeft), as in build_model
    from peft.tuners.trainable_tokens.layer import TrainableTokensLayer

    layers = [m for m in got.modules() if isinstance(m, TrainableTokensLayer)]
    assert layers and all(hasattr(m, "_convsim_original_forward") for m in layers)


def test_require_unsloth_refuses_cpu_and_late_import(monkeypatch):
    monkeypatch.setitem(sys.modules, "unsloth", fake_unsloth([]))
    monkeypatch.setattr(ub, "_state", {})
    with pytest.raises(UserError, match="CUDA"):
        ub.require_unsloth("cpu")
    monkeypatch.setattr(ub, "_state", {"late": ["transformers"]})
    with pytest.raises(UserError, match="imported before"):
        ub.require_unsloth("cuda")
    monkeypatch.delitem(sys.modules, "unsloth")
    monkeypatch.setattr(ub, "_state", {"error": "--backend unsloth: importing unsloth failed (boom)"})
    with pytest.raises(UserError, match="boom"):
        ub.require_unsloth("cuda")


# ----------------------------------------------------------------------------- through the CLI


def run_cli(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "convsim", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, **(env or {})},
    )


def test_cli_without_unsloth_exits_2(data_dir, tmp_path):
    pytest.importorskip("transformers")
    if __import__("importlib").util.find_spec("unsloth") is not None:
        pytest.skip("unsloth is installed here")
    p = run_cli(
        "train", data_dir, "--out", tmp_path / "u", "--model", "tiny-gemma3", "--backend", "unsloth", "--max-steps", 1
    )
    assert p.returncode == 2, p.stderr[-2000:]
    assert "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines()[-1] == "error: " + ub.NOT_INSTALLED
    assert not (tmp_path / "u" / "run.json").exists()


def test_cli_imports_unsloth_before_transformers(data_dir, tmp_path):
    """A stand-in `unsloth` package on PYTHONPATH records what was imported before it: nothing of
    transformers/peft/trl when the CLI is asked for --backend unsloth (on the command line or in the
    --config YAML). On this CPU machine the run then ends at the GPU check, exit 2."""
    pkg = tmp_path / "site" / "unsloth"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(
        "import json, os, sys\n"
        "with open(os.environ['FAKE_UNSLOTH_LOG'], 'a') as f:\n"
        "    f.write(json.dumps([m for m in ('transformers', 'peft', 'trl', 'torch') if m in sys.modules]) + '\\n')\n"
        "_IS_CPU_BACKEND = True\n"
    )
    log = tmp_path / "imports.jsonl"
    env = {
        "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), str(ROOT), os.environ.get("PYTHONPATH", "")]),
        "FAKE_UNSLOTH_LOG": str(log),
        "CONVSIM_HOME": str(tmp_path / "home"),
    }
    yaml = tmp_path / "u.yaml"
    yaml.write_text("backend: unsloth\n")
    for i, extra in enumerate([["--backend", "unsloth"], ["--config", yaml]]):
        p = run_cli("train", data_dir, "--out", tmp_path / f"u{i}", "--model", "tiny-gemma3", *extra, env=env)
        assert p.returncode == 2 and "needs a CUDA GPU" in p.stderr.strip().splitlines()[-1], p.stderr[-2000:]
        seen = [json.loads(line) for line in log.read_text().splitlines()]
        assert len(seen) == i + 1 and seen[-1] == [], seen
    p = run_cli(
        "train",
        data_dir,
        "--out",
        tmp_path / "peft",
        "--model",
        "tiny-gemma3",
        "--max-steps",
        1,
        "--batch-size",
        4,
        "--eval-steps",
        1000,
        "--save-steps",
        1000,
        env=env,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    assert len(log.read_text().splitlines()) == 2  # the PEFT backend never imports it


def test_late_import_is_refused_in_process(tmp_path):
    """A script that imported transformers before asking for the Unsloth backend gets a clear error."""
    pkg = tmp_path / "site" / "unsloth"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("_IS_CPU_BACKEND = False\n")
    code = (
        "import transformers\n"
        "from convsim.training.backends.unsloth import require_unsloth\n"
        "from convsim.errors import UserError\n"
        "try:\n    require_unsloth('cuda')\nexcept UserError as e:\n    print(e)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), str(ROOT)])}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "unsloth must be imported before transformers" in p.stdout

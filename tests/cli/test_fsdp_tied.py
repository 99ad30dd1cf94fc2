"""Issue #13: FSDP2 with a head tied to the input embedding (Gemma 3), through the path `accelerate launch
--config_file configs/accelerate/fsdp.yaml` takes: accelerate's own `fsdp2_prepare_model` on the model
`build_model` makes, in two processes over gloo on the CPU. (accelerate itself will not run FSDP on the CPU,
so the worker hands it a stand-in for the Accelerator with the plugin from configs/accelerate/fsdp.yaml.)

Before the fix the second `fully_shard` of the shared embedding matrix failed with a TypeError in
DeviceMesh._concatenate. Now: the model shards, trains to the same losses as one process on the same batch,
and the adapter gathered from the shards saves in the usual format and loads with PeftModel.from_pretrained
to the same logits as the single-process model.

    torchrun --nproc_per_node 2 tests/cli/test_fsdp_tied.py OUT     # the worker, as the test runs it
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
TORCHRUN = shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable), "torchrun")
SPEAKERS = ["Ana", "Ben"]
STEPS = 3


def _has_fully_shard():
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401

        return True
    except ImportError:
        return False


def _build():
    from convsim.config import TrainConfig
    from convsim.modeling.loss import install_reply_loss
    from convsim.training.backends import build_model

    torch.manual_seed(0)
    model, tok, spec, ids = build_model(TrainConfig(model="tiny-gemma3"), SPEAKERS, "cpu")
    return install_reply_loss(model), ids


def _batch(ids):
    a, b = ids["Ana"], ids["Ben"]
    x = torch.tensor([[a, 10, 11, 12, b, 13, 14, 15, a, 16, 17, b], [b, 20, 21, a, 22, 23, 24, b, 25, a, 26, 27]])
    return {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x}


def _train(model, ids):
    from convsim.modeling.loss import reply_loss

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(STEPS):
        loss = reply_loss(model, _batch(ids))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def _plugin():
    import yaml
    from accelerate.utils import FullyShardedDataParallelPlugin

    conf = yaml.safe_load((ROOT / "configs" / "accelerate" / "fsdp.yaml").read_text())["fsdp_config"]
    return FullyShardedDataParallelPlugin(
        fsdp_version=conf["fsdp_version"],
        auto_wrap_policy=conf["fsdp_auto_wrap_policy"].lower(),
        reshard_after_forward=conf["fsdp_reshard_after_forward"],
        state_dict_type=conf["fsdp_state_dict_type"],
    )


def fsdp2_cpu(model, rank: int):
    """`model` sharded the way `accelerate launch --config_file configs/accelerate/fsdp.yaml` does, on the CPU."""
    import types

    from accelerate.utils.fsdp_utils import fsdp2_prepare_model

    accelerator = types.SimpleNamespace(
        state=types.SimpleNamespace(fsdp_plugin=_plugin()),
        torch_device_mesh=None,
        mixed_precision="no",
        is_main_process=rank == 0,
        device=torch.device("cpu"),
    )
    return fsdp2_prepare_model(accelerator, model)


def worker(out: Path) -> None:
    import torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule
    from convsim.training.model import gathered_trained_state

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model, ids = _build()
    model = fsdp2_cpu(model, rank)
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert isinstance(model, FSDPModule) and isinstance(embed, FSDPModule) and isinstance(head, FSDPModule)
    losses = _train(model, ids)
    state = gathered_trained_state(model)  # every rank: a collective
    if rank == 0:
        model.save_pretrained(str(out / "adapter"), state_dict=state, save_embedding_layers=False)
        (out / "result.json").write_text(json.dumps({"losses": losses, "world_size": dist.get_world_size()}))
    dist.barrier()
    dist.destroy_process_group()


def test_show_tied_weights_changes_only_the_tie_accelerate_sees(monkeypatch):
    """Under FSDP the tied wrappers' `.weight` is the one stored Parameter (what accelerate compares); the
    logits, and the merged head matrix a fused loss kernel gets (`head_weight`), are as before."""
    from convsim.modeling.fastpeft import head_weight, show_tied_weights

    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    model, ids = _build()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "trainable_tokens_delta" in n:
                p.add_(torch.randn_like(p))
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert embed.weight is not head.weight  # PEFT: a new merged matrix on each access
    x = _batch(ids)["input_ids"]
    with torch.no_grad():
        before, w_before = model(input_ids=x).logits, head_weight(head)[0]
    assert show_tied_weights(model) == 2 and show_tied_weights(model) == 0
    assert embed.weight is head.weight is embed.token_adapter.base_layer.weight
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=x).logits, before, rtol=0, atol=0)
        torch.testing.assert_close(head_weight(head)[0], w_before, rtol=0, atol=0)
    assert not torch.equal(w_before[sorted(ids.values())], embed.weight[sorted(ids.values())])  # rows trained


@pytest.mark.skipif(not os.path.exists(TORCHRUN), reason="torchrun not installed")
@pytest.mark.skipif(not _has_fully_shard(), reason="torch without FSDP2 (fully_shard)")
def test_fsdp2_tied_head_trains_and_saves(tmp_path, monkeypatch):
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_VERBOSITY="error",
        ACCELERATE_USE_FSDP="true",
        FSDP_VERSION="2",
    )
    p = subprocess.run(
        [TORCHRUN, "--standalone", "--nproc_per_node", "2", str(Path(__file__)), str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        cwd=ROOT,
    )
    errors = [line for line in p.stderr.splitlines() if "Error" in line and "rank" in line]
    assert p.returncode == 0, "\n".join(errors[-2:]) or p.stderr[-4000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["world_size"] == 2

    # the same training in one process, without FSDP (both ranks saw this same batch: the mean gradient is its)
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    ref, ids = _build()
    assert "_getattr_wrapped" not in ref.get_input_embeddings().__dict__  # unsharded runs are untouched
    ref_losses = _train(ref, ids)
    assert result["losses"] == pytest.approx(ref_losses, rel=1e-4)
    assert result["losses"][-1] < result["losses"][0]

    # the adapter gathered from the shards: the usual format, the single-process adapter's keys and values
    from safetensors.torch import load_file

    ref.save_pretrained(str(tmp_path / "ref"), save_embedding_layers=False)
    got, want = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("adapter", "ref"))
    assert sorted(got) == sorted(want) and any("trainable_tokens_delta" in k for k in got)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-3, atol=1e-5)

    # ... and it loads with PeftModel.from_pretrained onto the base with speaker tokens, to the same logits
    from peft import PeftModel
    from convsim.modeling.models import load_base, resolve
    from convsim.modeling.speakers import add_speaker_tokens

    torch.manual_seed(0)
    base, tok = load_base("tiny-gemma3", device="cpu", dtype=torch.float32)
    add_speaker_tokens(base, tok, SPEAKERS, {}, resolve("tiny-gemma3").reference_words, seed=0)
    loaded = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    x = _batch(ids)["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=x).logits, ref.eval()(input_ids=x).logits, rtol=1e-3, atol=1e-4)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    worker(Path(sys.argv[1]))

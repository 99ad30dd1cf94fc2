"""Full-parameter bf16 training of a random-initialised Gemma-3-style decoder that is too large for one
GPU, sharded over the GPUs of one host with PyTorch FSDP2 (`torch.distributed.fsdp.fully_shard`).

    torchrun --nproc_per_node 2 bench/fsdp_big.py --out RESULT.json [--params-b auto|N] [--steps 6]
             [--seq 1024] [--batch 2] [--try-single]
    torchrun --nproc_per_node 2 bench/fsdp_big.py --out r.json --device cpu --tiny     # gloo smoke test

Memory model of "plain bf16 training" (one GPU, no sharding): bf16 weights (2 B) + bf16 gradients (2 B)
+ AdamW moments in fp32 (4 + 4 B) = 12 bytes per parameter, before activations and without an fp32
master copy (with one it would be 16-18 B/param, so 12 is the conservative figure). With
`--params-b auto` the model size is chosen from the card's memory so that 12 B/param is
`--plain-ratio` (default 1.35) times one card, while the 2-way sharded share (12/world B/param) plus
activations stays near 3/4 of a card. Activations are kept small by checkpointing every decoder layer.

The model is built on the meta device (buffers such as the RoPE frequencies stay real on the CPU: they
are tiny), every decoder layer and then the root are sharded, `to_empty(device=...)` materialises only
each rank's shard and the weights are initialised in place on the device; the full model never exists
on the CPU. The optimizer is a small AdamW that keeps fp32 moments for the bf16 parameter shards
(torch.optim.AdamW would keep its moments in the parameters' dtype, bf16).

Rank 0 writes the JSON (rewritten after each phase, so a killed run leaves its last phase and any
error in it); any exception is recorded in an "error" field and the process group is destroyed.
`--try-single` runs, after the sharded measurement, the same training step without sharding on one GPU
(rank 0) and records the out-of-memory error it is expected to hit.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import math
import os
import shlex
import signal
import statistics
import sys
import time
import traceback

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # before CUDA is touched

import torch
import torch.distributed as dist

GIB = 2**30
BYTES_PLAIN = 12  # bf16 weight 2 + bf16 grad 2 + fp32 AdamW exp_avg 4 + exp_avg_sq 4
T0 = time.perf_counter()
RANK = int(os.environ.get("RANK", "0"))
WORLD = int(os.environ.get("WORLD_SIZE", "1"))
LOCAL_RANK = int(os.environ.get("LOCAL_RANK", "0"))
RESULT: dict = {}
OUT_PATH: str | None = None


def log(msg: str) -> None:
    if RANK == 0:
        print(f"[fsdp_big {time.perf_counter() - T0:7.1f}s] {msg}", flush=True)


def write_result(**extra) -> None:
    """Rank 0 (re)writes the JSON; never raises."""
    RESULT.update(extra)
    if RANK != 0 or not OUT_PATH:
        return
    try:
        RESULT["elapsed_s"] = round(time.perf_counter() - T0, 2)
        tmp = OUT_PATH + ".tmp"
        with open(tmp, "w") as f:
            json.dump(RESULT, f, indent=2, default=str)
        os.replace(tmp, OUT_PATH)
    except Exception as e:  # noqa: BLE001 - reporting must not fail the run
        print(f"[fsdp_big] could not write {OUT_PATH}: {e}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- model shape
def shape_for(n_params: float, vocab: int) -> dict:
    """A Gemma-3-like shape with about n_params parameters: head_dim 128, half as many KV heads as query
    heads, gated MLP 4x hidden; the hidden size is the smallest of a ladder that needs <= 32 layers."""
    for h in (256, 512, 1024, 2048, 3072, 4096, 5120, 6144, 8192, 12288):
        hd = 128 if h >= 1024 else 64
        heads = h // hd
        kv = max(1, heads // 2)
        per_layer = 2 * h * h + 2 * h * kv * hd + 3 * h * 4 * h + 4 * h + 2 * hd
        layers = max(2, round((n_params - vocab * h - h) / per_layer))
        if layers <= 32:
            break
    return dict(
        hidden_size=h,
        intermediate_size=4 * h,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        head_dim=hd,
        query_pre_attn_scalar=hd,
        vocab_size=vocab,
    )


def build_config(shape: dict, sliding_window: int):
    from transformers import Gemma3TextConfig

    cfg = Gemma3TextConfig(
        **shape,
        sliding_window=sliding_window,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
        use_cache=False,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=1,
    )
    cfg._attn_implementation = "sdpa"
    return cfg


@contextlib.contextmanager
def params_on_meta():
    """Parameters are created on the meta device, buffers (RoPE inv_freq, embed_scale) stay real."""
    orig = torch.nn.Module.register_parameter

    def register(module, name, param):
        if param is not None and param.device.type != "meta":
            param = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        orig(module, name, param)

    torch.nn.Module.register_parameter = register
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = orig


def build_meta_model(cfg, checkpoint_layers: bool):
    from transformers import Gemma3ForCausalLM

    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # bf16 parameters (rope inv_freq is made fp32 explicitly)
    try:
        with params_on_meta():
            model = Gemma3ForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    model.config.use_cache = False
    if checkpoint_layers:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper

        layers = model.model.layers
        for i in range(len(layers)):
            layers[i] = checkpoint_wrapper(layers[i], checkpoint_impl=CheckpointImpl.NO_REENTRANT)
    return model


def materialise(model, device: torch.device, seed: int, std: float = 0.02) -> None:
    """to_empty on the device (only this rank's shards), then initialise in place; restore buffers."""
    buffers = {n: b.detach().to("cpu", copy=True) for n, b in model.named_buffers()}
    model.to_empty(device=device)
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            local = p.to_local() if hasattr(p, "to_local") else p
            if "norm" in name:  # Gemma RMSNorm scales by (1 + weight): zero is identity
                local.zero_()
            else:
                local.normal_(0.0, std, generator=gen)
        for name, b in buffers.items():
            model.get_buffer(name).copy_(b)


# ----------------------------------------------------------------------------- optimizer
class AdamWFp32State:
    """AdamW over (possibly sharded DTensor) bf16 parameters with fp32 moments, updated in fp32."""

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0):
        self.params = [p for p in params if p.requires_grad]
        self.lr, self.betas, self.eps, self.wd = lr, betas, eps, weight_decay
        self.state: dict = {}
        self.t = 0

    @staticmethod
    def _local(t):
        return t.to_local() if hasattr(t, "to_local") else t

    @torch.no_grad()
    def step(self):
        self.t += 1
        b1, b2 = self.betas
        bc1, bc2 = 1 - b1**self.t, 1 - b2**self.t
        for p in self.params:
            if p.grad is None:
                continue
            w, g = self._local(p), self._local(p.grad).float()
            if p not in self.state:
                self.state[p] = (torch.zeros_like(w, dtype=torch.float32), torch.zeros_like(w, dtype=torch.float32))
            m, v = self.state[p]
            m.lerp_(g, 1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            denom = (v / bc2).sqrt_().add_(self.eps)
            w32 = w.float()
            if self.wd:
                w32.mul_(1 - self.lr * self.wd)
            w32.addcdiv_(m, denom, value=-self.lr / bc1)
            w.copy_(w32)
            del g, denom, w32

    def zero_grad(self):
        for p in self.params:
            p.grad = None

    def state_bytes(self) -> int:
        return sum(m.numel() * m.element_size() + v.numel() * v.element_size() for m, v in self.state.values())


# ----------------------------------------------------------------------------- helpers
def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_gib(device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / GIB, 3) if device.type == "cuda" else None


def train_steps(model, opt, batch, steps, device, world, tag, per_step=None):
    losses, times = [], []
    for i in range(steps):
        sync(device)
        t = time.perf_counter()
        loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        l = loss.detach().float()
        if world > 1:
            dist.all_reduce(l)
            l /= world
        lv = l.item()  # also synchronises the device
        sync(device)
        dt = time.perf_counter() - t
        losses.append(round(lv, 4))
        times.append(round(dt, 4))
        log(
            f"{tag} step {i + 1}/{steps}: loss {lv:.4f}  {dt:.2f} s"
            + (f"  peak {peak_gib(device):.2f} GiB (rank {RANK})" if device.type == "cuda" else "")
        )
        if per_step:
            per_step(losses, times)
    return losses, times


def try_single(args, cfg, device, batch) -> dict:
    """Plain (unsharded) bf16 training step on one GPU; expected to run out of memory."""
    rec: dict = {"what": "same model, same batch, one GPU, no sharding (bf16 weights+grads, fp32 AdamW moments)"}
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    model = opt = loss = None
    phase = "build"
    try:
        model = build_meta_model(cfg, checkpoint_layers=not args.no_ac)
        phase = "materialise"
        materialise(model, device, seed=1234)
        rec["weights_gib"] = round(torch.cuda.memory_allocated(device) / GIB, 2)
        opt = AdamWFp32State(model.parameters(), lr=args.lr)
        phase = "forward+backward"
        loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        loss.backward()
        loss = None
        rec["weights_and_grads_gib"] = round(torch.cuda.memory_allocated(device) / GIB, 2)
        phase = "optimizer step (fp32 moments)"
        opt.step()
        sync(device)
        rec.update(oom=False, result="plain training step fitted on one GPU")
    except torch.OutOfMemoryError as e:
        rec.update(oom=True, oom_phase=phase, message=str(e).splitlines()[0][:400])
    except Exception as e:  # noqa: BLE001
        rec.update(oom=False, error=f"{type(e).__name__}: {e}"[:600], error_phase=phase)
    rec["allocated_at_end_gib"] = round(torch.cuda.memory_allocated(device) / GIB, 2)
    rec["peak_gib"] = peak_gib(device)
    del model, opt, loss
    gc.collect()
    torch.cuda.empty_cache()
    rec["allocated_after_free_gib"] = round(torch.cuda.memory_allocated(device) / GIB, 3)
    return rec


# ----------------------------------------------------------------------------- main
def main(argv=None) -> int:
    global OUT_PATH
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument(
        "--params-b", default="auto", help="model size in billions of parameters, or 'auto' (from the card)"
    )
    ap.add_argument(
        "--plain-ratio",
        type=float,
        default=1.35,
        help="auto size: plain 12 B/param requirement as a multiple of one card's memory",
    )
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=2, help="sequences per rank per step")
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--sliding-window", type=int, default=512)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    ap.add_argument("--tiny", action="store_true", help="tiny model for a CPU/gloo smoke test")
    ap.add_argument("--no-ac", action="store_true", help="no activation checkpointing")
    ap.add_argument(
        "--try-single",
        action="store_true",
        help="after the sharded run, try the plain unsharded step on rank 0's GPU (expects OOM)",
    )
    args = ap.parse_args(argv)
    OUT_PATH = args.out

    device_type = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    RESULT.update(
        engine="torch FSDP2 fully_shard",
        status="starting",
        command="torchrun --nproc_per_node %d %s" % (WORLD, shlex.join([os.path.relpath(sys.argv[0])] + sys.argv[1:])),
        world_size=WORLD,
        device=device_type,
        torch=torch.__version__,
        started=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )
    write_result()

    def on_term(signum, frame):  # no process-group teardown here: it could hang
        write_result(status="killed", error=f"received signal {signum} (timeout, or another rank failed)")
        os._exit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)

    rc = 0
    try:
        import transformers

        RESULT["transformers"] = transformers.__version__
        if device_type == "cuda":
            device = torch.device("cuda", LOCAL_RANK)
            torch.cuda.set_device(device)
        else:
            device = torch.device("cpu")
        if "MASTER_ADDR" not in os.environ:  # plain `python bench/fsdp_big.py`: a world of one
            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", WORLD_SIZE="1")
        dist.init_process_group(
            "nccl" if device_type == "cuda" else "gloo",
            timeout=datetime.timedelta(seconds=300),
            **({"device_id": device} if device_type == "cuda" else {}),
        )
        world = dist.get_world_size()
        RESULT["world_size"] = world
        if device_type == "cuda":
            RESULT["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
        log(
            f"process group up: world {world}, device {device_type}, torch {torch.__version__}, "
            f"transformers {transformers.__version__}"
        )
        run(args, device, world)
    except BaseException as e:  # noqa: BLE001 - record everything, including KeyboardInterrupt and SystemExit
        tb = traceback.format_exc()
        print(f"[fsdp_big rank {RANK}] FAILED: {type(e).__name__}: {e}\n{tb}", file=sys.stderr, flush=True)
        write_result(status="error", error=f"{type(e).__name__}: {e}"[:2000], traceback=tb[-4000:])
        rc = 1
    finally:
        dist_cleanup()
    return rc


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dist_cleanup():
    try:
        if dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001
        pass


def run(args, device, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    # ---- size
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        card_bytes = props.total_memory
        RESULT.update(card=props.name, card_gib=round(card_bytes / GIB, 2))
    else:
        card_bytes = None
        RESULT.update(card="cpu", card_gib=None)
    if args.tiny:
        shape = dict(
            hidden_size=128,
            intermediate_size=512,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            query_pre_attn_scalar=32,
            vocab_size=1024,
        )
        seq = min(args.seq, 64)
        sliding = min(args.sliding_window, 32)
    else:
        if args.params_b == "auto":
            if card_bytes is None:
                raise SystemExit("--params-b auto needs a GPU; use --tiny or --params-b N on the CPU")
            target = args.plain_ratio * card_bytes / BYTES_PLAIN
        else:
            target = float(args.params_b) * 1e9
        shape = shape_for(target, args.vocab)
        seq, sliding = args.seq, args.sliding_window
    cfg = build_config(shape, sliding)

    t = time.perf_counter()
    model = build_meta_model(cfg, checkpoint_layers=not args.no_ac)
    n_params = sum(p.numel() for p in model.parameters())
    per_layer = sum(p.numel() for p in model.model.layers[0].parameters())
    need = n_params * BYTES_PLAIN
    RESULT.update(
        params=n_params,
        params_b=round(n_params / 1e9, 3),
        params_per_layer=per_layer,
        bytes_per_param_plain=BYTES_PLAIN,
        bytes_per_param_plain_breakdown="bf16 weight 2 + bf16 grad 2 + fp32 AdamW exp_avg 4 + exp_avg_sq 4 (no fp32 master copy)",
        single_gpu_need_gib=round(need / GIB, 2),
        sharded_state_gib_per_gpu=round(need / world / GIB, 2),
        single_gpu_need_over_card=round(need / card_bytes, 3) if card_bytes else None,
        sharded_state_over_card=round(need / world / card_bytes, 3) if card_bytes else None,
        seq=seq,
        batch_per_rank=args.batch,
        steps=args.steps,
        activation_checkpointing=not args.no_ac,
        config={
            k: getattr(cfg, k)
            for k in (
                "hidden_size",
                "intermediate_size",
                "num_hidden_layers",
                "num_attention_heads",
                "num_key_value_heads",
                "head_dim",
                "vocab_size",
                "sliding_window",
                "tie_word_embeddings",
                "hidden_activation",
            )
        },
        model="transformers Gemma3ForCausalLM (Gemma3TextConfig), random init",
        status="built",
    )
    log(
        f"meta model: {n_params / 1e9:.3f} B params ({cfg.num_hidden_layers} layers x {per_layer / 1e6:.0f} M, "
        f"hidden {cfg.hidden_size}); plain need {need / GIB:.1f} GiB"
        + (f" = {need / card_bytes:.2f} x card ({card_bytes / GIB:.1f} GiB)" if card_bytes else "")
        + f"; sharded state {need / world / GIB:.1f} GiB/rank; built in {time.perf_counter() - t:.1f} s"
    )
    write_result()

    # ---- shard
    t = time.perf_counter()
    mesh = init_device_mesh(device.type, (world,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=True)
    fully_shard(model, mesh=mesh, reshard_after_forward=True)
    log(f"sharded ({len(model.model.layers)} layers + root) in {time.perf_counter() - t:.1f} s")

    # ---- materialise + init on the device
    t = time.perf_counter()
    materialise(model, device, seed=1234 + RANK)
    sync(device)
    t_init = time.perf_counter() - t
    shard_gib = torch.cuda.memory_allocated(device) / GIB if device.type == "cuda" else None
    log(
        f"materialised + initialised on {device} in {t_init:.1f} s"
        + (f"; {shard_gib:.2f} GiB of parameter shards on rank {RANK}" if shard_gib is not None else "")
    )
    RESULT.update(
        init_s=round(t_init, 2), param_shard_gib_rank0=round(shard_gib, 3) if shard_gib else None, status="materialised"
    )
    write_result()

    opt = AdamWFp32State(model.parameters(), lr=args.lr)
    gen = torch.Generator(device="cpu")
    gen.manual_seed(100 + RANK)  # a fixed batch per rank: the loss must fall
    batch = torch.randint(3, cfg.vocab_size, (args.batch, seq), generator=gen).to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def progress(losses, times):
        RESULT.update(losses=losses, step_s=times, status=f"training ({len(losses)}/{args.steps} steps)")
        write_result()

    model.train()
    losses, times = train_steps(model, opt, batch, args.steps, device, world, "fsdp", progress)

    # ---- measurements
    tokens_global = world * args.batch * seq
    timed = times[1:] if len(times) > 1 else times  # the first step includes NCCL/kernel warm-up
    step_med = statistics.median(timed)
    mine = {
        "rank": RANK,
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "peak_gib": peak_gib(device),
        "reserved_peak_gib": round(torch.cuda.max_memory_reserved(device) / GIB, 3) if device.type == "cuda" else None,
        "opt_state_gib": round(opt.state_bytes() / GIB, 3),
    }
    per_rank = [None] * world
    if world > 1:
        dist.all_gather_object(per_rank, mine)
    else:
        per_rank = [mine]
    peaks = [r["peak_gib"] for r in per_rank]
    card_gib = RESULT.get("card_gib")
    RESULT.update(
        status="done",
        losses=losses,
        step_s=times,
        first_step_s=times[0],
        step_s_median=round(step_med, 4),
        tokens_per_step=tokens_global,
        tokens_per_s=round(tokens_global / step_med, 1),
        tokens_per_s_per_gpu=round(tokens_global / step_med / world, 1),
        model_tflops_per_gpu=round(6 * n_params * tokens_global / world / step_med / 1e12, 1),
        peak_gib_per_gpu=peaks,
        per_rank=per_rank,
        peak_over_card=round(max(peaks) / card_gib, 3) if card_gib and all(p is not None for p in peaks) else None,
        loss_finite=all(math.isfinite(x) for x in losses),
        loss_fell=len(losses) > 1 and losses[-1] < losses[0],
    )
    write_result()
    log(
        f"done: median step {step_med:.2f} s, {tokens_global / step_med:.0f} tokens/s over {world} ranks, "
        f"peak per GPU {peaks} GiB, losses {losses}"
    )

    # ---- optional: the same step without sharding on one GPU (after the main result is safe on disk)
    if args.try_single:
        if device.type != "cuda":
            RESULT["single_gpu_try"] = {"skipped": "needs a GPU"}
        else:
            del model, opt, batch
            gc.collect()
            torch.cuda.empty_cache()
            left = round(torch.cuda.memory_allocated(device) / GIB, 3)
            if world > 1:
                dist.barrier()
            if RANK == 0:
                log(f"single-GPU try: {left} GiB still allocated after freeing the sharded model")
                t = time.perf_counter()
                b = torch.randint(3, cfg.vocab_size, (args.batch, seq), generator=gen).to(device)
                rec = try_single(args, cfg, device, b)
                rec["seconds"] = round(time.perf_counter() - t, 1)
                rec["allocated_before_gib"] = left
                RESULT["single_gpu_try"] = rec
                log(f"single-GPU try: {rec}")
                write_result()
            if world > 1:
                dist.barrier()
    write_result()


if __name__ == "__main__":
    sys.exit(main())

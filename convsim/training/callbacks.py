"""Trainer callbacks of `convsim train`: the time budget, metrics.jsonl, validation samples, the optional
profiler (CONVSIM_PROFILE=DIR) and --keep-best.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from convsim.training.checkpoints import best_record, from_rank0, save_best
from convsim.training.model import eager, sharded_training


def make_callbacks(cfg, run_dir: Path, tok, fmt, val_examples):
    from transformers import TrainerCallback

    class Budget(TrainerCallback):
        """Stop cleanly (and save) once the time budget is spent."""

        def __init__(self, minutes):
            self.limit = minutes * 60 if minutes else None
            self.start = None

        def on_train_begin(self, args, state, control, **kw):
            self.start = time.time()

        def on_step_end(self, args, state, control, **kw):
            if self.limit and time.time() - self.start > self.limit:
                control.should_training_stop = True
                control.should_save = True
                state.stop_reason = "time budget"

    class Metrics(TrainerCallback):
        """Append every log line to metrics.jsonl (loss curves come from here)."""

        def on_log(self, args, state, control, logs=None, **kw):
            if not logs or not state.is_world_process_zero:
                return
            row = {"step": state.global_step, "epoch": state.epoch, "time": time.time(), **logs}
            with open(run_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")

    class Samples(TrainerCallback):
        """At each evaluation, sample replies for a few validation contexts into samples.jsonl."""

        def on_evaluate(self, args, state, control, model=None, **kw):
            if not cfg.samples or not val_examples or not state.is_world_process_zero or sharded_training():
                return  # under FSDP a forward on rank 0 alone would wait forever for the other shards
            from convsim.inference import fastgen
            from convsim.inference.generate import SampleConfig, reply

            was_training = model.training
            model.eval()
            rows = []
            for e in val_examples[: cfg.samples]:
                with fastgen.disabled(), eager():  # weights and shapes change: no compiled graphs here
                    got = reply(
                        model,
                        tok,
                        fmt,
                        e.context,
                        e.speaker,
                        SampleConfig(temperature=0.7, max_new_tokens=48, seed=cfg.seed),
                    )[0]
                rows.append(
                    {
                        "step": state.global_step,
                        "speaker": e.speaker,
                        "context": [f"[{m.speaker}] {m.text}" for m in e.context[-3:]],
                        "real": [m.text for m in e.reply],
                        "sampled": got,
                    }
                )
            with open(run_dir / "samples.jsonl", "a", encoding="utf-8") as f:
                for r in rows:
                    f.write(json.dumps(r, ensure_ascii=False) + "\n")
            if was_training:
                model.train()

    class Profile(TrainerCallback):
        """CONVSIM_PROFILE=DIR: torch.profiler over steps 11-15 (after compile and warm-up); writes the
        busiest operators by device and by host time to DIR/profile.txt and a trace to DIR/trace.json."""

        def __init__(self, where, first=10, count=5):
            self.where, self.first, self.count, self.prof = Path(where), first, count, None

        def on_step_begin(self, args, state, control, **kw):
            import torch

            if state.global_step == self.first and self.prof is None and state.is_world_process_zero:
                acts = [torch.profiler.ProfilerActivity.CPU] + (
                    [torch.profiler.ProfilerActivity.CUDA] if torch.cuda.is_available() else []
                )
                self.prof = torch.profiler.profile(activities=acts)
                self.prof.__enter__()
                self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            import torch

            if self.prof is None or state.global_step != self.first + self.count:
                return
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            wall = (time.perf_counter() - self.t0) / self.count
            self.prof.__exit__(None, None, None)
            self.where.mkdir(parents=True, exist_ok=True)
            ka = self.prof.key_averages()
            dev = "self_device_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
            text = (
                f"steps {self.first + 1}-{self.first + self.count}: {1000 * wall:.1f} ms per step (wall)\n\n"
                f"by {dev}\n{ka.table(sort_by=dev, row_limit=40)}\n\n"
                f"by cpu_time_total\n{ka.table(sort_by='cpu_time_total', row_limit=40)}\n"
            )
            (self.where / "profile.txt").write_text(text, encoding="utf-8")
            self.prof.export_chrome_trace(str(self.where / "trace.json"))
            self.prof = None

        def on_train_end(self, args, state, control, **kw):
            if state.is_world_process_zero and not (self.where / "profile.txt").exists():
                print(
                    f"warning: CONVSIM_PROFILE wrote nothing: training ended at step {state.global_step}, before "
                    f"the profiled steps {self.first + 1}-{self.first + self.count}",
                    file=sys.stderr,
                )

    class KeepBest(TrainerCallback):
        """--keep-best: after each evaluation with a lower validation loss than any before, the trained
        tensors (LoRA and speaker rows, a few MB) are written to RUN_DIR/best/ whole or not at all.

        Under torchrun/accelerate rank 0 decides and every process follows it (under FSDP keeping the
        weights gathers their shards, a step every process takes); rank 0 writes."""

        best = None  # {"step", "eval_loss"} kept so far, the same on every process

        def on_train_begin(self, args, state, control, **kw):
            self.best = from_rank0(best_record(run_dir) if state.is_world_process_zero else None)

        def on_evaluate(self, args, state, control, metrics=None, model=None, **kw):
            loss = (metrics or {}).get("eval_loss")
            better = loss is not None and (self.best is None or loss < self.best["eval_loss"])
            loss = from_rank0(loss if better else None)
            if loss is not None:
                save_best(run_dir, model, state.global_step, loss)
                self.best = {"step": state.global_step, "eval_loss": loss}

    profile = [Profile(os.environ["CONVSIM_PROFILE"])] if os.environ.get("CONVSIM_PROFILE") else []
    keep = [KeepBest()] if cfg.keep_best else []
    return [Budget(cfg.time_budget), Metrics(), Samples(), *keep, *profile]

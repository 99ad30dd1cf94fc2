"""Trainer callbacks of `convsim train`: progress (one labelled bar per phase, readable log lines), the time
budget, metrics.jsonl, validation samples, the optional profiler (CONVSIM_PROFILE=DIR) and --keep-best.
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

    class Progress(TrainerCallback):
        """A `training` bar whose time left comes from the steps done so far (and is never more than what is
        left of a time budget), a `validation` bar for each evaluation, and one readable line per log,
        evaluation and checkpoint, all on stderr (stdout stays for the result and --json). Replaces the
        trainer's own bar, which prints raw log dicts."""

        def __init__(self, minutes):
            self.limit = minutes * 60 if minutes else None
            self.bar = self.eval_bar = None

        def on_train_begin(self, args, state, control, **kw):
            from tqdm.auto import tqdm

            if not state.is_world_process_zero:
                return
            self.start, self.first = time.time(), state.global_step
            self.bar = tqdm(
                total=state.max_steps,
                initial=state.global_step,
                desc="training",
                unit="step",
                dynamic_ncols=True,
                file=sys.stderr,
                bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} steps [{elapsed}{postfix}]",
            )
            self.bar.set_postfix_str("time left: known after the first step", refresh=True)

        def time_left(self, state) -> float | None:
            done = state.global_step - self.first
            if done <= 0:
                return None
            spent = time.time() - self.start
            left = spent / done * max(0, state.max_steps - state.global_step)
            return min(left, max(0.0, self.limit - spent)) if self.limit else left

        def say(self, line: str) -> None:
            (self.bar.write if self.bar is not None else print)(line, file=sys.stderr)

        def on_step_end(self, args, state, control, **kw):
            if self.bar is None:
                return
            self.bar.update(state.global_step - self.bar.n)
            left = self.time_left(state)
            if left is not None:
                self.bar.set_postfix_str(f"about {clock(left)} left", refresh=True)

        def on_log(self, args, state, control, logs=None, **kw):
            if self.bar is None or not logs or "loss" not in logs:
                return
            parts = [f"loss {logs['loss']:.3f}"]
            if "learning_rate" in logs:
                parts.append(f"learning rate {logs['learning_rate']:.1e}")
            if "tokens_per_s" in logs:
                parts.append(f"{logs['tokens_per_s']:.0f} tokens/s")
            self.say(f"step {state.global_step}/{state.max_steps}: " + ", ".join(parts))

        def on_prediction_step(self, args, state, control, eval_dataloader=None, **kw):
            from tqdm.auto import tqdm

            if not state.is_world_process_zero:
                return
            if self.eval_bar is None:
                total = len(eval_dataloader) if hasattr(eval_dataloader, "__len__") else None
                self.eval_t0 = time.time()
                self.eval_bar = tqdm(
                    total=total, desc=f"validation at step {state.global_step}", unit="batch", leave=False,
                    dynamic_ncols=True, file=sys.stderr,
                )  # fmt: skip
            self.eval_bar.update(1)

        def on_evaluate(self, args, state, control, metrics=None, **kw):
            if not state.is_world_process_zero:
                return
            if self.eval_bar is not None:
                self.eval_bar.close()
                self.eval_bar = None
                took = f" ({time.time() - self.eval_t0:.0f} s)"
            else:
                took = ""
            loss = (metrics or {}).get("eval_loss")
            if loss is not None:
                self.say(f"step {state.global_step}: validation loss {loss:.3f}{took}")

        def on_save(self, args, state, control, **kw):
            if state.is_world_process_zero:
                self.say(f"step {state.global_step}: checkpoint saved")

        def on_train_end(self, args, state, control, **kw):
            if self.bar is not None:
                self.bar.close()
                self.bar = None

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

            print(f"step {state.global_step}: sampling {min(cfg.samples, len(val_examples))} validation replies into "
                  "samples.jsonl", file=sys.stderr, flush=True)  # fmt: skip
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
    return [Progress(cfg.time_budget), Budget(cfg.time_budget), Metrics(), Samples(), *keep, *profile]


def clock(seconds: float) -> str:
    """A duration as a person reads it: 45 s, 3 min 20 s, 1 h 05 min."""
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"

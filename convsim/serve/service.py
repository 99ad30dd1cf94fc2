"""What the server serves: one base model in memory with the LoRA adapter of every run side by side (PEFT
multi-adapter), the steering vectors, and the one worker thread that owns them and decodes whatever
requests are waiting as one batch.

    svc = Service.from_runs(["runs/a", "runs/b"], steer_args=["happy.safetensors:4"])
    job = svc.job_for({"model": "convsim/a/Ana", "messages": [...], "steer": {"happy": 2}})
    svc.submit(job); event = job.wait()          # ("done", bursts, finish, usage) or ("error", message)

Batching: the worker takes every job waiting in the bounded queue, groups them by run (one adapter and one
tokenizer per batch) and by steering (hooks act on the whole batch), and decodes each group with
`batch.generate_rows`, each row stopping at its own next-speaker token. A request that finds the queue
full is answered 429 with Retry-After, never dropped silently. Attribution queries run on the same worker,
since they use the same model. A request's `Job` and the history fitting live in jobs.py.

Longer than most modules: `Service` is the one owner of the model and its worker thread, and resolving model
ids, grouping requests into batches, decoding them and describing the server (/v1/info) all read that state.
"""

from __future__ import annotations

import contextlib
import math
import queue
import threading
import time
import traceback

from convsim.errors import UserError
from convsim.serve.jobs import Job, fit_history
from convsim.serve.loading import RunEntry, Vector, load_runs, load_vectors
from convsim.serve.schemas import (
    MODEL_PREFIX,
    ApiError,
    AttributionRequest,
    ChatRequest,
    Limits,
    parse_history,
    validate,
)


# ----------------------------------------------------------------------------- the service


class Service:
    """The loaded model, its runs and vectors, one worker thread and its bounded queue."""

    def __init__(
        self,
        model,
        entries: list[RunEntry],
        vectors: dict[str, Vector] | None = None,
        api_key: str | None = None,
        limits: Limits = Limits(),
    ):
        from convsim.steering.apply import steer

        self.model, self.entries, self.vectors = model, entries, vectors or {}
        self.api_key = api_key or None
        self.limits = limits
        self.steer_fn = steer  # the context manager that applies one vector
        self.queue: queue.Queue = queue.Queue(maxsize=limits.queue_size)
        self.model_lock = threading.Lock()  # held while the model is in use; tests hold it to fill the queue
        self.seconds_per_batch = 1.0  # moving average (a guess until the first batch), for Retry-After
        self.started = time.time()
        self.served = 0  # requests answered
        self.batches = 0
        self.busy = False
        self._ids = self._model_ids()
        self._stopping = threading.Event()
        self._worker = threading.Thread(target=self._work, name="convsim-generate", daemon=True)
        self._worker.start()

    @classmethod
    def from_runs(
        cls, run_dirs, steer_args=(), device: str | None = None, dtype=None, copy_guard: bool = True, **kw
    ) -> "Service":
        model, entries = load_runs(list(run_dirs), device, dtype, copy_guard)
        return cls(model, entries, load_vectors(steer_args, entries, model), **kw)

    @classmethod
    def from_run(cls, run_dir, steer_arg: str | None = None, **kw) -> "Service":
        return cls.from_runs([run_dir], [steer_arg] if steer_arg else [], **kw)

    # ---- model ids

    def _model_ids(self) -> dict[str, tuple[RunEntry, str, bool]]:
        """id → (run, speaker, listed). `convsim/<run>/<Name>` always; `convsim/<Name>` when only one
        served run has that person. With one run only the short ids are listed."""
        ids: dict[str, tuple[RunEntry, str, bool]] = {}
        count: dict[str, int] = {}
        for e in self.entries:
            for s in e.speakers:
                count[s] = count.get(s, 0) + 1
        one = len(self.entries) == 1
        for e in self.entries:
            for s in e.speakers:
                ids[f"{MODEL_PREFIX}{e.name}/{s}"] = (e, s, not one)
        for e in self.entries:
            for s in e.speakers:
                if count[s] == 1:
                    ids[f"{MODEL_PREFIX}{s}"] = (e, s, True)
        return ids

    def model_ids(self) -> list[str]:
        return [i for i, (_, _, listed) in self._ids.items() if listed]

    def resolve(self, model) -> tuple[str, RunEntry, str]:
        """(canonical id, run, speaker) for a request's `model`; 404 for one this server does not serve."""
        if not isinstance(model, str) or not model:
            raise ApiError(
                400, "model is required: one of " + ", ".join(self.model_ids()), "invalid_value", param="model"
            )
        mid = model if model.startswith(MODEL_PREFIX) else MODEL_PREFIX + model
        if mid not in self._ids:
            raise ApiError(
                404,
                f"the model {model!r} does not exist; this server serves " + ", ".join(self.model_ids()),
                "model_not_found",
                param="model",
            )
        e, s, _ = self._ids[mid]
        return mid, e, s

    # ---- requests → jobs

    def _steering_of(self, req: ChatRequest) -> tuple:
        lim = self.limits
        if req.steer is None and req.steer_strength is None:
            return tuple(sorted((v.name, v.default) for v in self.vectors.values() if v.default))
        if not self.vectors:
            if req.steer or req.steer_strength:
                raise ApiError(
                    400,
                    "this server has no steering vectors (start it with --steer VECTOR)",
                    "steering_unavailable",
                    param="steer" if req.steer else "steer_strength",
                )
            return ()
        if req.steer is not None and req.steer_strength is not None:
            raise ApiError(400, "give steer or steer_strength, not both", "invalid_value", param="steer_strength")
        if req.steer_strength is not None:
            if len(self.vectors) != 1:
                raise ApiError(
                    400,
                    "steer_strength needs a server with exactly one vector; use "
                    "steer: {name: strength} with " + ", ".join(self.vectors),
                    "invalid_value",
                    param="steer_strength",
                )
            want = {next(iter(self.vectors)): req.steer_strength}
        else:
            want = req.steer
        out = []
        for name, s in want.items():
            if name not in self.vectors:
                raise ApiError(
                    400,
                    f"unknown steering vector {name!r}; this server has " + ", ".join(self.vectors),
                    "invalid_value",
                    param=f"steer.{name}",
                )
            if not (math.isfinite(s) and -lim.max_steer <= s <= lim.max_steer):
                raise ApiError(
                    400,
                    f"the strength of {name!r} must be a number from {-lim.max_steer:g} to {lim.max_steer:g}",
                    "invalid_value",
                    param=f"steer.{name}" if req.steer is not None else "steer_strength",
                )
            if s:
                out.append((name, float(s)))
        return tuple(sorted(out))

    def job_for(self, body) -> Job:
        from convsim.inference.generate import SampleConfig

        req = validate(ChatRequest, body)
        mid, entry, speaker = self.resolve(req.model)
        history = parse_history(
            req.messages, speaker, entry.names, entry.run.other_speaker(speaker), self.limits.max_messages
        )
        lim = self.limits
        if req.n is not None and req.n > (1 if req.stream else lim.max_n):
            raise ApiError(
                400,
                f"n must be from 1 to {1 if req.stream else lim.max_n}" + (" when streaming" if req.stream else ""),
                "invalid_value",
                param="n",
            )
        max_tokens = req.max_completion_tokens or req.max_tokens or lim.max_new_tokens
        cfg = SampleConfig(
            temperature=0.7 if req.temperature is None else float(req.temperature),
            top_p=0.95 if req.top_p is None else (float(req.top_p) or 1.0),
            max_new_tokens=min(max_tokens, lim.max_new_tokens),
            max_context_tokens=lim.max_context_tokens,
            seed=req.seed,
        )
        opts = req.stream_options or {}
        return Job(
            entry,
            speaker,
            history,
            cfg,
            n=req.n or 1,
            stream=req.stream,
            steer=self._steering_of(req),
            include_usage=bool(opts.get("include_usage")),
            model_id=mid,
        )

    def attribution_job(self, body) -> Job:
        req = validate(AttributionRequest, body)
        mid, entry, speaker = self.resolve(req.model)
        if req.speaker is not None and req.speaker not in entry.speakers:
            raise ApiError(
                400,
                f"unknown speaker {req.speaker!r}; this run knows {', '.join(entry.speakers)}",
                "invalid_value",
                param="speaker",
            )
        texts = [req.reply] if isinstance(req.reply, str) else list(req.reply)
        if not any(t.strip() for t in texts):
            raise ApiError(400, "reply is empty", "invalid_value", param="reply")

        def fn():
            return {
                "object": "attribution",
                "model": mid,
                "speaker": speaker,
                "data": self._attributor(entry).query(texts, speaker, k=req.k, speaker=req.speaker),
            }

        return Job(entry, speaker, model_id=mid, fn=fn)

    def _attributor(self, entry: RunEntry):
        if entry.attributor is None:
            from convsim.tda.query import Attributor

            try:
                entry.attributor = Attributor(entry.run, model=self.model, tok=entry.tok)
            except UserError as e:
                raise ApiError(404, f"no attribution for run {entry.name}: {e}", "attribution_unavailable") from None
        return entry.attributor

    # ---- the queue

    def alive(self) -> bool:
        return self._worker.is_alive() and not self._stopping.is_set()

    def submit(self, job: Job) -> None:
        if not self.alive():
            raise ApiError(503, "the server is shutting down", "unavailable", "server_error")
        try:
            self.queue.put_nowait(job)
        except queue.Full:
            rounds = 1 + self.queue.qsize() // max(1, self.limits.max_batch)
            wait = max(1, math.ceil(self.seconds_per_batch * rounds))
            raise ApiError(
                429,
                f"the server is busy ({self.limits.queue_size} requests waiting); retry in {wait} s",
                "rate_limit_exceeded",
                type_="rate_limit_error",
                headers={"Retry-After": str(wait)},
            ) from None

    def close(self) -> None:
        """Stop the worker after the batch in hand; jobs still queued are answered 503."""
        self._stopping.set()
        with contextlib.suppress(queue.Full):
            self.queue.put_nowait(None)  # wake the worker now
        self._worker.join(timeout=60)

    def _take(self) -> list[Job]:
        try:
            first = self.queue.get(timeout=0.5)
        except queue.Empty:
            return []
        jobs = [first]
        while True:
            try:
                jobs.append(self.queue.get_nowait())
            except queue.Empty:
                break
        return [j for j in jobs if j is not None and not j.cancelled]

    def _work(self):
        while not self._stopping.is_set():
            jobs = self._take()
            if not jobs:
                continue
            self.busy = True
            try:
                with self.model_lock:
                    for group in self._groups(jobs):
                        self._run(group)
            finally:
                self.busy = False
        while True:  # shutting down: nobody is left waiting forever
            try:
                job = self.queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.emit(("error", "the server is shutting down"))

    def _groups(self, jobs: list[Job]) -> list[list[Job]]:
        """Calls alone; generation jobs by (run, steering), in order of arrival, at most max_batch rows."""
        groups: dict = {}
        out = []
        for j in jobs:
            if j.fn is not None:
                out.append([j])
                continue
            key = (j.entry.adapter, j.steer)
            if key not in groups or sum(x.n for x in groups[key]) + j.n > self.limits.max_batch:
                groups[key] = []
                out.append(groups[key])
            groups[key].append(j)
        return out

    def _run(self, group: list[Job]):
        t0 = time.time()
        self.batches += 1
        for j in group:
            j.batch = (self.batches, sum(x.n for x in group))
        try:
            self.model.set_adapter(group[0].entry.adapter)
            if group[0].fn is not None:
                answers = [(group[0], ("result", group[0].fn()))]
            else:
                with self._steering(group[0].steer):
                    answers = self._generate(group)
        except Exception as e:  # answered to each client and logged; the worker keeps going
            if isinstance(e, ApiError):
                event = ("api_error", e)
            else:
                if not isinstance(e, UserError):
                    traceback.print_exc()
                event = ("error", f"generation failed: {e if isinstance(e, UserError) else type(e).__name__}")
            answers = [(j, event) for j in group]
        took = time.time() - t0
        self.seconds_per_batch = took if self.batches == 1 else 0.7 * self.seconds_per_batch + 0.3 * took
        self.served += len(group)
        for j, event in answers:  # last: once answered, a client may look at the model and the counters
            j.emit(event)

    def _steering(self, steer: tuple):
        stack = contextlib.ExitStack()
        for name, strength in steer:
            stack.enter_context(self.steer_fn(self.model, self.vectors[name].vector, strength))
        return stack

    def _generate(self, group: list[Job]) -> list[tuple[Job, tuple]]:
        """Decode the group's rows as one batch (deltas stream as they come); each job's final event."""
        from convsim.inference.bursts import Burst
        from convsim.inference.generate import prompt_ids
        from convsim.serve.batch import Row, generate_rows

        entry = group[0].entry
        tok, fmt = entry.tok, entry.fmt
        rows, owners, prompts = [], [], {}
        for j in group:
            cfg = j.cfg
            history = fit_history(tok, fmt, j.history, j.speaker, cfg.max_context_tokens)
            ids = prompt_ids(tok, fmt, history, j.speaker, cfg.max_context_tokens)
            prompts[id(j)] = len(ids)
            burst = Burst(tok, fmt, j.speaker)
            for k in range(j.n):
                on_delta = self._streamer(j) if j.stream else None
                rows.append(
                    Row(
                        ids,
                        burst,
                        temperature=cfg.temperature,
                        top_p=cfg.top_p,
                        max_new_tokens=cfg.max_new_tokens,
                        min_new_tokens=cfg.min_new_tokens,
                        seed=None if cfg.seed is None else cfg.seed + k,
                        on_delta=on_delta,
                        cancelled=(lambda j=j: j.cancelled),
                    )
                )
                owners.append(j)
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        generate_rows(self.model, tok, rows, pad, vocab=len(tok), guard=entry.guard)
        answers = []
        for j in group:
            mine = [r for r, o in zip(rows, owners) if o is j]
            bursts = [j._streamed] if j.stream else [r.messages() for r in mine]
            done = [len(r.ids) for r in mine]
            p = prompts[id(j)]
            usage = {"prompt_tokens": p, "completion_tokens": sum(done), "total_tokens": p + sum(done)}
            finish = ["stop" if r.ended() else "length" for r in mine]
            j.stopped_by = [r.stop for r in mine]
            answers.append((j, ("done", bursts, finish, usage)))
        return answers

    @staticmethod
    def _streamer(job: Job):
        job._streamed = []

        def on_delta(i: int, delta: str):
            msgs = job._streamed
            sep = "\n" if i >= len(msgs) and msgs else ""  # a new message of the burst
            while len(msgs) <= i:
                msgs.append("")
            msgs[i] += delta
            if not job.cancelled:
                job.emit(("delta", sep + delta))

        return on_delta

    # ---- what the page and /v1/info show

    def memory(self) -> dict:
        """Bytes of the base model's weights and of each run's adapter (LoRA + speaker-token rows)."""
        per = {e.adapter: 0 for e in self.entries}
        total = 0
        for name, p in self.model.named_parameters():
            n = p.numel() * p.element_size()
            total += n
            parts = name.split(".")
            hit = next((a for a in per if a in parts), None)
            if hit is not None:
                per[hit] += n
        base = total - sum(per.values())
        return {
            "base_bytes": base,
            "adapter_bytes": {e.name: per[e.adapter] for e in self.entries},
            "total_bytes": total,
        }

    def info(self) -> dict:
        runs = []
        for e in self.entries:
            runs.append(
                {
                    "name": e.name,
                    "base_model": e.run.model_name,
                    "adapter_hash": e.run.adapter_hash,
                    "speakers": e.speakers,
                    "attribution": self._has_index(e),
                    "models": {s: self.short_or_long(e, s) for s in e.speakers},
                }
            )
        vectors = [
            {
                "name": v.name,
                "default": v.default,
                "min": -v.slider(),
                "max": v.slider(),
                "layers": v.vector.layers,
                "method": v.vector.method,
            }
            for v in self.vectors.values()
        ]
        lim = self.limits
        return {
            "base_model": self.entries[0].run.model_name,
            "runs": runs,
            "models": self.model_ids(),
            "vectors": vectors,
            "memory": self.memory(),
            "limits": {
                "max_new_tokens": lim.max_new_tokens,
                "max_context_tokens": lim.max_context_tokens,
                "max_body_bytes": lim.max_body_bytes,
                "queue_size": lim.queue_size,
                "max_batch": lim.max_batch,
                "max_n": lim.max_n,
                "max_steer": lim.max_steer,
            },
        }

    def short_or_long(self, e: RunEntry, speaker: str) -> str:
        short = MODEL_PREFIX + speaker
        return short if self._ids.get(short, (None,))[0] is e else f"{MODEL_PREFIX}{e.name}/{speaker}"

    @staticmethod
    def _has_index(e: RunEntry) -> bool:
        from convsim.tda.index import index_dir

        d = index_dir(e.run, "activations")
        return d.is_dir() and any(d.iterdir())

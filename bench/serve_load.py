"""Serving under load, old against new in one go: the `http.server` server of an older commit (one request
at a time) and today's FastAPI server (dynamic batching), each started as `convsim serve RUN` in its own
process on the same machine, then hit by 1, 8 and 32 concurrent clients sending greedy chat completions.

    python bench/serve_load.py --device cpu                       # trains a tiny run of the embedded model first
    python bench/serve_load.py --device cuda --run runs/me --requests-per-client 4
    python bench/serve_load.py --device cpu --old-src /tmp/old-serve   # the old code already checked out
    python bench/serve_load.py --device cuda --run RUN --old-src OLD --commit abc1234   # a copied tree, no .git

The old code comes from `--old-src` (a checkout of it) or else from `git archive OLD_COMMIT` of this
repository. Each client sends its requests one after another (a closed loop); latency is from sending a
request to having the whole reply. `lost` counts requests that did not come back 200 with a reply. Both
servers get the same prompts; greedy replies of the two are compared (`same_replies`). The part of
bench/results/serve-load.json for this device (`cpu` or `gpu`) is replaced; the other part is kept.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "results" / "serve-load.json"
OLD_COMMIT = "bf5258f"
LINES = [
    "hey how are you",
    "are you coming tonight?",
    "i love pizza so much",
    "lol yes",
    "haha ok",
    "omg that is amazing",
    "did you see the game yesterday",
    "my sister is visiting this weekend",
    "ugh work was so long today",
    "wanna get coffee tomorrow morning?",
    "Not bad. Working late again.",
    "I think so, yes.",
    "That sounds good to me.",
    "Maybe tomorrow then.",
    "Sure, I will bring the snacks.",
]


def git(*args, cwd=ROOT) -> str | None:
    """git's answer, or None where this is not a git checkout (a copied tree on another machine)."""
    try:
        return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def old_source(where: str | None, tmp: Path) -> Path:
    if where:
        return Path(where).resolve()
    dest = tmp / "old"
    dest.mkdir()
    archive = subprocess.run(["git", "archive", OLD_COMMIT], cwd=ROOT, capture_output=True).stdout
    if not archive:
        raise SystemExit(
            f"error: cannot read commit {OLD_COMMIT} here (no git history?): pass --old-src DIR, "
            f"a copy of that commit's tree"
        )
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


def make_run(tmp: Path, model: str) -> Path:
    """A run of `model` trained for two steps on a few made-up conversations (speed, not quality)."""
    data = tmp / "data"
    data.mkdir()
    with open(data / "conversations.jsonl", "w", encoding="utf-8") as f:
        for c in range(8):
            msgs = [
                {
                    "speaker": ("Ana", "Ben")[i % 2],
                    "text": LINES[(c + i) % len(LINES)],
                    "time": f"2024-01-0{1 + c % 9}T10:{i:02d}:00+00:00",
                }
                for i in range(12)
            ]
            f.write(json.dumps({"id": f"c{c}", "messages": msgs, "source": "bench"}) + "\n")
    out = tmp / "run"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "convsim",
            "train",
            str(data),
            "--out",
            str(out),
            "--model",
            model,
            "--max-steps",
            "2",
            "--batch-size",
            "2",
            "--json",
        ],
        cwd=ROOT,
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return out


class Server:
    """`python -m convsim serve RUN` from `src` in a subprocess, on a free port."""

    def __init__(self, src: Path, run: Path, extra: list[str], env: dict):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "convsim", "serve", str(run), "--port", "0", "--quiet", *extra],
            cwd=src,
            env={**env, "PYTHONPATH": str(src)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        line = self.proc.stdout.readline()
        m = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
        if not m:
            err = self.proc.stderr.read() if self.proc.poll() is not None else ""
            raise SystemExit(f"error: the server in {src} did not start: {line!r} {err[-2000:]}")
        self.port = int(m.group(1))
        threading.Thread(target=self.proc.stderr.read, daemon=True).start()  # never let its pipe fill

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def ask(port: int, i: int, max_tokens: int) -> tuple[float, str | None]:
    """(seconds, reply text or None when lost) of one greedy completion."""
    body = json.dumps(
        {
            "model": "convsim/Ana",
            "temperature": 0,
            "max_tokens": max_tokens,
            "messages": [{"role": "user", "name": "Ben", "content": LINES[i % len(LINES)]}],
        }
    )
    t0 = time.perf_counter()
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        conn.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        data = r.read()
        conn.close()
        text = json.loads(data)["choices"][0]["message"]["content"] if r.status == 200 else None
    except Exception:
        text = None
    return time.perf_counter() - t0, text


def load(port: int, clients: int, per_client: int, max_tokens: int) -> tuple[dict, dict[int, str]]:
    """`clients` closed-loop clients, `per_client` requests each: rps, p50, p99, lost; and the replies."""
    replies: dict[int, str] = {}

    def client(c: int):
        out = []
        for k in range(per_client):
            i = c * per_client + k
            s, text = ask(port, i, max_tokens)
            out.append((i, s, text))
        return out

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = [r for rs in pool.map(client, range(clients)) for r in rs]
    wall = time.perf_counter() - t0
    lat = sorted(s for _, s, _ in results)
    lost = sum(text is None for _, _, text in results)
    for i, _, text in results:
        if text is not None:
            replies[i] = text
    q = statistics.quantiles(lat, n=100, method="inclusive") if len(lat) > 1 else lat * 99
    return (
        {
            "requests": len(results),
            "rps": round((len(results) - lost) / wall, 3),
            "p50_s": round(q[49], 3),
            "p99_s": round(q[98], 3),
            "lost": lost,
            "wall_s": round(wall, 2),
        },
        replies,
    )


def machine(device: str) -> str:
    cpu = platform.processor() or ""
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    desc = f"{platform.node()}: {os.cpu_count()} CPU cores ({cpu}), Linux {platform.release()}"
    if device.startswith("cuda"):
        import torch

        desc += f", GPU {torch.cuda.get_device_name(0)}"
    return desc


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--device",
        default="cpu",
        help="cpu or cuda (the new server's --device; the old one picks "
        "cuda when it is there, and CPU runs hide the GPUs from both)",
    )
    ap.add_argument("--run", help="a run directory to serve (default: train a two-step run of --model)")
    ap.add_argument("--model", default="gemma-3-270m", help="base model of the run trained when --run is not given")
    ap.add_argument("--old-src", help=f"a checkout of the old server's code (default: git archive {OLD_COMMIT})")
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--requests-per-client", type=int, default=2)
    ap.add_argument("--lone-requests", type=int, default=6, help="requests of the single client (default 6)")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--commit", help="the commit of this tree, where it is not a git checkout")
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    part = "gpu" if args.device.startswith("cuda") else "cpu"
    env = dict(os.environ)
    if part == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    tmp = Path(tempfile.mkdtemp(prefix="serve-load-"))
    try:
        old_src = old_source(args.old_src, tmp)
        run = Path(args.run).resolve() if args.run else make_run(tmp, args.model)
        load_before = os.getloadavg()
        table: dict = {}
        replies: dict = {}
        for name, src, extra in [
            ("old", old_src, []),
            ("new", ROOT, ["--device", args.device, "--queue-size", "1024", "--max-batch", str(max(levels))]),
        ]:
            server = Server(src, run, extra, env)
            try:
                ask(server.port, 0, args.max_tokens)  # warm up (first-call costs, compilation)
                table[name], replies[name] = {}, {}
                for c in levels:
                    per = args.lone_requests if c == 1 else args.requests_per_client
                    stats, got = load(server.port, c, per, args.max_tokens)
                    table[name][str(c)] = stats
                    replies[name].update({(c, i): t for i, t in got.items()})
                    print(f"{name} c={c}: {stats}", flush=True)
            finally:
                server.stop()
        same = [replies["old"][k] == replies["new"][k] for k in replies["old"] if k in replies["new"]]
        top = str(max(levels))
        result = {
            "machine": machine(args.device),
            "device": args.device,
            "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
            "commit": args.commit or git("rev-parse", "--short", "HEAD") or "unknown (pass --commit)",
            "old_commit": OLD_COMMIT,
            "run": str(args.run) if args.run else f"{args.model}, trained 2 steps by this script",
            "max_tokens": args.max_tokens,
            "requests_per_client": args.requests_per_client,
            "lone_requests": args.lone_requests,
            "load_average_before": [round(x, 2) for x in load_before],
            "load_average_after": [round(x, 2) for x in os.getloadavg()],
            "old": table["old"],
            "new": table["new"],
            f"speedup_at_{top}": round(table["new"][top]["rps"] / table["old"][top]["rps"], 2),
            "p99_at_top_over_lone_p50": round(table["new"][top]["p99_s"] / table["new"][str(min(levels))]["p50_s"], 2),
            "same_replies": f"{sum(same)}/{len(same)}",
        }
        print(json.dumps(result, indent=1))
        if not args.no_save:
            data = json.loads(OUT.read_text()) if OUT.exists() else {}
            data[part] = result
            if "speedup_at_32" in result:
                data[part]["speedup_at_32"] = result["speedup_at_32"]
            OUT.write_text(json.dumps(data, indent=1) + "\n")
            print(f"wrote {OUT.relative_to(ROOT)} ({part})")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`convsim serve`: every person of one or more runs behind one OpenAI-compatible API (FastAPI + uvicorn),
with a chat page at `/`.

    convsim serve runs/me                                   # http://127.0.0.1:8000/  (API at /v1)
    convsim serve runs/a runs/b --steer happy.safetensors:4 --steer calm.safetensors
    CONVSIM_API_KEY=secret convsim serve runs/me --host 0.0.0.0

Who speaks is the `model`: `convsim/<run>/<Name>`, or `convsim/<Name>` where only one served run has that
person. Runs share one copy of their base model; each run's LoRA adapter is loaded beside the others.
Requests waiting at the same time are decoded as one batch per run and steering (see `service`); a
request may steer with any loaded vectors: `"steer": {"happy": 2.0, "calm": -1.0}`.

    app.py      routes, streaming, uvicorn        service.py  runs, vectors, the batching worker
    guards.py   key, Host/Origin, body cap        schemas.py  pydantic request/response models, errors
    batch.py    batched generation with per-row sampling, stops and streaming
"""

from __future__ import annotations

import os

HELP = (
    "Serve the people of one or more runs over an OpenAI-compatible HTTP API (model = convsim/<run>/<Name>) "
    "with a chat page at /."
)
EXAMPLES = """
  convsim serve runs/me                                  # chat page: http://127.0.0.1:8000/
  convsim serve runs/ana-ben runs/cy-dee --steer happy.safetensors:4 --steer calm.safetensors
  CONVSIM_API_KEY=secret convsim serve runs/me --host 0.0.0.0
  curl -s localhost:8000/v1/chat/completions -H 'Content-Type: application/json' \\
       -d '{"model": "convsim/Ana", "messages": [{"role": "user", "content": "hi!"}], "steer": {"happy": 2}}'
"""


def add_arguments(p):
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="runs to serve (all on the same base model)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (0 = any free port)")
    p.add_argument(
        "--api-key",
        default=os.environ.get("CONVSIM_API_KEY"),
        help="require `Authorization: Bearer KEY` (default: $CONVSIM_API_KEY)",
    )
    p.add_argument("--insecure", action="store_true", help="allow a non-loopback --host without an API key")
    p.add_argument(
        "--steer",
        metavar="VECTOR[:STRENGTH]",
        action="append",
        default=[],
        help="load a steering vector (repeatable); STRENGTH is its default for requests that do not "
        "steer. Vectors in RUN_DIR/steering/*.safetensors are loaded too (default 0)",
    )
    p.add_argument("--device", help="cpu, cuda, ... (default: the best available)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="cap on a reply's tokens (default 256)")
    p.add_argument(
        "--max-context-tokens",
        type=int,
        default=1024,
        help="cap on the history's tokens; older messages drop first (default 1024)",
    )
    p.add_argument("--max-body-kb", type=int, default=1024, help="cap on a request body (default 1024 KiB)")
    p.add_argument("--queue-size", type=int, default=32, help="requests waiting beyond this get 429 (default 32)")
    p.add_argument("--max-batch", type=int, default=32, help="most sequences decoded together (default 32)")
    p.add_argument("--quiet", action="store_true", help="no access log")
    p.add_argument(
        "--allow-copy",
        action="store_true",
        help="let replies repeat 8-token spans of the training messages word for word (default: never)",
    )


def run(args):
    import signal
    import sys
    from convsim.errors import UserError
    from convsim.serve.app import bind, create_app, uvicorn_server
    from convsim.serve.guards import is_loopback
    from convsim.serve.schemas import Limits
    from convsim.serve.service import Service

    loopback = is_loopback(args.host)
    if not loopback and not args.api_key and not args.insecure:
        raise UserError(
            f"--host {args.host} is reachable from other machines: set an API key (--api-key or "
            "CONVSIM_API_KEY) or pass --insecure"
        )
    for flag in ("max_new_tokens", "max_context_tokens", "max_body_kb", "queue_size", "max_batch"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be at least 1")
    if not 0 <= args.port <= 65535:
        raise UserError("--port must be from 0 to 65535")
    limits = Limits(
        max_new_tokens=args.max_new_tokens,
        max_context_tokens=args.max_context_tokens,
        max_body_bytes=args.max_body_kb * 1024,
        queue_size=args.queue_size,
        max_batch=args.max_batch,
    )
    service = Service.from_runs(
        args.run_dirs,
        steer_args=args.steer,
        device=args.device,
        copy_guard=not args.allow_copy,
        api_key=args.api_key,
        limits=limits,
    )
    try:
        sock = bind(args.host, args.port)
    except OSError as e:
        service.close()
        raise UserError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from None
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(
        f"serving {', '.join(service.model_ids())} on http://{shown}:{port}/ (OpenAI base URL "
        f"http://{shown}:{port}/v1{', API key required' if service.api_key else ''})",
        flush=True,
    )
    server = uvicorn_server(create_app(service, loopback), quiet=args.quiet)
    # uvicorn stops on SIGINT/SIGTERM, then passes the signal on to the handler that was there before it:
    # for SIGTERM that is this one, so a stop asked for is a clean exit (0), not death by signal
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        server.run(sockets=[sock])  # returns after open requests finish
    except KeyboardInterrupt:
        pass
    finally:
        sock.close()
        service.close()
    print("stopped", file=sys.stderr)
    return 0

"""The `convsim` command: one table of subcommands, each the `run(args)` of a stage module.

A stage module defines `HELP` (one line), `EXAMPLES` (shown under `--help`), `add_arguments(parser)`
and `run(args) -> int | None`. Modules are imported only when their command runs, so `convsim --help`
is instant. User errors (`UserError`, a missing file) end with one `error: ...` line and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# name -> (module, one-line help). Keep this the only place a command is registered.
COMMANDS: dict[str, tuple[str, str]] = {
    "models": ("convsim.modeling.models_cli", "list the supported base models and whether their weights are here"),
    "import": (
        "convsim.data.import_cli",
        "read chat exports (WhatsApp, Telegram, Discord, ...) into conversations.jsonl",
    ),
    "stats": ("convsim.data.stats", "per-speaker statistics of an imported data dir"),
    "train": ("convsim.training.recipe", "LoRA fine-tune a model on a data dir, with one token per speaker"),
    "reply": ("convsim.chat.reply", "sample reply bursts as one person for a given history (non-interactive)"),
    "chat": ("convsim.chat.chat", "chat with a simulated person"),
    "converse": ("convsim.chat.converse", "let the model play everyone and watch them talk"),
    "compare": ("convsim.evaluation.compare", "held-out examples: real reply vs base, in-context and fine-tuned"),
    "history": ("convsim.chat.history", "list and export saved conversations"),
    "steer": ("convsim.steering.cli", "build steering vectors and sweep their strength"),
    "plots": ("convsim.plots", "emotion heatmaps, length histograms, loss curves as PNGs + index.html"),
    "tda": ("convsim.tda.cli", "training-data attribution: index a run's training messages, query a reply"),
    "eval": ("convsim.evaluation.evaluate", "per-speaker perplexity, speaker identification and style vs prompting"),
    "demo": ("convsim.demo", "the whole idea on the embedded model and data: import, train, eval, sample"),
    "serve": ("convsim.serve", "OpenAI-compatible HTTP API and a chat page"),
    "export": ("convsim.export.command", "write a merged standalone model (HF dir or GGUF) for other engines"),
}


def _top_parser(commands: dict[str, tuple[str, str]]) -> argparse.ArgumentParser:
    lines = "\n".join(f"  {name:<10} {help_}" for name, (_, help_) in commands.items())
    return argparse.ArgumentParser(
        prog="convsim",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Simulate the people of a chat history with a fine-tuned language model.",
        usage="convsim COMMAND [options]   (convsim COMMAND --help for each)",
        epilog=f"commands:\n{lines}\n\nstart here:\n  convsim demo            # embedded model + data, ~10 min on 2 CPU cores",
    )


def build_parser(name: str) -> tuple[argparse.ArgumentParser, object]:
    module_name, help_ = COMMANDS[name]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(
        prog=f"convsim {name}",
        description=getattr(module, "HELP", help_),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=("examples:\n" + module.EXAMPLES.strip("\n")) if getattr(module, "EXAMPLES", "") else None,
    )
    module.add_arguments(parser)
    return parser, module


def main(argv: list[str] | None = None) -> int:
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

    argv = sys.argv[1:] if argv is None else argv
    commands = COMMANDS
    top = _top_parser(commands)
    if not argv or argv[0] in ("-h", "--help"):
        top.print_help()
        return 0
    if argv[0] == "--version":
        from convsim import __version__

        print(__version__)
        return 0
    name = argv[0]
    if name not in commands:
        print(f"error: unknown command {name!r}; try `convsim --help`", file=sys.stderr)
        return 2
    if name == "train":  # --backend unsloth: unsloth must be imported before transformers/peft/trl
        from convsim.training.backends.unsloth import import_first

        import_first(argv[1:])
    parser, module = build_parser(name)
    args = parser.parse_args(argv[1:])
    # Everything convsim writes (data dirs, run dirs, checkpoints, logs, plots, databases) holds or is
    # derived from private chats: owner-only, whatever the library that writes it does. Restored after,
    # so an in-process caller (tests, notebooks) keeps its own umask.
    old_umask = os.umask(0o077)
    try:
        return _run(module, args)
    finally:
        os.umask(old_umask)


def _run(module, args) -> int:
    from convsim.errors import UserError

    try:
        rc = module.run(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, IsADirectoryError, PermissionError, NotADirectoryError) as e:
        where = getattr(e, "filename", None)
        print(f"error: {e.strerror or e}{': ' + str(where) if where else ''}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        print("error: out of memory; try a smaller --batch-size or --max-seq-length", file=sys.stderr)
        return 2
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except OSError as e:
        import errno

        if e.errno == errno.ENOSPC:
            print(
                f"error: no space left on the device{': ' + str(e.filename) if e.filename else ''}; "
                "nothing was replaced (files are written whole or not at all)",
                file=sys.stderr,
            )
            return 2
        raise
    except RuntimeError as e:
        if type(e).__name__ != "OutOfMemoryError":  # torch.OutOfMemoryError (CUDA/MPS), without importing torch
            raise
        first = (str(e).strip().splitlines() or [""])[0][:300]
        print(
            f"error: out of accelerator memory ({first}); try a smaller --batch-size or --max-seq-length, "
            "a smaller model, or the CPU",
            file=sys.stderr,
        )
        return 2
    return int(rc or 0)


if __name__ == "__main__":
    raise SystemExit(main())

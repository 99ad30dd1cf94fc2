"""`convsim plots RUN_DIR`: a run's figures as PNGs, and an index.html that shows them with captions.

    convsim plots runs/me                       # writes runs/me/plots/*.png + index.html
    convsim plots runs/me --out docs/figures --words my-words.txt

Figures, each from what the run saved (metrics.jsonl, data/conversations.jsonl, adapter, tokenizer):
  training   train and validation loss by step
  messages   characters and tokens per message, burst size (messages in a row), reply delay; per speaker
  model      emotion heatmaps: cosine similarity of the final-layer state at the last token of
             "i feel {w}" (48 single-token words), without and with each speaker's token, for the
             fine-tuned and the base model (the same PEFT model inside `disable_adapter()`), and their
             differences; message activations of the fine-tuned model projected to 2-D with PCA
People are labelled as the demo's tables show them: an id-like name with a friendly alias beside it
(`Alex (549cc1d1)`), or the name given with `--speaker NAME=SHOWN`.
A figure whose data the run lacks (no metrics, no message times) is skipped with a note in the index.
Modules: figures.py (one maker per figure group), data.py (numbers without a model), hidden.py (hidden
states), draw.py (matplotlib); this file is the command and index.html.
"""

from __future__ import annotations

import html
import json
import sys
from dataclasses import asdict
from pathlib import Path

from convsim.errors import UserError
from convsim.plots.figures import MAKERS, Context, PlotReport, Skip

HELP = "Figures of a run (emotion heatmaps, length histograms, loss curves, ...) as PNGs + index.html."
EXAMPLES = """
  convsim plots runs/me                          # into runs/me/plots/, open index.html
  convsim plots runs/me --out figs --sample 500  # PCA of 500 messages instead of 1000
  convsim plots runs/me --words words.txt --template "today i am {w}"
  convsim plots runs/me --no-model               # only the figures that need no model (seconds)
  convsim plots runs/me --speaker 549cc1d1=Riya  # label a person Riya (549cc1d1) instead of an alias
"""


def add_arguments(p) -> None:
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory written by `convsim train`")
    p.add_argument("--out", help="output directory (default RUN_DIR/plots)")
    p.add_argument("--words", help="emotion words, one a line (default: 48 shipped with convsim)")
    p.add_argument("--template", default="i feel {w}", help="text around each word (default %(default)r)")
    p.add_argument("--sample", type=int, default=1000, help="messages in the PCA figure (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--no-model", action="store_true", help="skip the figures that need the model")
    p.add_argument(
        "--speaker",
        action="append",
        default=[],
        metavar="NAME=SHOWN",
        help="label the run's speaker NAME as SHOWN in the figures (repeatable; default: id-like names get an alias)",
    )
    p.add_argument("--json", action="store_true", help="print the list of figures and notes as JSON")


def make_all(args) -> tuple[Path, PlotReport]:
    """Every figure of `args.run_dir` into `args.out` (default RUN_DIR/plots): the directory and a report."""
    from convsim.data.names import renames
    from convsim.fsutil import private_dir, write_json
    from convsim.runs import open_run

    run = open_run(args.run_dir)
    renamed = renames(args.speaker, run.speakers)
    if args.sample < 3:
        raise UserError("--sample must be at least 3")
    if "{w}" not in args.template:
        raise UserError(f"--template must contain {{w}} where the word goes, got {args.template!r}")
    if not args.no_model:
        from convsim.plots.data import read_words

        read_words(args.words)  # a bad word list fails now, not after minutes of work
    out = private_dir(args.out or run.path / "plots")
    ctx = Context(run, out, args, renamed)
    for k, (title, section, maker) in enumerate(MAKERS, 1):
        print(f"[{k}/{len(MAKERS)}] {title.lower()}", file=sys.stderr, flush=True)
        try:
            maker(ctx)
        except Skip as e:
            ctx.report.skipped.append({"title": title, "note": str(e), "section": section})
            print(f"      skipped: {e}", file=sys.stderr, flush=True)
    write_json(out / "plots.json", {"run": str(run.path), "labels": ctx.names, **asdict(ctx.report)})
    write_index(out, run, ctx.report, ctx.names)
    return out, ctx.report


def write_index(out: Path, run, report: PlotReport, names: dict[str, str]) -> None:
    from convsim.fsutil import write_text

    e = html.escape
    meta = run.meta
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>convsim plots: {e(run.path.name)}</title><style>"
        "body{font-family:system-ui,sans-serif;max-width:1500px;margin:2em auto;padding:0 1em;color:#222}"
        "figure{margin:2em 0;border-top:1px solid #ddd;padding-top:1em}img{max-width:100%;height:auto}"
        "figcaption{max-width:60em;line-height:1.4}.skip{color:#a40}.notes{background:#f6f6f6;padding:.5em 1em}"
        "</style></head><body>",
        f"<h1>convsim plots: {e(run.path.name)}</h1>",
        f"<p>Model {e(str(meta.model))}, people {e(', '.join(names.get(s, s) for s in run.people))}, "
        f"{e('?' if meta.global_step is None else str(meta.global_step))} steps, adapter {e(run.adapter_hash)}.</p>",
    ]
    if report.notes:
        parts.append(
            "<div class='notes'><h2>Notes</h2><ul>" + "".join(f"<li>{e(n)}</li>" for n in report.notes) + "</ul></div>"
        )
    for section in dict.fromkeys(s for _, s, _ in MAKERS):
        parts.append(f"<h2>{e(section)}</h2>")
        for f in (f for f in report.figures if f.section == section):
            parts.append(
                f"<figure id='{e(f.file)}'><img src='{e(f.file)}' alt='{e(f.title)}'>"
                f"<figcaption><b>{e(f.title)}.</b> {e(f.caption)}</figcaption></figure>"
            )
        for s in (s for s in report.skipped if s["section"] == section):
            parts.append(f"<p class='skip'><b>{e(s['title'])}: skipped.</b> {e(s['note'])}</p>")
    parts.append("</body></html>\n")
    write_text(out / "index.html", "\n".join(parts))


def run(args) -> int:
    out, report = make_all(args)
    if args.json:
        print(json.dumps({"out": str(out), **asdict(report)}, ensure_ascii=False, indent=2))
    else:
        for n in report.notes:
            print(f"note: {n}")
        print(f"wrote {len(report.figures)} figures ({len(report.skipped)} skipped) to {out / 'index.html'}")
    return 0

"""Draw the headline evaluation (bench/results/eval-chitchat.json) as one figure for docs/RESULTS.md:
per speaker, held-out perplexity of what the person really said under the four models (lower is
better), and how often replies are identified as the right speaker (real messages as the reference).

    python bench/plot_eval.py bench/results/eval-chitchat.json docs/figures/eval-chitchat.png
"""

from __future__ import annotations

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(src: str, out: str) -> None:
    d = json.loads(open(src, encoding="utf-8").read())
    speakers = list(d["speakers"])
    kinds = [
        ("ppl_base", "base, context only"),
        ("ppl_in_context", "base + retrieved examples"),
        ("ppl_finetuned", "fine-tuned"),
        ("ppl_hybrid", "fine-tuned + retrieved"),
    ]
    extra = [
        (rows, label)
        for rows, label in (
            (
                (d.get("pair_only_headline") or {}).get("speakers"),
                "fine-tuned on the pair only, 8 messages of context (before)",
            ),
            (
                (d.get("ablations", {}).get("loss_whole_text") or {}).get("speakers"),
                "… and loss on the whole text (ablation)",
            ),
        )
        if rows
    ]
    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 5.6))
    w = 0.8 / (len(kinds) + len(extra))
    for i, (k, label) in enumerate(kinds):
        xs = [j + i * w for j in range(len(speakers))]
        vals = [d["speakers"][s][k] for s in speakers]
        a.bar(xs, vals, w, label=label)
        for x, v in zip(xs, vals):
            a.text(x, v + 0.3, f"{v:.1f}", ha="center", fontsize=7)
    for i, ((rows, label), shade) in enumerate(zip(extra, ("0.45", "0.7"))):
        xs = [j + (len(kinds) + i) * w for j in range(len(speakers))]
        vals = [rows[s]["ppl_finetuned"] for s in speakers]
        a.bar(xs, vals, w, label=label, color=shade)
        for x, v in zip(xs, vals):
            a.text(x, v + 0.3, f"{v:.1f}", ha="center", fontsize=7)
    a.set_xticks([j + w * (len(kinds) + len(extra) - 1) / 2 for j in range(len(speakers))], speakers)
    a.set_ylabel("perplexity of the real reply (lower is better)")
    a.set_title(f"held-out perplexity, {d['n_examples']} test examples")
    a.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.09), ncol=2)
    ids = [
        ("speaker_id_real", "real messages"),
        ("speaker_id_finetuned", "fine-tuned replies"),
        ("speaker_id_in_context", "in-context replies"),
    ]
    w2 = 0.8 / len(ids)
    for i, (k, label) in enumerate(ids):
        xs = [j + i * w2 for j in range(len(speakers))]
        vals = [d["speakers"][s].get(k) or 0 for s in speakers]
        b.bar(xs, vals, w2, label=label)
        for x, v in zip(xs, vals):
            b.text(x, v + 0.01, f"{v:.2f}", ha="center", fontsize=8)
    b.set_xticks([j + w2 * (len(ids) - 1) / 2 for j in range(len(speakers))], speakers)
    b.set_ylim(0, 1.05)
    b.set_ylabel("identified as the right speaker")
    b.set_title("speaker identification (char n-gram classifier)")
    b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    main(*sys.argv[1:3])

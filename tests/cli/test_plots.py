"""`convsim plots`: every figure from the tiny run through the CLI, skips with notes, and the pure parts.

pytest tests/cli/test_plots.py        # about a minute, most of it training the shared tiny run
"""

from __future__ import annotations

import html
import json
import shutil

import matplotlib.image
import numpy as np
import pytest

from conftest import cli
from convsim.data.schema import Conversation, Message, read_conversations, write_conversations
from convsim.plots import data
from convsim.plots.hidden import emotion_texts, message_vectors

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TINY_FIGURES = {
    "loss.png",
    "lengths.png",
    "bursts.png",
    "reply-delays.png",
    "activations-pca.png",
    "emotion-base.png",
    "emotion-finetuned.png",
    "emotion-finetuned-Ana.png",
    "emotion-finetuned-Ben.png",
    "emotion-diff-Ana-minus-none.png",
    "emotion-diff-Ben-minus-none.png",
    "emotion-diff-Ana-minus-Ben.png",
    "emotion-diff-finetuned-minus-base.png",
}


def assert_png(path):
    raw = path.read_bytes()
    assert raw[:8] == PNG_SIGNATURE, path
    assert len(raw) > 10_000, f"{path.name} is only {len(raw)} bytes"
    img = matplotlib.image.imread(path)
    assert img.shape[0] >= 300 and img.shape[1] >= 300, (path.name, img.shape)
    assert float(img[..., :3].std()) > 0.02, f"{path.name} is (nearly) one colour"


# ----------------------------------------------------------------------------- end to end


def test_every_figure_from_the_tiny_run(tiny_run, tmp_path):
    out = tmp_path / "figs"
    p = cli("plots", tiny_run, "--out", out, "--sample", "120", "--json")
    report = json.loads(p.stdout)
    assert report["skipped"] == []
    assert {f["file"] for f in report["figures"]} == TINY_FIGURES
    for name in TINY_FIGURES:
        assert_png(out / name)
    page = (out / "index.html").read_text(encoding="utf-8")
    for f in report["figures"]:
        assert f"<img src='{f['file']}'" in page
        assert html.escape(f["caption"]) in page
    # The tiny tokenizer splits some shipped words: they are dropped and the index says which.
    assert any("not one token" in n and "angry" in n for n in report["notes"])
    assert "angry" in page
    # Progress for the slow parts goes to stderr.
    assert "[6/6]" in p.stderr and "message activations" in p.stderr and "emotion words" in p.stderr

    sims = json.loads((out / "emotion-similarity.json").read_text())
    assert "angry" not in sims["words"] and "happy" in sims["words"]
    m = {k: np.array(v) for k, v in sims["matrices"].items()}
    assert set(m) == {"no speaker", "Ana", "Ben", "base"}
    for v in m.values():
        assert v.shape == (len(sims["words"]),) * 2
        np.testing.assert_allclose(v, v.T, atol=1e-4)
        np.testing.assert_allclose(np.diag(v), 1.0, atol=1e-4)
    # The base model really is the adapter switched off, and a speaker token really changes the states.
    assert np.abs(m["no speaker"] - m["base"]).max() > 1e-3
    assert np.abs(m["Ana"] - m["no speaker"]).max() > 1e-3


def test_speaker_labels_and_rename(tiny_run, tmp_path, monkeypatch, capsys):
    """Legends, titles and the index show `--speaker`'s names beside the run's; file names keep the run's."""
    import convsim.plots.draw as draw
    from convsim.cli import main

    legends, save_png = {}, draw.save_png

    def keep(fig, path):
        legends[path.name] = [t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()]
        save_png(fig, path)

    monkeypatch.setattr(draw, "save_png", keep)
    out = tmp_path / "o"
    assert main(["plots", str(tiny_run), "--out", str(out), "--no-model", "--speaker", "Ana=Anna"]) == 0
    assert {"lengths.png", "bursts.png"} <= set(legends)
    for name in ("lengths.png", "bursts.png"):
        assert any(t.startswith("Anna (Ana) (") for t in legends[name]), legends[name]
        assert any(t.startswith("Ben (") for t in legends[name]) and not any(
            t.startswith("Ana ") for t in legends[name]
        )
    assert json.loads((out / "plots.json").read_text())["labels"] == {"Ana": "Anna (Ana)", "Ben": "Ben"}
    assert "people Anna (Ana), Ben" in (out / "index.html").read_text(encoding="utf-8")
    capsys.readouterr()
    assert main(["plots", str(tiny_run), "--out", str(tmp_path / "x"), "--speaker", "Zed=Z"]) == 2
    assert "unknown speaker 'Zed'" in capsys.readouterr().err and not (tmp_path / "x").exists()


def _copy_run(src, dst):
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("checkpoints", "logs", "plots"))
    return dst


def test_run_without_metrics_or_times_skips_with_notes(tiny_run, tmp_path):
    run = _copy_run(tiny_run, tmp_path / "run")
    (run / "metrics.jsonl").unlink()
    convs = read_conversations(run / "data")
    for c in convs:
        for m in c.messages:
            m.time = None
    write_conversations(run / "data" / "conversations.jsonl", convs)

    p = cli("plots", run, "--no-model")  # default output: RUN_DIR/plots
    out = run / "plots"
    assert "wrote 2 figures (4 skipped)" in p.stdout
    assert not (out / "loss.png").exists() and not (out / "reply-delays.png").exists()
    for name in ("lengths.png", "bursts.png"):
        assert_png(out / name)
    page = (out / "index.html").read_text(encoding="utf-8")
    assert "Loss curves: skipped.</b> the run has no metrics.jsonl" in page
    assert "Reply delay: skipped.</b> the run&#x27;s messages have no times" in page
    assert "--no-model was given" in page
    assert "<img src='lengths.png'" in page and "loss.png" not in page


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--words", "no-such-words.txt"], "no word list"),
        (["--template", "i feel"], "--template must contain {w}"),
        (["--sample", "1"], "--sample must be at least 3"),
    ],
)
def test_user_errors_are_one_line(tiny_run, tmp_path, extra, message):
    p = cli("plots", tiny_run, "--out", tmp_path / "o", *extra, check=False)
    assert p.returncode == 2 and p.stderr.startswith("error: ") and message in p.stderr, p.stderr
    assert "Traceback" not in p.stderr


def test_not_a_run_dir(tmp_path):
    p = cli("plots", tmp_path, check=False)
    assert p.returncode == 2 and "not a run directory" in p.stderr


# ----------------------------------------------------------------------------- the numbers


def conv(*rows, cid="c"):
    return Conversation(cid, [Message(s, t, time) for s, t, time in rows])


def test_burst_sizes_and_reply_delays():
    c = conv(
        ("A", "hi", "2024-01-01T10:00:00+00:00"),
        ("A", "there", "2024-01-01T10:00:05+00:00"),
        ("B", "yo", "2024-01-01T10:01:05+00:00"),
        ("A", "ok", None),  # no time: no delay
        ("B", "so", "2024-01-01T10:02:00"),
        ("A", "hm", "2024-01-01T10:02:10+00:00"),  # naive then aware: a time without offset counts as UTC
        ("B", "ah", "2024-01-01T10:02:20"),
        ("A", "fine", "2024-01-01T10:02:50"),
        ("A", "bye", "bad"),
    )
    assert data.burst_sizes([c]) == {"A": [2, 1, 1, 2], "B": [1, 1, 1]}
    assert data.reply_delays([c]) == {"B": [60.0, 10.0], "A": [10.0, 30.0]}
    assert data.reply_delays([conv(("A", "x", None), ("B", "y", None))]) == {}


def test_loss_curves_last_row_of_a_step_wins(tmp_path):
    f = tmp_path / "metrics.jsonl"
    f.write_text(
        "\n".join(
            [
                json.dumps({"step": 10, "loss": 3.0}),
                json.dumps({"step": 10, "eval_loss": 2.9}),
                "{not json",
                json.dumps({"step": 20, "loss": 2.5}),
                json.dumps({"step": 20, "train_loss": 2.7}),
                json.dumps({"step": 20, "eval_loss": 2.4}),
                json.dumps({"step": 20, "eval_loss": 2.3}),
            ]
        )
    )
    assert data.loss_curves(f) == {"train": [(10, 3.0), (20, 2.5)], "val": [(10, 2.9), (20, 2.3)]}
    assert data.loss_curves(tmp_path / "missing.jsonl") == {"train": [], "val": []}


def test_word_list(tmp_path):
    assert len(data.read_words()) == 48
    f = tmp_path / "w.txt"
    f.write_text("# my words\nhappy\n\nsad  # comment\nhappy\n")
    assert data.read_words(f) == ["happy", "sad"]


def test_single_token_check_and_speaker_prefix():
    from convsim.data.examples import PromptFormat
    from convsim.modeling.models import load
    from convsim.modeling.speakers import add_speaker_tokens

    model, tok = load("tiny-llama", device="cpu")
    kept, dropped = data.single_token_words(tok, ["happy", "angry"])
    assert kept == ["happy"] and dropped == ["angry"]
    ids = add_speaker_tokens(model, tok, ["Ana"])
    fmt = PromptFormat(speakers=("Ana",))
    plain, tagged = emotion_texts(tok, fmt, ["happy"]), emotion_texts(tok, fmt, ["happy"], "Ana")
    assert tagged[0][:2] == [tok.bos_token_id, ids["Ana"]]
    assert plain[0][0] == tok.bos_token_id and plain[0][-1] == tagged[0][-1]  # same word token last
    # Right padding: a message's vector does not depend on what shares its batch.
    texts = ["hi", "this one is a good deal longer than the first message"]
    both = message_vectors(model, tok, texts, progress=False)
    alone = message_vectors(model, tok, texts[:1], progress=False)
    np.testing.assert_allclose(both[0], alone[0], atol=1e-5)

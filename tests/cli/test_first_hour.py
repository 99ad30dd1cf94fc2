"""What a new user sees first: the demo's summary follows its table, replies are never empty without a
word, progress is readable, and id-like people get friendly aliases."""

import contextlib
import json
import re
import sys

import pytest

from conftest import cli, tiny_trained_model
from convsim.data.names import alias, display, displays, looks_like_id
from convsim.demo import summary, table_lines
from convsim.inference.generate import SampleConfig, reply, without_partial_tag


def table(ft, ic, base):
    return {"ppl_finetuned": ft, "ppl_in_context": ic, "ppl_base": base}


def test_summary_when_fine_tuning_wins():
    said = summary({"Ana": table(10.0, 12.0, 15.0), "549cc1d1": table(20.0, 21.5, 25.0)}, "20 steps")
    assert said[0] == "Ana: fine-tuning beat prompting (10.0 vs 12.0) and beat the base model (15.0)."
    assert said[1].startswith(f"{display('549cc1d1')}: fine-tuning beat prompting (20.0 vs 21.5)")
    assert said[-1] == "Fine-tuning beat prompting for every person here, after 20 steps."


def test_summary_when_fine_tuning_loses():
    # the figures of a loaded CPU run: fine-tuning behind prompting for both, behind the base model for one
    said = summary({"A": table(25.1, 20.7, 23.7), "B": table(29.0, 28.6, 30.0)}, "9 steps")
    assert said[0] == "A: fine-tuning lost to prompting (25.1 vs 20.7) and lost to the base model (23.7)."
    assert said[1] == "B: fine-tuning lost to prompting (29.0 vs 28.6) and beat the base model (30.0)."
    assert said[-1].startswith("Fine-tuning did not beat prompting for anyone here after 9 steps.")
    assert "GPU" in said[-1] and "--steps" in said[-1]


def test_summary_mixed_and_compares_printed_values():
    said = summary({"A": table(10.0, 12.0, 15.0), "B": table(20.04, 20.01, 30.0)}, "20 steps")
    assert "tied with prompting (20.0 vs 20.0)" in said[1]  # equal as printed: not a win
    assert said[-1].startswith("Fine-tuning beat prompting for 1 of 2 people after 20 steps (for A)")
    assert "--steps" in said[-1]


def parse_table(stdout: str) -> dict[str, tuple[float, float, float]]:
    lines = stdout.split("=== 3/5")[1].split("=== 4/5")[0].strip().splitlines()
    i = next(k for k, line in enumerate(lines) if line.startswith("person"))
    rows = {}
    for line in lines[i + 1 :]:
        m = re.match(r"(.+?)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)$", line)
        if m:
            rows[m.group(1)] = tuple(float(m.group(k)) for k in (2, 3, 4))
    return rows


def test_demo_end_to_end_tiny(tmp_path):
    p = cli("demo", "--model", "tiny-gemma3", "--steps", "2", "--eval-n", "2", "--out", tmp_path / "demo")
    rows = parse_table(p.stdout)
    assert len(rows) == 2 and all(re.match(r"\w+ \(\w{8}\)$", name) for name in rows)  # aliases beside ids
    said = p.stdout.split("=== what the table shows")[1].split("=== 5/5")[0].strip().splitlines()
    for name, (ft, ic, base) in rows.items():
        line = next(s for s in said if s.startswith(name + ":"))
        word = "beat" if ft < ic else ("tied with" if ft == ic else "lost to")
        assert f"fine-tuning {word} prompting ({ft:.1f} vs {ic:.1f})" in line, line
    wins = sum(ft < ic for ft, ic, _ in rows.values())
    last = said[-1]
    if wins == len(rows):
        assert last.startswith("Fine-tuning beat prompting for every person here")
    elif wins:
        assert last.startswith(f"Fine-tuning beat prompting for {wins} of {len(rows)} people")
    else:
        assert last.startswith("Fine-tuning did not beat prompting for anyone here")
    assert "after 2 steps of 8 examples" in last
    saved = json.loads((tmp_path / "demo" / "demo-eval.json").read_text())
    assert saved["summary"] == said
    # progress: labelled phases on stderr, no raw trainer dicts anywhere
    assert "training:" in p.stderr and "validation at step 2" in p.stderr and "saving the adapter" in p.stderr
    assert "{'loss'" not in p.stdout + p.stderr and "'train_runtime'" not in p.stdout + p.stderr


def test_demo_rejects_bad_steps(tmp_path):
    p = cli("demo", "--steps", "0", "--out", tmp_path / "d", check=False)
    assert p.returncode == 2 and p.stderr.strip().splitlines()[-1].startswith("error:")
    assert not (tmp_path / "d").exists() and not (tmp_path / "d-data").exists()


# ----------------------------------------------------------------------------- empty replies


@pytest.fixture
def empty_generation(monkeypatch):
    """Generation that returns empty bursts, as an undertrained model can."""
    import convsim.inference.generate as gen

    def nothing(model, tok, fmt, history, speaker, cfg=None, n=1, cache=None):
        return [[] for _ in range(n)]

    def stream_nothing(*a, **kw):
        return iter(())

    monkeypatch.setattr(gen, "reply", nothing)
    monkeypatch.setattr(gen, "stream_reply", stream_nothing)


def run_main(argv, capsys, monkeypatch, stdin=""):
    import io

    from convsim.cli import main

    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_reply_never_empty_silently(tiny_run, tmp_path, empty_generation, capsys, monkeypatch):
    h = tmp_path / "h.txt"
    h.write_text("[Ben] are you coming?\n")
    rc, out, err = run_main(["reply", tiny_run, "--as", "Ana", "--history", h], capsys, monkeypatch)
    assert rc == 0 and out.strip() == "[Ana] …" and "reply came out empty" in err
    rc, out, err = run_main(["reply", tiny_run, "--as", "Ana", "--history", h, "--json"], capsys, monkeypatch)
    got = json.loads(out)["replies"][0]
    assert got["messages"] == [] and "reply came out empty" in got["note"] and "reply came out empty" in err


@pytest.mark.parametrize("stream", [False, True])
def test_chat_never_empty_silently(tiny_run, empty_generation, capsys, monkeypatch, stream):
    argv = ["chat", tiny_run, "--as", "Ana"] + (["--stream"] if stream else [])
    rc, out, err = run_main(argv, capsys, monkeypatch, stdin="hi!\n/quit\n")
    assert rc == 0 and "[Ana] …" in out and "reply came out empty" in err


def test_serve_never_empty_silently(tiny_run, empty_generation):
    from test_serve import AUTH, KEY, chat, serving

    with serving(tiny_run, api_key=KEY) as (url, _):
        status, _, data = chat(url, {"model": "convsim/Ana", "messages": [{"role": "user", "content": "hi"}]}, AUTH)
    body = json.loads(data)
    assert status == 200 and body["choices"][0]["message"]["content"] == ""
    assert "reply came out empty" in body["convsim"]["note"]


@contextlib.contextmanager
def favour(model, token_id, by=1e4):
    """Makes `token_id` the most likely next token everywhere (a hook on the output head)."""

    def hook(module, inputs, output):
        output = output.clone()
        output[..., token_id] += by
        return output

    h = model.get_output_embeddings().register_forward_hook(hook)
    try:
        yield
    finally:
        h.remove()


def test_no_stop_before_the_first_tokens():
    from convsim.data.examples import PromptFormat
    from convsim.data.schema import Message

    model, tok, ids = tiny_trained_model()
    model.eval()
    fmt = PromptFormat(style="base", speakers=("Ana", "Ben"))
    hist = [Message("Ben", "are you coming?", "2024-01-01T00:00:00+00:00")]
    with favour(model, ids["Ben"]):  # the other speaker's token: a stop at the very first step
        assert reply(model, tok, fmt, hist, "Ana", SampleConfig(temperature=0, min_new_tokens=0))[0] == []
        got = reply(model, tok, fmt, hist, "Ana", SampleConfig(temperature=0, max_new_tokens=12, min_new_tokens=4))
    assert got[0] != []  # four tokens were written before the stop came


def test_partial_tag_is_cut():
    tags = ["[549cc1d1]", "[a54af4d5]"]
    assert without_partial_tag("ok see you\n[5", tags) == "ok see you"
    assert without_partial_tag("ok see you [a54a", tags) == "ok see you"
    assert without_partial_tag("see [link]", tags) == "see [link]"
    assert without_partial_tag("a list[5", tags) == "a list[5"  # not at a word start: the person's text


# ----------------------------------------------------------------------------- readable people


def test_aliases_are_stable_and_distinct():
    assert looks_like_id("549cc1d1") and looks_like_id("12345") and not looks_like_id("Riya")
    assert alias("549cc1d1") == alias("549cc1d1") != "" and alias("Ana") == ""
    assert display("Ana") == "Ana" and display("549cc1d1") == f"{alias('549cc1d1')} (549cc1d1)"
    ids = [f"{i:08x}" for i in range(1, 30, 3)]
    shown = displays(ids)
    assert len({v.split(" ")[0] for v in shown.values()}) == len(ids)
    assert table_lines({"549cc1d1": table(1.0, 2.0, 3.0)})[1].startswith(display("549cc1d1"))

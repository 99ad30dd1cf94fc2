"""Tier 1 and 2: examples, training, generation and the conversation commands on tiny models."""

import json

import pytest
import torch

from conftest import cli, synthetic_conversations
from convsim.data.examples import PromptFormat, build_examples, render, split_conversations
from convsim.inference.generate import SampleConfig, reply, stream_reply
from convsim.runs import open_run


def test_models_lists_rows():
    out = cli("models", "--json").stdout
    names = {r["name"] for r in json.loads(out)["models"]}
    assert {"gemma-3-270m", "gemma-3-27b-it", "mistral-7b", "tiny-gemma3", "tiny-llama"} <= names


@pytest.mark.parametrize(
    "argv",
    [
        ["train", "/nonexistent", "--out", "/tmp/x", "--model", "tiny-llama"],
        ["models-nope"],
        ["reply", "/nonexistent", "--as", "A", "--history", "-"],
    ],
)
def test_user_errors_are_one_line(argv):
    p = cli(*argv, check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr and p.stderr.strip().splitlines()[-1].startswith("error:")


def test_unknown_model_is_user_error(data_dir, tmp_path):
    p = cli("train", data_dir, "--out", tmp_path / "r", "--model", "no-such-model", check=False)
    assert p.returncode == 2 and "unknown model" in p.stderr and "Traceback" not in p.stderr


def test_split_is_by_time_and_disjoint():
    convs = synthetic_conversations(n_convs=20)
    s = split_conversations(convs)
    ids = [c.id for part in s.values() for c in part]
    assert len(ids) == len(set(ids)) >= 20
    msgs = [(m.time, m.text) for part in s.values() for c in part for m in c.messages]
    assert sorted(msgs) == sorted((m.time, m.text) for c in convs for m in c.messages)  # every message once
    assert max(m.time for c in s["train"] for m in c.messages) < min(c.messages[0].time for c in s["val"])
    assert max(m.time for c in s["val"] for m in c.messages) < min(c.messages[0].time for c in s["test"])


def test_held_out_splits_take_their_share_of_replies_even_from_one_long_session():
    from convsim.data.examples import replies

    convs = synthetic_conversations(n_convs=3, per_conv=200)
    total = sum(replies(c) for c in convs)
    s = split_conversations(convs, val=0.1, test=0.1)
    for name in ("val", "test"):
        assert sum(replies(c) for c in s[name]) == round(0.1 * total)
        assert len(build_examples(s[name], None, 8, 8)) == round(0.1 * total)
    one = synthetic_conversations(n_convs=1, per_conv=100)
    s = split_conversations(one)
    assert [c.id for c in s["train"] + s["val"] + s["test"]] == ["c000", "c000/val", "c000/test"]


def test_loss_mask_covers_only_reply():
    from convsim.modeling.models import load
    from convsim.modeling.speakers import add_speaker_tokens

    model, tok = load("tiny-llama")
    add_speaker_tokens(model, tok, ["Ana", "Ben"])
    fmt = PromptFormat("base", ("Ana", "Ben"))
    ex = build_examples(synthetic_conversations(2), ["Ana"])[0]
    r = render(tok, fmt, ex.context, ex.speaker, ex.reply, ex.next_speaker)
    assert not any(r.loss_mask[: r.prompt_len]) and all(r.loss_mask[r.prompt_len :])
    reply_text = tok.decode([i for i, m in zip(r.input_ids, r.text_mask) if m])
    assert reply_text.strip().split("\n")[0].strip() == ex.reply[0].text.strip()
    assert r.input_ids[r.prompt_len - 1] == tok.convert_tokens_to_ids("[Ana]")


def test_tiny_run_artifacts(tiny_run):
    run = open_run(tiny_run)
    assert run.speakers == ["Ana", "Ben"] or set(run.speakers) == {"Ana", "Ben"}
    size = sum(f.stat().st_size for f in (tiny_run / "adapter").rglob("*") if f.is_file())
    assert size < 5e6
    assert (tiny_run / "metrics.jsonl").exists() and (tiny_run / "samples.jsonl").exists()
    assert oct((tiny_run / "data" / "conversations.jsonl").stat().st_mode & 0o777) == "0o600"
    tok_ids = run.meta.speaker_token_ids
    assert set(tok_ids) == {"Ana", "Ben"}


def test_adapter_reload_identical_logits(tiny_run):
    run = open_run(tiny_run)
    m1, tok = run.load()
    m2, _ = run.load()
    x = torch.tensor([[tok.bos_token_id, run.meta.speaker_token_ids["Ana"], 100, 200]])
    with torch.no_grad():
        assert torch.equal(m1(input_ids=x).logits, m2(input_ids=x).logits)
        with m1.disable_adapter():
            base = m1(input_ids=x).logits
        assert not torch.equal(base, m2(input_ids=x).logits)


def test_stop_logic_and_streaming_equals_greedy(tiny_run):
    run = open_run(tiny_run)
    model, tok = run.load()
    hist = synthetic_conversations(1)[0].messages[:5]
    cfg = SampleConfig(temperature=0, max_new_tokens=40)
    greedy = reply(model, tok, run.fmt, hist, "Ana", cfg)[0]
    streamed: dict[int, str] = {}
    for i, d in stream_reply(model, tok, run.fmt, hist, "Ana", cfg):
        streamed[i] = streamed.get(i, "") + d
    assert [streamed[i] for i in sorted(streamed)] == greedy
    for m in greedy:
        assert "[Ben]" not in m and "[Ana]" not in m


def test_reply_pipe_json_and_chat_save(tiny_run, tmp_path):
    p = cli(
        "reply",
        tiny_run,
        "--as",
        "Ana",
        "--history",
        "-",
        "--n",
        "2",
        "--json",
        "--max-new-tokens",
        "8",
        input="[Ben] are you coming?\n",
    )
    assert len(json.loads(p.stdout)["replies"]) == 2
    a = cli(
        "reply",
        tiny_run,
        "--as",
        "Ana",
        "--history",
        "-",
        "--temperature",
        "0",
        "--max-new-tokens",
        "8",
        input="[Ben] hi\n",
    ).stdout
    b = cli(
        "reply",
        tiny_run,
        "--as",
        "Ana",
        "--history",
        "-",
        "--temperature",
        "0",
        "--max-new-tokens",
        "8",
        input="[Ben] hi\n",
    ).stdout
    assert a == b
    db = tmp_path / "c.sqlite"
    cli("chat", tiny_run, "--as", "Ana", "--save", "--db", db, "--max-new-tokens", "6", input="hello\n/quit\n")
    assert oct(db.stat().st_mode & 0o777) == "0o600"
    out = cli("history", tiny_run, "--db", db, "--export", "jsonl").stdout
    msgs = json.loads(out.splitlines()[0])["messages"]
    assert msgs[0] == {**msgs[0], "speaker": "Ben", "text": "hello"}
    p = cli("reply", tiny_run, "--as", "Zed", "--history", "-", input="[Ben] hi\n", check=False)
    assert p.returncode == 2 and "unknown speaker" in p.stderr


def test_eval_json_shape(tiny_run):
    p = cli("eval", tiny_run, "--n", "3", "--max-new-tokens", "6", "--judge-n", "6", "--json")
    res = json.loads(p.stdout)
    for row in res["speakers"].values():
        for k in (
            "ppl_finetuned",
            "ppl_in_context",
            "ppl_base",
            "ppl_hybrid",
            "speaker_id_real",
            "speaker_id_finetuned",
            "speaker_id_in_context",
            "ppl_ratio",
            "ppl_ratio_ci",
            "speaker_auc_real",
            "judge_acc_finetuned",
            "judge_acc_in_context",
            "copy_rate_finetuned",
            "copy_rate_real",
            "repeat_rate_finetuned",
            "repeat_rate_real",
            "distinct_finetuned",
        ):
            assert k in row
        assert row["ppl_ratio"] == pytest.approx(row["ppl_finetuned"] / row["ppl_in_context"])
        lo, hi = row["ppl_ratio_ci"]
        assert lo <= row["ppl_ratio"] <= hi
        assert row["n"] == 3
    every = json.loads(cli("eval", tiny_run, "--n", "0", "--no-generate", "--json").stdout)
    assert every["n_examples"] >= res["n_examples"]


def test_converse_and_compare(tiny_run):
    out = cli("converse", tiny_run, "--turns", "2", "--max-new-tokens", "6", "--seed", "1").stdout
    assert len(out.strip().splitlines()) >= 3
    cli("compare", tiny_run, "--n", "1", "--max-new-tokens", "6", "--json")
    cli("compare", tiny_run, "--n", "1", "--max-new-tokens", "6", "--json", "--allow-copy")


def test_plain_prompts_never_contain_speaker_tokens(tiny_run):
    """The base / in-context baselines read plain-text tags: the run's tokenizer must not turn "[Name]" (or a
    message that quotes it) into the speaker token, whose row the base model never learned."""
    from transformers import AutoTokenizer
    from convsim.data.examples import build_examples, render
    from convsim.data.schema import Message
    from convsim.evaluation.incontext import Retriever, incontext_prompt, plain
    from convsim.runs import open_run

    run = open_run(tiny_run)
    tok = AutoTokenizer.from_pretrained(str(run.path / "tokenizer"))
    special = set(run.meta.speaker_token_ids.values())
    pfmt = plain(run.fmt)
    exs = build_examples(run.split("train"), run.targets, 8, 8)
    e = exs[0]
    quoted = list(e.context) + [Message(e.context[-1].speaker, f"did you say [{e.speaker}]?")]
    ids = render(tok, pfmt, quoted, e.speaker, e.reply).input_ids
    assert not special & set(ids)
    ic = incontext_prompt(tok, pfmt, e.context, e.speaker, Retriever(exs).top(e.context, e.speaker, k=5), 512)
    assert not special & set(ic)
    assert special & set(render(tok, run.fmt, e.context, e.speaker, e.reply).input_ids)  # the run's own format does


def test_nll_computes_the_head_only_on_the_reply_but_scores_the_same(tiny_run):
    import torch
    from convsim.evaluation.evaluate import nll
    from convsim.runs import open_run

    model, tok = open_run(tiny_run).load()
    prompt, reply = [2, 11, 12, 13, 14, 15], [16, 17, 18, 19]
    mask = [1, 1, 0, 1]
    s, c = nll(model, prompt, reply, mask)
    with torch.inference_mode():
        full = torch.log_softmax(model(input_ids=torch.tensor([prompt + reply])).logits[0].float(), -1)
    want = -sum(full[len(prompt) - 1 + i, t].item() for i, (t, m) in enumerate(zip(reply, mask)) if m)
    assert c == 3 and abs(s - want) < 1e-3

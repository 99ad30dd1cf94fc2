"""The copy guard on a trained tiny run: generation never completes a span of its training text, and the
commands use it unless told `--allow-copy`."""

import json

from convsim.inference.generate import greedy_ids
from convsim.inference.nocopy import CopyIndex, NoCopy, for_run
from convsim.runs import open_run
from tests.conftest import cli


def test_a_guarded_model_never_repeats_a_span_it_would_otherwise_copy(tiny_run):
    run_ = open_run(tiny_run)
    model, tok = run_.load()
    ids = tok("[Ana] hello there\n[Ben]", add_special_tokens=False)["input_ids"]
    free = greedy_ids(model, ids, 24)
    # make what the model writes unguarded the "training data": the guard must then steer it elsewhere
    guard = CopyIndex.from_ids([free])
    assert guard.copies(free)
    guarded = greedy_ids(model, ids, 24, [NoCopy(guard, len(ids))])
    assert guarded != free and not guard.copies(guarded)
    # the run's own guard holds every span of its training messages (extra data included)
    index = for_run(run_, tok)
    msg = next(m.text for c in run_.split("train") for m in c.messages if len(m.text.split()) >= 6)
    assert index.copies(tok(" " + msg.strip() + "\n", add_special_tokens=False)["input_ids"])


def test_commands_guard_by_default_and_allow_copy_turns_it_off(tiny_run, tmp_path):
    h = tmp_path / "h.txt"
    h.write_text("[Ben] hi\n")
    for extra in ([], ["--allow-copy"]):
        out = cli("reply", tiny_run, "--as", "Ana", "--history", h, "--temperature", "0", "--json", *extra)
        assert "replies" in json.loads(out.stdout)
    res = tmp_path / "eval.json"
    cli("eval", tiny_run, "--n", "2", "--judge-n", "0", "--max-new-tokens", "6", "--out", res)
    assert json.loads(res.read_text())["copy_guard"] is True
    cli("eval", tiny_run, "--n", "2", "--judge-n", "0", "--max-new-tokens", "6", "--allow-copy", "--out", res)
    assert json.loads(res.read_text())["copy_guard"] is False

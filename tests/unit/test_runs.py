"""run.json through `RunMeta`: one set of defaults, and run dirs written before it existed still load.

`tests/data/runs/run-before-runmeta.json` is a run.json written by `convsim train` (tiny-llama, 2 steps) with
the code from before run.json was typed; the older record below lacks the keys added since.

    pytest tests/unit/test_runs.py        # well under a second, no model
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from convsim.errors import UserError
from convsim.runs import RunMeta, open_run, read_meta, write_meta

BEFORE = Path(__file__).parents[1] / "data" / "runs" / "run-before-runmeta.json"
OLDER = {
    "model": "tiny-llama",
    "prompt_style": "base",
    "special_tokens": True,
    "speakers": ["Ana", "Ben"],
    "speaker_token_ids": {"Ana": 4096, "Ben": 4097},
    "split": {"train": ["c0"], "val": [], "test": ["c1"]},
    "status": "done",
    "adapter_hash": "abc",
    "some_future_key": [1, 2],
}


def run_dir(tmp_path, meta: dict) -> Path:
    d = tmp_path / "run"
    (d / "adapter").mkdir(parents=True)
    (d / "adapter" / "adapter_config.json").write_text("{}")
    (d / "run.json").write_text(json.dumps(meta, indent=2))
    return d


def test_a_run_written_before_runmeta_loads_and_writes_back_unchanged(tmp_path):
    raw = json.loads(BEFORE.read_text())
    run = open_run(run_dir(tmp_path, raw))
    m = run.meta
    assert isinstance(m, RunMeta)
    assert (m.model, m.speakers, m.context_size, m.max_burst, m.global_step) == ("tiny-llama", ["Ana", "Ben"], 8, 8, 2)
    assert run.targets == ["Ana", "Ben"]
    assert run.fmt.style == "base" and run.fmt.special_tokens and run.fmt.chat_template is None
    assert run.adapter_hash == raw["adapter_hash"]
    assert m.to_json() == raw and list(m.to_json()) == list(raw)  # same keys, same order, same values
    (tmp_path / "again").mkdir()
    write_meta(tmp_path / "again", m)
    assert json.loads((tmp_path / "again" / "run.json").read_text()) == raw


def test_an_older_run_gets_the_defaults_and_keeps_unknown_keys(tmp_path):
    run = open_run(run_dir(tmp_path, OLDER))
    m = run.meta
    assert (m.context_size, m.max_burst, m.loss, m.extra_data, m.chat_template) == (8, 8, "reply", None, None)
    assert run.targets == ["Ana", "Ben"]  # no targets recorded: every speaker
    assert not run.is_extra(type("C", (), {"id": "x0:c9"})())
    assert m.other == {"some_future_key": [1, 2]}
    assert m.to_json()["some_future_key"] == [1, 2]
    assert m.get("context_size") == 8 and m["speaker_token_ids"]["Ana"] == 4096 and m.get("nothing", 3) == 3


def test_a_run_still_training_has_no_results_yet():
    m = RunMeta.from_json({k: v for k, v in OLDER.items() if k != "status"})
    assert m.status == "training"
    written = m.to_json()
    assert "adapter_hash" not in written and "global_step" not in written and "chat_template" not in written


@pytest.mark.parametrize("bad", ["[]", '{"model": "x"}', "not json"])
def test_a_broken_run_json_is_a_user_error(tmp_path, bad):
    d = tmp_path / "r"
    d.mkdir()
    (d / "run.json").write_text(bad)
    with pytest.raises(UserError):
        read_meta(d)

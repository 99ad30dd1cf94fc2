"""bench/fidelity_suite.py's own logic: which pairs, the seeded draw, the selection rule and the summary."""

import importlib.util
import json
from pathlib import Path

import pytest

SUITE = Path(__file__).parents[2] / "bench" / "fidelity_suite.py"
spec = importlib.util.spec_from_file_location("fidelity_suite", SUITE)
suite = importlib.util.module_from_spec(spec)
spec.loader.exec_module(suite)


def _chat(*senders):
    return {"messages": [[{"sender": s, "text": "hi", "timestamp": "2018-01-01T00:00:00"}] for s in senders]}


def test_pairs_are_two_person_chats_above_the_threshold_and_the_draw_is_seeded():
    a, b, c = "aaaaaaaa-1", "bbbbbbbb-2", "cccccccc-3"
    chats = {"1": _chat(a, b, a), "2": _chat(b, a), "3": _chat(a, c), "4": _chat(a, b, c)}
    pairs = suite.find_pairs(chats, min_messages=3)
    assert pairs == {("aaaaaaaa", "bbbbbbbb"): ["1", "2"]}  # 5 messages; a-c has 2; chat 4 has three people
    many = [(f"p{i:02d}", f"q{i:02d}") for i in range(13)]
    dev, rep = suite.draw(many)
    assert (dev, rep) == suite.draw(list(reversed(many)))  # the draw depends on the seed, not the order given
    assert len(dev) == suite.N_DEV and len(rep) == 13 - suite.N_DEV and not set(dev) & set(rep)


def _run(work, pair, recipe, loss, seed=0, val=50):
    d = work / "runs" / f"{pair}--{recipe}--s{seed}"
    d.mkdir(parents=True)
    (d / "run.json").write_text(json.dumps({"eval_loss": loss, "status": "done", "examples": {"val": val}}))
    return d


def test_selection_rule(tmp_path):
    dev = ["d1", "d2"]
    (tmp_path / "plan.json").write_text(json.dumps({"development_pairs": dev}))
    for pair in dev:
        _run(tmp_path, pair, "old-default", 3.0)
        _run(tmp_path, pair, "ctx16-extra-e2-b32", 2.80)
        _run(tmp_path, pair, suite.CHEAPER, 2.805)  # within the margin: the cheaper recipe wins
    assert suite.select(tmp_path)["chosen"] == suite.CHEAPER
    for pair in dev:
        (tmp_path / "runs" / f"{pair}--{suite.CHEAPER}--s0" / "run.json").write_text(json.dumps({"eval_loss": 2.9}))
    assert suite.select(tmp_path)["chosen"] == "ctx16-extra-e2-b32"


def test_round_two_replaces_the_default_only_beyond_the_margin(tmp_path):
    dev = ["d1", "d2"]
    (tmp_path / "plan.json").write_text(json.dumps({"development_pairs": dev}))
    round1 = {"chosen": "ctx16-extra-e2-b32", "mean_validation_loss": {"ctx16-extra-e2-b32": 2.78}}
    runs1 = [{"pair": pair, "recipe": "ctx16-extra-e2-b32", "examples": {"val": 50}} for pair in dev]
    a, b = suite.ROUND2
    for pair in dev:
        _run(tmp_path, pair, a, 2.775)  # better, but within the margin: not told apart from another card
        _run(tmp_path, pair, b, 2.79)
    out = suite.select2(tmp_path, round1, runs1)
    assert out["best_candidate"] == a and out["chosen"] == suite.DEFAULT and out["flags"] == []
    for pair in dev:
        run = tmp_path / "runs" / f"{pair}--{b}--s0" / "run.json"
        run.write_text(json.dumps({"eval_loss": 2.70, "examples": {"val": 50}}))
    out = suite.select2(tmp_path, round1, runs1)
    assert out["chosen"] == b and out["flags"] == suite.RECIPES[b] and out["validation_examples"]["same"]
    assert json.loads((tmp_path / "selection2.json").read_text())["chosen"] == b
    # the same candidates against a round 1 measured on other validation examples: no baseline, default stays
    other = [dict(r, examples={"val": 60}) for r in runs1]
    out = suite.select2(tmp_path, round1, other)
    assert out["chosen"] == suite.DEFAULT and out["flags"] == [] and "why" in out


def test_round_three_compares_with_the_default_on_the_same_data(tmp_path):
    dev = ["d1", "d2"]
    (tmp_path / "plan.json").write_text(json.dumps({"development_pairs": dev}))
    for pair in dev:
        _run(tmp_path, pair, "pair2", 2.70)
    with pytest.raises(SystemExit, match="default"):
        suite.select3(tmp_path)  # no baseline yet
    for pair in dev:
        _run(tmp_path, pair, suite.DEFAULT, 2.715)
        _run(tmp_path, pair, "lr5e-4-best", 2.90)
        _run(tmp_path, pair, "pair2-lr5e-4-best", 2.50, val=60)  # better, but held out other examples
    out = suite.select3(tmp_path)  # 0.015 better than the default on the same data: beyond the margin
    assert out["best_candidate"] == "pair2" and out["chosen"] == "pair2" and out["flags"] == ["--pair-repeat", "2"]
    assert out["left_out_other_data"] == ["pair2-lr5e-4-best"]
    for pair in dev:
        run = tmp_path / "runs" / f"{pair}--default--s0" / "run.json"
        run.write_text(json.dumps({"eval_loss": 2.705, "examples": {"val": 50}}))
    out = suite.select3(tmp_path)  # 0.005 better: within the margin, the default stays
    assert out["best_candidate"] == "pair2" and out["chosen"] == suite.DEFAULT and out["flags"] == []


def test_job_steps_given_together_share_one_pool(tmp_path, monkeypatch):
    plan = {"development_pairs": ["d1"], "report_pairs": ["r1", "r2"], "seeded_pairs": ["r1"]}
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    pools = []
    monkeypatch.setattr(suite, "_jobs", lambda work, parallel, jobs: pools.append((parallel, jobs)))
    assert suite.main(["report", "dev2", "--work", str(tmp_path), "--parallel", "6", "--recipe", "default"]) == 0
    assert len(pools) == 1 and pools[0][0] == 6
    jobs = pools[0][1]
    assert ("eval", "r2", "default", 0) in jobs and ("eval", "r1", "default", 2) in jobs
    assert {(pair, r) for kind, pair, r, s in jobs if kind == "train"} == {("d1", r) for r in suite.ROUND2}


def _row(ratio, judge_ft, judge_ic, copy_ft, copy_real_ci, rep_ft, rep_real_ci):
    return {
        "n": 10,
        "ppl_ratio": ratio,
        "ppl_ratio_ci": [ratio - 0.05, ratio + 0.05],
        "ppl_finetuned": 10,
        "ppl_in_context": 10 / ratio,
        "judge_acc_finetuned": judge_ft,
        "judge_acc_in_context": judge_ic,
        "speaker_auc_real": 0.8,
        "copy_rate_finetuned": copy_ft,
        "copy_rate_real": 0.0,
        "copy_rate_real_ci": copy_real_ci,
        "repeat_rate_finetuned": rep_ft,
        "repeat_rate_real": 0.0,
        "repeat_rate_real_ci": rep_real_ci,
    }


def test_summary_counts_goals_on_the_report_set_only(tmp_path):
    plan = {
        "report_pairs": ["r1", "r2"],
        "development_pairs": ["d1"],
        "seeded_pairs": ["r1"],
        "people_in_both_sets": [],
    }
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    evals = {
        ("r1", 0): {
            "A": _row(0.7, 0.6, 0.8, 0.0, [0.0, 0.1], None, [0.0, 0.02]),
            "B": _row(0.85, 0.7, 0.9, 0.2, [0.0, 0.1], 0.0, [0.0, 0.02]),
        },
        ("r1", 1): {"A": _row(0.74, 0.6, 0.8, 0.0, [0.0, 0.1], 0.0, [0.0, 0.02])},
        ("r2", 0): {"C": _row(0.75, 0.5, 0.7, 0.0, [0.0, 0.1], 0.0, [0.0, 0.02])},
        ("d1", 0): {"D": _row(1.5, 0.99, 0.5, 0.9, [0.0, 0.1], 0.5, [0.0, 0.02])},
    }
    for (pair, seed), speakers in evals.items():
        d = tmp_path / "runs" / f"{pair}--ctx16-extra-e2-b32--s{seed}"
        d.mkdir(parents=True)
        (d / "eval.json").write_text(json.dumps({"speakers": speakers}))
    res = suite.summarize(tmp_path, "abc", "card", "cmd")
    s = res["summary"]
    assert s["report_speakers"] == 3 and s["report_pairs_done"] == 2
    assert s["median_ratio"] == pytest.approx(0.75) and s["worst_ratio"] == pytest.approx(0.85)
    assert s["share_ratio_le_0.8"] == pytest.approx(2 / 3)
    assert s["share_copy_within_real"] == pytest.approx(2 / 3)  # B copies more than real replies' interval
    assert s["share_repeat_within_real"] == 1.0  # no follow-up message at all counts as no repeat
    assert s["goals"]["no ratio above 0.9"] and not s["goals"]["share_ratio_le_0.8 >= 0.8"]
    assert s["seed_spread"]["r1/A"]["range"] == pytest.approx(0.04)
    assert {r["set"] for r in res["speakers"]} == {"report", "development"}


def test_the_report_set_trains_with_no_flags_and_the_defaults_are_the_chosen_recipe():
    from convsim.config import TrainConfig

    assert suite.RECIPES[suite.DEFAULT] == [] and suite.DEFAULT not in suite.DEV_RECIPES
    flags = suite.RECIPES[suite.CHOSEN]
    want = {flags[i].lstrip("-").replace("-", "_"): float(flags[i + 1]) for i in range(0, len(flags), 2)}
    cfg = TrainConfig()
    assert {k: float(getattr(cfg, k)) for k in want} == want
    assert cfg.auto_extra_data  # the data dir's extra/ is used with no flag, as the recipe used it


def test_failed_runs_start_again_from_nothing_fewer_at_a_time(tmp_path, monkeypatch):
    calls = []

    def fake(*args, log, env=None):
        run = Path(args[args.index("--out") + 1]) if args[0] == "train" else Path(args[1])
        calls.append((args[0], run.name, "--continue-training" in args))
        if args[0] == "train":
            run.mkdir(parents=True, exist_ok=True)
            first = sum(c[1] == run.name for c in calls) == 1
            if first and run.name.startswith("b"):  # b's first try dies (out of memory) leaving a partial run
                (run / "run.json").write_text(json.dumps({"status": "training"}))
                return 2
            (run / "run.json").write_text(json.dumps({"status": "done"}))
        else:
            (run / "eval.json").write_text("{}")
        return 0

    monkeypatch.setattr(suite, "convsim", fake)
    jobs = [("eval", "a-a", "default", 0), ("eval", "b-b", "default", 0)]
    suite._jobs(tmp_path, 3, jobs)
    b = [c for c in calls if c[1].startswith("b")]
    assert b == [
        ("train", "b-b--default--s0", False),
        ("train", "b-b--default--s0", False),
        ("eval", "b-b--default--s0", False),
    ]
    assert (tmp_path / "runs" / "b-b--default--s0" / "eval.json").exists()


def test_a_pair_without_seed_0_counts_by_its_lowest_finished_seed_in_summary_table_and_figure(tmp_path):
    plan = {"report_pairs": ["r1", "r2", "r3"], "development_pairs": [], "seeded_pairs": [], "people_in_both_sets": []}
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    evals = {
        ("r1", 0): {"A": _row(0.7, 0.6, 0.8, 0.0, [0.0, 0.1], 0.0, [0.0, 0.02])},
        ("r2", 1): {"B": _row(0.9, 0.6, 0.8, 0.0, [0.0, 0.1], 0.0, [0.0, 0.02])},
        ("r2", 2): {"B": _row(0.8, 0.6, 0.8, 0.0, [0.0, 0.1], 0.0, [0.0, 0.02])},
    }
    for (pair, seed), speakers in evals.items():
        d = tmp_path / "runs" / f"{pair}--default--s{seed}"
        d.mkdir(parents=True)
        (d / "eval.json").write_text(json.dumps({"speakers": speakers}))
    res = suite.summarize(tmp_path, "abc", "card", "cmd")
    s = res["summary"]
    assert s["report_pairs_missing"] == ["r3"] and s["report_pairs_not_seed_0"] == ["r2"]
    assert s["worst_ratio"] == pytest.approx(0.9)  # seed 1, not the better seed 2
    table = suite.markdown_table(res).splitlines()
    assert len(table) == 4 and "| r1 | A |" in table[2] and "| r2 (seed 1) | B |" in table[3]
    suite.figure(res, tmp_path / "f.png")
    assert (tmp_path / "f.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cpu_round_picks_the_lowest_mean_loss_and_runs_first(tmp_path, monkeypatch):
    dev = ["d1", "d2"]
    (tmp_path / "plan.json").write_text(json.dumps({"development_pairs": dev, "report_pairs": [], "seeded_pairs": []}))
    names = list(suite.CPU_ROUND)
    for pair in dev:
        for i, r in enumerate(names):
            _run(tmp_path, pair, r, 3.0 - 0.1 * (i == 2))
    out = suite.select_cpu(tmp_path)
    assert out["chosen"] == names[2] and out["flags"] == suite.CPU_ROUND[names[2]]
    assert all("--train-tokens" in f for f in suite.CPU_ROUND.values())
    pools = []
    monkeypatch.setattr(suite, "_jobs", lambda work, parallel, jobs: pools.append(jobs))
    suite.main(["dev3", "cpu1", "--work", str(tmp_path)])
    assert [r for _, _, r, _ in pools[0][: len(dev) * len(names)]] == [r for r in names for _ in dev]

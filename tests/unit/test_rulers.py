"""The evaluation rulers: copying, repetition, diversity, intervals, speaker AUC and the judge."""

import math

import pytest

from convsim.evaluation import rulers
from convsim.inference.bursts import without_repeats


def test_copy_rate_finds_an_eight_token_span_within_one_message():
    index = rulers.span_index(["the quick brown fox jumps over the lazy dog today", "short one"])
    assert rulers.copies(["well, the quick brown fox jumps over the lazy dog!"], index)
    assert not rulers.copies(["the quick brown fox jumps over the", "lazy dog today"], index)  # spans never cross
    assert not rulers.copies(["quick brown fox"], index)
    assert rulers.copy_rate([["the quick brown fox jumps over the lazy dog"], ["no"], []], index) == 0.5


def test_repeat_rate_counts_identical_consecutive_messages():
    bursts = [["hi", "Hi ", "hi"], ["ok"], ["a", "b"]]
    assert rulers.repeat_flags(bursts) == [1.0, 1.0, 0.0]
    assert rulers.repeat_rate(bursts) == pytest.approx(2 / 3)
    assert rulers.repeat_rate([["one"], ["two"]]) is None


def test_generation_ends_a_burst_where_a_message_repeats():
    assert without_repeats(["hey", "you there?", "You there? ", "hello"]) == ["hey", "you there?"]
    assert without_repeats(["a", "b", "a"]) == ["a", "b", "a"]


def test_distinct_n():
    assert rulers.distinct_n([["a b a b"]], 1) == 0.5
    assert rulers.distinct_n([["a b a b"]], 2) == pytest.approx(2 / 3)
    assert rulers.distinct_n([[]], 1) is None


def test_ppl_ratio_and_its_interval():
    # two examples, 2 and 3 tokens; fine-tuned NLL lower by 0.5 nats a token everywhere
    ft, ic, n = [2.0, 3.0], [3.0, 4.5], [2, 3]
    assert rulers.ppl_ratio(ft, ic, n) == pytest.approx(math.exp(-0.5))
    lo, hi = rulers.bootstrap_ppl_ratio_ci(ft, ic, n, n_boot=200)
    assert lo == pytest.approx(math.exp(-0.5)) and hi == pytest.approx(math.exp(-0.5))
    lo, hi = rulers.bootstrap_ppl_ratio_ci([1.0, 5.0, 2.0, 9.0], [3.0, 3.0, 3.0, 3.0], [2, 2, 2, 2], n_boot=500)
    assert lo < rulers.ppl_ratio([1.0, 5.0, 2.0, 9.0], [3.0] * 4, [2] * 4) < hi


def test_bootstrap_mean_ci_brackets_the_mean():
    lo, hi = rulers.bootstrap_mean_ci([0, 1] * 50, n_boot=500)
    assert lo < 0.5 < hi and hi - lo < 0.3
    assert rulers.bootstrap_mean_ci([]) is None


def test_speaker_auc_separates_two_distinct_writers():
    ana = [f"haha yes {i} lol" for i in range(30)]
    ben = [f"Indeed, quite so; item {i}." for i in range(30)]
    clf = rulers.speaker_classifier(ana + ben, ["Ana"] * 30 + ["Ben"] * 30)
    held = {"Ana": [["haha lol ok"], ["yes lol"]], "Ben": [["Indeed, quite."], ["So; indeed."]]}
    assert rulers.speaker_auc(clf, held, "Ana") == 1.0
    assert rulers.speaker_auc(clf, {"Ana": held["Ana"]}, "Ana") is None


def test_judge_tells_looping_replies_from_real_ones_and_not_copies():
    real = [[f"sure, see you at {i} then"] for i in range(40)]
    looping = [["5 5 5 5 5 5 5", "5 5 5 5 5 5 5"] for _ in range(40)]
    ctx = [["when?"]] * 40
    acc, flags = rulers.judge_accuracy((ctx[:30], real[:30], looping[:30]), (ctx[30:], real[30:], looping[30:]))
    assert acc == 1.0 and len(flags) == 10
    same, _ = rulers.judge_accuracy((ctx[:30], real[:30], real[:30]), (ctx[30:], real[30:], real[30:]))
    assert same == 0.5  # identical replies: every held-out pair is a tie
    assert rulers.judge_accuracy((ctx[:2], real[:2], real[:2]), (ctx, real, real)) == (None, [])

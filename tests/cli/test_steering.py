"""Steering vectors on tiny random models: the value type, building, the steer() context manager, and
`convsim steer build/sweep` end to end on the tiny run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import cli
from convsim.errors import UserError
from convsim.modeling.models import load
from convsim.steering.apply import active_hooks, apply_steer_arg, generate_with_steering, parse_steer_arg, steer
from convsim.steering.build import (
    from_pairs,
    from_phrases,
    from_texts,
    generate_steering_vector,
    pooled_states,
    sentiment_texts,
)
from convsim.steering.vectors import SteeringVector, model_key

HAPPY = {"i feel happy": 0.25, "i feel sad": -0.25, "life is amazing": 0.25, "life is terrible": -0.25}
EXAMPLE = Path(__file__).parents[2] / "examples" / "steer-happy.yaml"


@pytest.fixture(scope="module")
def tiny():
    return load("tiny-llama", device="cpu")


@pytest.fixture(scope="module")
def vec(tiny):
    model, tok = tiny
    return from_phrases(model, tok, HAPPY, layers=-1)


def greedy(model, tok, text="hey how are you", n=8):
    x = tok(text, return_tensors="pt")
    with torch.inference_mode():
        return model.generate(**x, max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id)[0].tolist()


def logits(model, ids):
    with torch.inference_mode():
        return model(input_ids=torch.tensor([ids])).logits[0]


def test_strength_zero_is_identical_and_strength_changes_output(tiny, vec):
    model, tok = tiny
    plain = greedy(model, tok)
    with steer(model, vec, 0.0):
        assert greedy(model, tok) == plain
    ids = tok("hey how are you")["input_ids"]
    base = logits(model, ids)
    with steer(model, vec, 0.0):
        assert torch.equal(logits(model, ids), base)
    with steer(model, vec * (50 / vec.norms()[1]), 1.0):
        steered = logits(model, ids)
    assert not torch.allclose(steered, base)
    assert torch.equal(logits(model, ids), base)
    assert active_hooks(model) == 0


def test_hooks_removed_after_exception(tiny, vec):
    model, _ = tiny
    with pytest.raises(RuntimeError, match="boom"):
        with steer(model, vec, 3.0, layers=[0, 1]):
            assert active_hooks(model) == 2
            raise RuntimeError("boom")
    assert active_hooks(model) == 0


def test_positions_new_leaves_prompt_pass_alone(tiny, vec):
    model, tok = tiny
    big = vec * (50 / vec.norms()[1])
    ids = tok("hey how are you")["input_ids"]
    base = logits(model, ids)
    with steer(model, big, 1.0, positions="new"):
        assert torch.equal(logits(model, ids), base)
        one = logits(model, ids[:1])  # a one-token pass is a decode step: steered
    assert not torch.allclose(one, base[:1])
    with steer(model, big, 1.0, positions="all"):
        assert not torch.allclose(logits(model, ids), base)
    with steer(model, big, 1.0, positions=3):  # teacher-forcing form of "new": from position 3 on
        part = logits(model, ids)
    assert torch.equal(part[:3], base[:3]) and not torch.allclose(part[3:], base[3:])


def test_arithmetic_and_roundtrip(tiny, vec, tmp_path):
    model, tok = tiny
    other = from_phrases(model, tok, {"great": 1.0, "awful": -1.0}, layers=[0, 1])
    s = vec + other
    assert s.layers == [0, 1]
    assert torch.allclose(s.directions[1], vec.directions[1] + other.directions[1])
    assert torch.allclose(s.directions[0], other.directions[0])  # missing layer counts as zero
    assert torch.allclose((s - other).directions[1], vec.directions[1], atol=1e-6)
    assert torch.allclose((2 * vec).directions[1], vec.directions[1] * 2)
    assert torch.allclose((vec * 2).directions[1], (-vec * -2).directions[1])
    assert torch.allclose((vec / 2).directions[1], vec.directions[1] / 2)
    path = tmp_path / "v.safetensors"
    s.save(path)
    back = SteeringVector.load(path)
    assert back.metadata() == s.metadata()
    assert all(torch.equal(back.directions[k], s.directions[k]) for k in s.layers)
    assert vec.metadata()["info"]["phrases"] == HAPPY and vec.method == "phrases"
    assert vec.metadata()["hook"] == "decoder_layer_output"
    with open(path, "rb") as f:  # safetensors: JSON header, no pickle
        n = int.from_bytes(f.read(8), "little")
        assert "convsim-steering-vector/1" in json.loads(f.read(n))["__metadata__"]["convsim"]


def test_bad_files_are_user_errors(tmp_path):
    (tmp_path / "x.safetensors").write_bytes(b"not a tensor file")
    with pytest.raises(UserError, match="not a safetensors"):
        SteeringVector.load(tmp_path / "x.safetensors")
    with pytest.raises(UserError, match="not found"):
        SteeringVector.load(tmp_path / "missing.safetensors")
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(3)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(UserError, match="not a convsim steering vector"):
        SteeringVector.load(tmp_path / "other.safetensors")


def test_mismatched_model_is_refused(tiny, vec):
    model, tok = tiny
    gemma, _ = load("tiny-gemma3", device="cpu")
    with pytest.raises(UserError, match="base model"):
        with steer(gemma, vec, 1.0):
            pass
    wrong = SteeringVector({0: torch.ones(32)}, vec.model, 32, 2)
    with pytest.raises(UserError, match="hidden size 64"):
        wrong.check_fits(model)
    deeper = SteeringVector({0: torch.ones(64)}, vec.model, 64, 4)
    with pytest.raises(UserError, match="2 decoder layers"):
        deeper.check_fits(model)
    with pytest.raises(UserError, match="different models"):
        _ = vec + SteeringVector({0: torch.ones(64)}, "other-model", 64, 2)
    with pytest.raises(UserError, match="out of range"):
        from_phrases(model, tok, HAPPY, layers=-5)
    assert active_hooks(gemma) == 0


def test_pooling_ignores_padding_and_prefix(tiny):
    model, tok = tiny
    alone = pooled_states(model, tok, ["hi"], [1])[1]
    batched = pooled_states(model, tok, ["hi", "this is a much longer sentence than the other"], [1])[1]
    assert torch.allclose(alone[0], batched[0], atol=1e-5)
    last = pooled_states(model, tok, ["hi", "this is a much longer sentence"], [1], pool="last")[1]
    assert torch.allclose(last[0], pooled_states(model, tok, ["hi"], [1], pool="last")[1][0], atol=1e-5)
    with_prefix = pooled_states(model, tok, ["hi"], [1], prefix=[5, 6])[1]
    assert not torch.allclose(with_prefix, alone)


def test_pairs_texts_and_sentiment(tiny):
    model, tok = tiny
    pairs = [("i feel happy", "i feel sad"), ("so great", "so bad"), ("love it", "hate it")]
    mean = from_pairs(model, tok, pairs, layers=1, method="mean")
    pca = from_pairs(model, tok, pairs, layers=1, method="pca")
    assert torch.dot(mean.directions[1], pca.directions[1]) > 0  # sign-aligned
    assert mean.method == "pairs-mean" and pca.method == "pairs-pca"
    t = from_texts(model, tok, [p for p, _ in pairs], [n for _, n in pairs], layers=1)
    assert torch.allclose(t.directions[1], mean.directions[1], atol=1e-5)  # mean pool is linear
    from convsim.data.schema import Message

    msgs = [
        Message("A", x)
        for x in ["i love this, great!", "ok", "this is terrible and sad", "happy day", "awful awful", "the bus"]
    ]
    pos, neg = sentiment_texts(msgs, k=2)
    assert [m.text for m in pos] == ["i love this, great!", "happy day"]
    assert {m.text for m in neg} == {"this is terrible and sad", "awful awful"}


def test_seed_api_and_steer_arg(tiny, tmp_path):
    model, tok = tiny
    v = generate_steering_vector(model, tok, HAPPY, pos_alpha=1.0, neg_alpha=1.0, layer_from_last=-1)
    assert v.layers == [1] and v.model == model_key(model)
    text = generate_with_steering(model, "hey", tok, v, layer_from_last=-2, max_new_tokens=4, temperature=0)
    assert isinstance(text, str)
    text2 = generate_with_steering(
        model, "hey", tok, v.directions[1], layer_from_last=-1, max_new_tokens=4, temperature=0
    )
    assert isinstance(text2, str) and active_hooks(model) == 0
    path = tmp_path / "happy.safetensors"
    v.save(path)
    got, s = parse_steer_arg(f"{path}:4.5")
    assert s == 4.5 and got.layers == [1]
    assert parse_steer_arg(str(path))[1] == 1.0
    with apply_steer_arg(model, f"{path}:-2"):
        assert active_hooks(model) == 1
    assert active_hooks(model) == 0
    with pytest.raises(UserError, match="not found"):
        parse_steer_arg(f"{tmp_path}/nope.safetensors:3")


def test_example_yaml_is_a_phrase_set():
    from convsim.steering.files import PhraseSet, load_phrase_set

    ps = load_phrase_set(EXAMPLE)
    assert isinstance(ps, PhraseSet)
    assert ps.phrases["i feel happy"] == 0.25 and ps.phrases["i feel sad"] == -0.25
    assert ps.layer == -5 and ps.pool == "mean"


def test_suggested_strengths_scale_with_the_residual_stream(tiny, vec):
    from convsim.steering.vectors import suggest_strengths

    s = suggest_strengths(vec)
    ratio = vec.info["residual_norm"]["1"] / vec.norms()[1]
    assert len(s) == 4 and s == sorted(s) and abs(s[2] - 0.1 * ratio) < 0.01 * ratio
    assert suggest_strengths(vec * 2)[2] < s[2]


def test_peft_run_streaming_and_generation_steered(tiny_run):
    from convsim.data.schema import Message
    from convsim.inference.generate import SampleConfig, reply, stream_reply
    from convsim.runs import open_run

    run_ = open_run(tiny_run)
    model, tok = run_.load(device="cpu")
    assert hasattr(model, "get_base_model")  # PEFT-wrapped
    v = from_phrases(model, tok, HAPPY, layers=-1)
    v = v * (200 / v.norms()[1])
    hist = [Message("Ben", "Not bad. Working late again.")]
    cfg = SampleConfig(temperature=0, max_new_tokens=12)
    plain = reply(model, tok, run_.fmt, hist, "Ana", cfg)[0]
    with steer(model, v, 0.0):
        assert reply(model, tok, run_.fmt, hist, "Ana", cfg)[0] == plain
    with steer(model, v, 1.0):
        steered = reply(model, tok, run_.fmt, hist, "Ana", cfg)[0]
        streamed: dict[int, str] = {}
        for i, d in stream_reply(model, tok, run_.fmt, hist, "Ana", cfg):  # generate runs in a thread
            streamed[i] = streamed.get(i, "") + d
    assert [streamed[i] for i in sorted(streamed)] == steered
    assert steered != plain
    assert active_hooks(model) == 0


def test_cli_build_and_sweep(tiny_run, tmp_path):
    vec = tmp_path / "happy.safetensors"
    out = cli("steer", "build", tiny_run, "--phrases", EXAMPLE, "--layer", "-1", "--out", vec, "--json")
    summary = json.loads(out.stdout)
    assert summary["layers"] == [1] and summary["method"] == "phrases" and vec.exists()
    back = SteeringVector.load(vec)
    assert back.base_model == "tiny-llama" and back.adapter_hash != "none"
    sweep_dir = tmp_path / "sweep"
    out = cli(
        "steer",
        "sweep",
        tiny_run,
        vec,
        "--strengths",
        "4,40",
        "--n",
        "2",
        "--samples",
        "2",
        "--max-new-tokens",
        "6",
        "--positions",
        "all",
        "--out",
        sweep_dir,
        "--json",
    )
    res = json.loads(out.stdout)
    assert [r["strength"] for r in res["strengths"]] == [0.0, 4.0, 40.0]  # the baseline is always added
    assert res["strengths"][0]["ppl_ratio"] == 1.0 and res["layers"] == [1] and res["positions"] == "all"
    assert res["samples_per_context"] == 2 and res["strengths"][1]["ppl_ratio"] != 1.0
    data = json.loads((sweep_dir / "sweep.json").read_text())
    assert len(data["samples"]) == 2 and set(data["samples"][0]["replies"]) == {"0.0", "4.0", "40.0"}
    assert len(data["samples"][0]["replies"]["4.0"]) == 2
    assert (sweep_dir / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bad = cli("steer", "sweep", tiny_run, tmp_path / "missing.safetensors", check=False)
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error:") and "Traceback" not in bad.stderr


def test_cli_build_sources_in_process(tiny_run, tmp_path, capsys):
    from convsim.cli import main

    assert (
        main(
            [
                "steer",
                "build",
                str(tiny_run),
                "--from-data",
                "sentiment",
                "--layer",
                "-1",
                "--out",
                str(tmp_path / "s.safetensors"),
            ]
        )
        == 2
    )  # the synthetic chat has no negative messages
    assert "too few" in capsys.readouterr().err and not (tmp_path / "s.safetensors").exists()
    assert (
        main(
            [
                "steer",
                "build",
                str(tiny_run),
                "--from-data",
                "speakers",
                "--speaker",
                "Ben",
                "--layer=-1,0",
                "--out",
                str(tmp_path / "ben.safetensors"),
                "--json",
            ]
        )
        == 0
    )
    summary = json.loads(capsys.readouterr().out)
    assert summary["layers"] == [0, 1] and summary["method"] == "speakers"
    (tmp_path / "pairs.yaml").write_text("- [i feel happy, i feel sad]\n- {positive: so great, negative: so bad}\n")
    assert (
        main(
            [
                "steer",
                "build",
                str(tiny_run),
                "--pairs",
                str(tmp_path / "pairs.yaml"),
                "--method",
                "pca",
                "--layer",
                "1",
                "--speaker",
                "Ana",
                "--out",
                str(tmp_path / "p.safetensors"),
                "--json",
            ]
        )
        == 0
    )
    v = SteeringVector.load(tmp_path / "p.safetensors")
    assert v.method == "pairs-pca" and v.info["prefix_ids"] and v.info["residual_norm"]["1"] > 0
    assert (
        main(
            [
                "steer",
                "build",
                str(tiny_run),
                "--phrases",
                str(tmp_path / "pairs.yaml"),
                "--out",
                str(tmp_path / "x.safetensors"),
            ]
        )
        == 2
    )
    assert "expected a mapping" in capsys.readouterr().err


def test_normalized_scales_each_layer_to_a_fraction_of_its_residual_norm(tiny, tmp_path):
    model, tok = tiny
    v = from_phrases(model, tok, HAPPY, layers=[0, 1])
    n = v.normalized(0.05)
    for l in (0, 1):
        assert abs(n.norms()[l] - 0.05 * v.info["residual_norm"][str(l)]) < 1e-4 * v.info["residual_norm"][str(l)]
        assert torch.allclose(n.directions[l] / n.norms()[l], v.directions[l] / v.norms()[l], atol=1e-6)
    assert n.info["normalized"] == 0.05 and "normalized" not in v.info
    n.save(tmp_path / "n.safetensors")
    assert SteeringVector.load(tmp_path / "n.safetensors").info["normalized"] == 0.05
    with pytest.raises(UserError):
        v.normalized(0.0)
    with pytest.raises(UserError):
        (v - v).normalized(0.05)  # arithmetic drops the build record


def test_cli_build_normalize(tiny_run, tmp_path, capsys):
    from convsim.cli import main

    assert (
        main(
            [
                "steer",
                "build",
                str(tiny_run),
                "--phrases",
                str(EXAMPLE),
                "--layer=0,1",
                "--normalize",
                "0.1",
                "--out",
                str(tmp_path / "n.safetensors"),
                "--json",
            ]
        )
        == 0
    )
    v = SteeringVector.load(tmp_path / "n.safetensors")
    for l in (0, 1):
        assert abs(v.norms()[l] - 0.1 * v.info["residual_norm"][str(l)]) < 1e-3 * v.info["residual_norm"][str(l)]
    assert json.loads(capsys.readouterr().out)["norms"]

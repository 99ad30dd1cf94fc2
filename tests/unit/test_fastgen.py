"""convsim.inference.fastgen (the static-cache generation path) gives the same greedy tokens as plain
`generate`: on the CPU (`CONVSIM_FAST_GENERATE=any`; nothing is compiled there), across calls that reuse and
reset the kept cache, and when a reply crosses into a larger cache bucket.

    pytest tests/unit/test_fastgen.py
"""

import pytest
import torch

from convsim.inference import fastgen
from tests.conftest import tiny_trained_model


@pytest.fixture(scope="module")
def model():
    m, _, _ = tiny_trained_model(seed=3)  # tiny-gemma3: sliding-window and full-attention layers
    return m.eval()


def plain(model, ids, n):
    with fastgen.disabled():
        return fastgen.generate(model, ids, max_new_tokens=n, do_sample=False)


def test_fast_path_greedy_tokens_equal_plain_generate(model, monkeypatch):
    monkeypatch.setenv("CONVSIM_FAST_GENERATE", "any")
    assert fastgen.enabled(model) and not fastgen.enabled(model, batch=2)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(5, 200, (1, n), generator=g) for n in (7, 31, 12)]
    with torch.no_grad():
        for ids in prompts:  # the second and third calls reuse the first call's cache, reset
            want = plain(model, ids, 24)
            got = fastgen.generate(model, ids, max_new_tokens=24, do_sample=False)
            assert torch.equal(got, want), (ids.shape, got[0, ids.shape[1] :], want[0, ids.shape[1] :])
        caches = fastgen._base(model).__dict__["_convsim_static_caches"]
        assert list(caches) == [fastgen.BUCKET]  # one cache, kept and reused
        # a prompt that needs the next bucket: a second, larger cache
        ids = torch.randint(5, 200, (1, fastgen.BUCKET - 10), generator=g)
        want = plain(model, ids, 20)
        got = fastgen.generate(model, ids, max_new_tokens=20, do_sample=False)
        assert torch.equal(got, want)
        assert sorted(caches) == [fastgen.BUCKET, 2 * fastgen.BUCKET]
    assert not fastgen._broken


def test_fast_path_stays_off_on_the_cpu_unless_asked(model, monkeypatch):
    monkeypatch.delenv("CONVSIM_FAST_GENERATE", raising=False)
    assert not fastgen.enabled(model)
    monkeypatch.setenv("CONVSIM_FAST_GENERATE", "0")
    assert not fastgen.enabled(model)

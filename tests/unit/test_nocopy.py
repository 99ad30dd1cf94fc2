"""The copy guard's index and logits processor on hand-made token ids (no model)."""

import torch

from convsim.inference.nocopy import CopyIndex, NoCopy


def test_the_index_bans_exactly_the_tokens_that_complete_a_training_span():
    index = CopyIndex.from_ids([[1, 2, 3, 4, 5], [9, 2, 3, 4, 6]], span=4)
    assert index.banned([7, 2, 3, 4]) == {5, 6}  # only the last span - 1 tokens matter
    assert index.banned([3, 4]) == set()  # too short to complete a span
    assert index.banned([2, 3, 9]) == set()
    assert index.copies([0, 1, 2, 3, 4, 0]) and not index.copies([0, 2, 3, 4, 7])
    assert len(CopyIndex.from_ids([[1, 2]], span=4)) == 0  # a message shorter than a span adds nothing


def test_no_copy_masks_only_generated_tails_that_start_a_training_span():
    index = CopyIndex.from_ids([[1, 2, 3, 4]], span=3)
    proc = NoCopy(index, prompt_len=2)
    scores = torch.zeros(2, 6)
    # row 0's last two tokens (2, 3) lead into training token 4; row 1's (3, 3) lead nowhere
    out = proc(torch.tensor([[0, 0, 2, 3], [0, 0, 3, 3]]), scores.clone())
    assert out[0, 4] == float("-inf") and torch.isfinite(out[0, :4]).all() and torch.isfinite(out[0, 5])
    assert torch.isfinite(out[1]).all()
    # the same tail inside the prompt is not guarded: a reply may quote the conversation it answers
    assert torch.isfinite(proc(torch.tensor([[2, 3]]), torch.zeros(1, 6))).all()
    assert torch.isfinite(NoCopy(index, prompt_len=3)(torch.tensor([[0, 0, 2, 3]]), torch.zeros(1, 6))).all()

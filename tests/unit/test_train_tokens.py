"""An amount of work in tokens becomes optimizer steps: steps_for_tokens and the config's checks."""

import pytest

from convsim.config import TrainConfig
from convsim.errors import UserError
from convsim.training.recipe import steps_for_tokens


def test_tokens_become_steps_of_mean_length_rows():
    rows = [{"input_ids": [0] * 100}, {"input_ids": [0] * 300}]  # mean 200 tokens
    assert steps_for_tokens(8000, rows, per_step=8) == 5  # 8000 / (200 x 8)
    assert steps_for_tokens(100, rows, per_step=8) == 1  # never zero steps
    assert steps_for_tokens(10_000, [], per_step=8) == 1


def test_train_tokens_is_checked():
    with pytest.raises(UserError, match="train-tokens"):
        TrainConfig(train_tokens=0).validate()
    with pytest.raises(UserError, match="not both"):
        TrainConfig(train_tokens=1000, max_steps=5).validate()
    assert TrainConfig(train_tokens=1000).validate().train_tokens == 1000

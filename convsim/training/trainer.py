"""The trainer `convsim train` runs: TRL's SFTTrainer with the reply-only loss, validation batches in order,
a tokens-per-second log, and checkpoints written whole (`checkpoints.AtomicCheckpoints`).
"""

from __future__ import annotations

import time

from convsim.modeling.loss import reply_loss
from convsim.training.checkpoints import AtomicCheckpoints


def make_trainer_class():
    from trl import SFTTrainer

    class ConvsimTrainer(AtomicCheckpoints, SFTTrainer):
        """SFTTrainer whose loss computes the head at reply positions only."""

        _tokens = 0  # real (non-pad) tokens trained on since the last log, kept on the device
        _since = None

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if model.training:
                m = inputs.get("attention_mask")
                if m is None:  # padding-free: one row, padded at its end only up to a multiple of 8
                    m = inputs["input_ids"] != self.processing_class.pad_token_id
                self._tokens = self._tokens + m.sum()
            loss = reply_loss(model, inputs, num_items_in_batch)
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * self.accelerator.num_processes
            return (loss, {"loss": loss}) if return_outputs else loss

        def _get_eval_sampler(self, eval_dataset):
            """Validation batches in order, also when training batches are grouped by length: the same
            validation loss for the same weights, whatever the training sampler."""
            if self.args.world_size <= 1 and eval_dataset is not None:
                from torch.utils.data import SequentialSampler

                return SequentialSampler(eval_dataset)
            return super()._get_eval_sampler(eval_dataset)

        def log(self, logs, *args, **kwargs):
            """Adds `tokens_per_s`: real tokens trained per second (this process) since the last log."""
            import torch

            now = time.perf_counter()
            if "loss" in logs and self._since is not None and torch.is_tensor(self._tokens):
                logs["tokens_per_s"] = round(float(self._tokens) / (now - self._since), 1)
            if "loss" in logs or self._since is None:
                self._tokens, self._since = 0, now
            return super().log(logs, *args, **kwargs)

    return ConvsimTrainer

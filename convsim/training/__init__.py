"""`convsim train`: LoRA fine-tuning with one token per speaker and the loss on replies only."""

"""Model knowledge: the model table and loading, speaker tokens, the trainable-token forward, hidden states."""

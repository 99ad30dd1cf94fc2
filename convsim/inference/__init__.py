"""Generation: reply bursts that stop at the next speaker's token, streaming, the CUDA fast path."""

"""Steering vectors: the value (vectors), building one from hidden states (build), the hook that adds one
while the model runs (apply), and `convsim steer build|sweep` (cli, files, sweep)."""

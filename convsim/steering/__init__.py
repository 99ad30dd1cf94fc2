"""Steering vectors: the value type and the `steer()` hook (vectors), and `convsim steer build|sweep` (cli)."""

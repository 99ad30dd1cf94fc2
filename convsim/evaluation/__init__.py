"""Evaluation: how well a run simulates each person (rulers used by `convsim eval`)."""

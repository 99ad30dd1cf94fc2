"""Measuring a run: `convsim eval` (fine-tuned vs in-context vs base, per speaker) and `convsim compare`."""

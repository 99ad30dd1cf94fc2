"""Measuring a run: `convsim eval` (fine-tuned vs in-context vs base, per speaker, with the rulers in
`rulers.py`) and `convsim compare`."""

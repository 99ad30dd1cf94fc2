"""`convsim export`: a run as a standalone model directory for other engines."""

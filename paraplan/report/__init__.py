"""``paraplan report``: a self-contained HTML page with figures of a plan (pipeline timeline, memory per stage,
candidate space) and, given a run directory, of the run against the prediction."""

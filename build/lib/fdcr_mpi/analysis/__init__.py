"""Results across runs: the report (tables beside the paper's) and the figures."""

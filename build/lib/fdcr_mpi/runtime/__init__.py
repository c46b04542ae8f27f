"""Execution: the transport (one process or MPI), device binding, the round as SPMD code."""

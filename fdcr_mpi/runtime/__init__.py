"""Execution: the transport (one process or MPI), device binding, the server and worker loops."""

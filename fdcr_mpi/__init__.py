"""fdcr_mpi: MPI simulator for backdoor attacks and defenses in heterogeneous FL (FDCR)."""
__version__ = "0.1.0"

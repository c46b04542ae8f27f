"""fdcr_mpi: MPI simulator for backdoor attacks and defenses in heterogeneous FL (FDCR)."""
__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    """``fdcr_mpi.load_run`` and ``fdcr_mpi.load_sweep`` (pandas), imported when first used."""
    if name in ("load_run", "load_sweep"):
        from fdcr_mpi.analysis import frames

        return getattr(frames, name)
    raise AttributeError(f"module 'fdcr_mpi' has no attribute {name!r}")

"""A round's evaluation (docs/SPEC.md section 5: A and ASR) as integer counts over fixed batches.

The test set and the triggered test set are cut into batches of ``eval.batch_size`` rows; the
batches are the same however the run is launched, so every image's prediction is too. Under
MPI the client ranks share the batches out (contiguous runs, ``share``) and the server sums
their integer counts: the figures are exact and do not depend on the number of ranks, and the
evaluation no longer leaves every client rank idle while rank 0 works through it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fdcr_mpi import metrics
from fdcr_mpi.experiment import EvalSets
from fdcr_mpi.models import FlatModel

COUNTS = 3  # correct test predictions, ASR hits (true label not the target), ASR hits (all)


@dataclass(frozen=True)
class Batch:
    """Rows [start, stop) of the test set, or of the triggered test set when ``triggered``."""

    triggered: bool
    start: int
    stop: int


def batches(sets: EvalSets, batch_size: int) -> list[Batch]:
    """Every evaluation batch, test set first."""
    out = []
    for triggered, n in ((False, sets.test_y.numel()), (True, sets.backdoor_incl_x.shape[0])):
        out += [Batch(triggered, s, min(s + batch_size, n)) for s in range(0, n, batch_size)]
    return out


def share(work: list[Batch], index: int, parts: int) -> list[Batch]:
    """The ``index``-th of ``parts`` contiguous, balanced runs of ``work``."""
    bounds = np.linspace(0, len(work), parts + 1).round().astype(int)
    return work[bounds[index]:bounds[index + 1]]


def count_hits(model: FlatModel, sets: EvalSets, work: list[Batch], batch_size: int) -> np.ndarray:
    """The (COUNTS,) int64 counts of ``model`` on the batches ``work``."""
    counts = np.zeros(COUNTS, dtype=np.int64)
    asr_rows = sets.backdoor_rows
    for b in work:
        rows = slice(b.start, b.stop)
        if not b.triggered:
            predicted = metrics.predictions(model, sets.test_x[rows], batch_size)
            counts[0] += int((predicted == sets.test_y[rows].cpu()).sum())
        else:
            hits = metrics.predictions(model, sets.backdoor_incl_x[rows], batch_size) == sets.target
            counts[1] += int(hits[asr_rows[rows].cpu()].sum())
            counts[2] += int(hits.sum())
    return counts


def scores(counts: np.ndarray, sets: EvalSets) -> dict[str, float]:
    """A, ASR (true label not the target), ASR including target-class images, R and V, and the
    paper's R_paper and V_paper, from the summed counts (docs/SPEC.md section 5)."""

    def percent(hits: int, total: int) -> float:
        return 100.0 * hits / total if total else float("nan")

    a = percent(int(counts[0]), sets.test_y.numel())
    asr = percent(int(counts[1]), int(sets.backdoor_rows.sum()))
    asr_incl = percent(int(counts[2]), sets.backdoor_incl_x.shape[0])
    r = metrics.backdoor_failure_rate(asr)
    r_paper = metrics.backdoor_failure_rate(asr_incl)
    return {"A": a, "asr": asr, "asr_incl_target": asr_incl, "R": r, "V": metrics.v_score(a, r),
            "R_paper": r_paper, "V_paper": metrics.v_score(a, r_paper)}

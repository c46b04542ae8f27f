"""A round's evaluation (docs/SPEC.md section 5: A and ASR) as integer counts over fixed batches.

The test set and the triggered test set (every test image with the trigger) are cut into
batches of ``eval.batch_size`` rows; the batches are the same however the run is launched, so
every image's prediction is too. Under MPI the client ranks share the batches out (contiguous
runs, ``share``) and the server sums their integer counts: the figures are exact and do not
depend on the number of ranks. A rank holds only the rows of its own share (``Share.rows``,
preprocessed on its device) and the labels of the whole test set (for the totals); within a
rank, worker threads split the share again (``ClientRunner.evaluate``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fdcr_mpi import metrics
from fdcr_mpi.data.datasets import model_input
from fdcr_mpi.data.poison import Trigger
from fdcr_mpi.models import FlatModel

COUNTS = 3  # correct test predictions, ASR hits (true label not the target), ASR hits (all)
PREDICT_CHUNK = metrics.PREDICT_CHUNK


@dataclass(frozen=True)
class Batch:
    """Rows [start, stop) of the test set, or of the triggered test set when ``triggered``."""

    triggered: bool
    start: int
    stop: int


@dataclass(frozen=True)
class Span:
    """Rows [start, stop) of the test set (empty when start == stop)."""

    start: int = 0
    stop: int = 0

    def covering(self, batch: Batch) -> Span:
        return Span(min(self.start, batch.start) if self else batch.start, max(self.stop, batch.stop))

    def __bool__(self) -> bool:
        return self.stop > self.start

    def __len__(self) -> int:
        return max(0, self.stop - self.start)


@dataclass
class EvalSets:
    """The evaluation data a rank holds: the rows ``clean`` of the test set and the rows
    ``triggered`` of the triggered test set (preprocessed, on the rank's device), and the labels
    of every test image (the totals need them). The proxy set is the server's (CPU)."""

    test_x: torch.Tensor  # the test images of rows ``clean``
    test_y: torch.Tensor  # (N,) every test label
    backdoor_incl_x: torch.Tensor  # the triggered test images of rows ``triggered``
    target: int
    clean: Span = Span()
    triggered: Span = Span()
    proxy_x: torch.Tensor | None = None
    proxy_y: torch.Tensor | None = None
    backdoor_clean_x: torch.Tensor | None = None  # rows ``triggered`` without a trigger (a per-round trigger's)

    @property
    def size(self) -> int:
        """N, the number of test images (each is also in the triggered set)."""
        return int(self.test_y.numel())

    @property
    def backdoor_rows(self) -> torch.Tensor:
        """Which triggered test images count for the ASR: those whose true label is not the target."""
        return self.test_y != self.target

    def to(self, device: torch.device | str) -> EvalSets:
        """The test rows and labels on ``device`` (the proxy set stays with the server)."""
        return EvalSets(self.test_x.to(device), self.test_y.to(device), self.backdoor_incl_x.to(device), self.target,
                        self.clean, self.triggered, self.proxy_x, self.proxy_y,
                        None if self.backdoor_clean_x is None else self.backdoor_clean_x.to(device))

    def retrigger(self, trigger: Trigger) -> None:
        """The triggered rows made anew from their clean images with ``trigger`` (on their device):
        a per-round trigger (``Attack.per_round_trigger``) is measured with the round's own."""
        if self.backdoor_clean_x is None:
            raise ValueError("these evaluation sets keep no clean images of their triggered rows")
        self.backdoor_incl_x = trigger.apply(self.backdoor_clean_x)


def batches(size: int, batch_size: int) -> list[Batch]:
    """Every evaluation batch of a test set of ``size`` images, test set first, then triggered."""
    out = []
    for triggered in (False, True):
        out += [Batch(triggered, s, min(s + batch_size, size)) for s in range(0, size, batch_size)]
    return out


def share(work: list[Batch], index: int, parts: int) -> list[Batch]:
    """The ``index``-th of ``parts`` contiguous, balanced runs of ``work``."""
    bounds = np.linspace(0, len(work), parts + 1).round().astype(int)
    return work[bounds[index]:bounds[index + 1]]


def rows(work: list[Batch]) -> tuple[Span, Span]:
    """The (clean, triggered) rows that the batches ``work`` cover."""
    clean, triggered = Span(), Span()
    for b in work:
        if b.triggered:
            triggered = triggered.covering(b)
        else:
            clean = clean.covering(b)
    return clean, triggered


@torch.no_grad()
def count_hits(model: FlatModel, sets: EvalSets, work: list[Batch]) -> torch.Tensor:
    """The (COUNTS,) int64 counts of ``model`` on the batches ``work``, on the model's device
    (nothing is read back to the host: the caller sums and reads once)."""
    model.module.eval()
    device = model.flat.device
    counts = torch.zeros(COUNTS, dtype=torch.int64, device=device)
    for b in work:
        held = sets.triggered if b.triggered else sets.clean
        x = sets.backdoor_incl_x if b.triggered else sets.test_x
        for start in range(b.start, b.stop, PREDICT_CHUNK):
            stop = min(start + PREDICT_CHUNK, b.stop)
            predicted = model.module(model_input(x[start - held.start:stop - held.start])).argmax(dim=1)
            labels = sets.test_y[start:stop]
            if not b.triggered:
                counts[0] += (predicted == labels).sum()
            else:
                hits = predicted == sets.target
                counts[1] += (hits & (labels != sets.target)).sum()
                counts[2] += hits.sum()
    return counts


def scores(counts: np.ndarray, sets: EvalSets) -> dict[str, float]:
    """A, ASR (true label not the target), ASR including target-class images, R and V, and the
    paper's R_paper and V_paper, from the summed counts (docs/SPEC.md section 5)."""

    def percent(hits: int, total: int) -> float:
        return 100.0 * hits / total if total else float("nan")

    a = percent(int(counts[0]), sets.size)
    asr = percent(int(counts[1]), int(sets.backdoor_rows.sum()))
    asr_incl = percent(int(counts[2]), sets.size)
    r = metrics.backdoor_failure_rate(asr)
    r_paper = metrics.backdoor_failure_rate(asr_incl)
    return {"A": a, "asr": asr, "asr_incl_target": asr_incl, "R": r, "V": metrics.v_score(a, r),
            "R_paper": r_paper, "V_paper": metrics.v_score(a, r_paper)}

"""Metrics of a round (docs/SPEC.md section 5): A, ASR, R, V and detection rates.

Two backdoor failure rates are recorded. ``R`` (ours) = 100 - ASR over the triggered test
images whose true label is not the target; ``R_paper`` = 100 - ASR over every triggered test
image, target class included, as the paper and the authors' code measure it. A triggered image
of the target class that the model classifies correctly counts as a backdoor success, so a
well-defended model reads up to the target class's share of the test set (10 points with 10
balanced classes) lower in R_paper than in R. ``V`` and ``V_paper`` are (A + R) / 2 with either.
Compare with the paper's tables in R_paper and V_paper.

Only metrics read the ground truth (the attacker list); defenses never do.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from fdcr_mpi.data.datasets import model_input
from fdcr_mpi.models import FlatModel

PREDICT_CHUNK = 256  # rows per forward pass: larger batches spill the activations out of cache


@torch.no_grad()
def predictions(model: FlatModel, x: torch.Tensor, batch_size: int = PREDICT_CHUNK) -> torch.Tensor:
    """The top-1 class of ``model`` for every preprocessed image of ``x``, on the CPU, computed
    ``min(batch_size, PREDICT_CHUNK)`` rows at a time on the model's device."""
    model.module.eval()
    out = torch.empty(x.shape[0], dtype=torch.int64)
    step = min(batch_size, PREDICT_CHUNK)
    for start in range(0, x.shape[0], step):
        batch = model_input(x[start:start + step].to(model.flat.device))
        out[start:start + step] = model.module(batch).argmax(dim=1).cpu()
    return out


def accuracy(model: FlatModel, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000) -> float:
    """Top-1 accuracy in % of ``model`` on preprocessed images ``x`` with labels ``y``."""
    if y.numel() == 0:
        return float("nan")
    return 100.0 * int((predictions(model, x, batch_size) == y.cpu()).sum()) / y.numel()


def backdoor_failure_rate(asr: float) -> float:
    """R = 100 - ASR."""
    return 100.0 - asr


def v_score(a: float, r: float) -> float:
    """V = (A + R) / 2."""
    return (a + r) / 2.0


def paper_columns(rounds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """R_paper and V_paper per round from a run's columns: as stored, or, for run files written
    before they were, from ``asr_incl_target`` and ``A``; {} when the file has neither."""
    out: dict[str, np.ndarray] = {}
    if "R_paper" in rounds:
        out["R_paper"] = np.asarray(rounds["R_paper"], dtype=np.float64)
    elif "asr_incl_target" in rounds:
        out["R_paper"] = backdoor_failure_rate(np.asarray(rounds["asr_incl_target"], dtype=np.float64))
    if "V_paper" in rounds:
        out["V_paper"] = np.asarray(rounds["V_paper"], dtype=np.float64)
    elif "R_paper" in out and "A" in rounds:
        out["V_paper"] = v_score(np.asarray(rounds["A"], dtype=np.float64), out["R_paper"])
    return out


def detection_rates(removed: np.ndarray, malicious: np.ndarray) -> tuple[float, float]:
    """(TPR, FPR) of a removed mask against the ground truth; nan where the class is empty."""
    removed, malicious = np.asarray(removed, bool), np.asarray(malicious, bool)
    tpr = float(removed[malicious].mean()) if malicious.any() else float("nan")
    fpr = float(removed[~malicious].mean()) if (~malicious).any() else float("nan")
    return tpr, fpr


def final_figure(values: np.ndarray, last: int = 5) -> float:
    """The reported figure of a run: the mean of its last ``last`` rounds."""
    values = np.asarray(values, dtype=np.float64)
    return float(np.mean(values[-last:])) if values.size else float("nan")


"""Metrics of a round (ALGORITHM.md section 5): A, ASR, R, V and detection rates.

Only metrics read the ground truth (the attacker list); defenses never do.
"""

from __future__ import annotations

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

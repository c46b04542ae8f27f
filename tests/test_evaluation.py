"""The round's evaluation as integer counts over fixed batches (fdcr_mpi.evaluation)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fdcr_mpi import evaluation, metrics
from fdcr_mpi.evaluation import EvalSets, Span
from fdcr_mpi.models import build_model


def make_sets(n: int = 230, target: int = 2, work: list | None = None) -> EvalSets:
    """Every row of a random test set, or only the rows the batches ``work`` cover."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1, 32, 32, generator=gen)
    y = torch.randint(0, 10, (n,), generator=gen)
    triggered = x.clone()
    triggered[:, :, :4, :4] = 3.0
    clean, trig = evaluation.rows(work) if work is not None else (Span(0, n), Span(0, n))
    return EvalSets(test_x=x[clean.start:clean.stop], test_y=y, backdoor_incl_x=triggered[trig.start:trig.stop],
                    target=target, clean=clean, triggered=trig)


def count(model, sets, work) -> np.ndarray:
    return evaluation.count_hits(model, sets, work).numpy()


@pytest.mark.parametrize("batch_size", [1, 64, 230, 1000])
def test_batches_cover_both_sets_once(batch_size: int) -> None:
    work = evaluation.batches(230, batch_size)
    for triggered in (False, True):
        rows = [r for b in work if b.triggered == triggered for r in range(b.start, b.stop)]
        assert rows == list(range(230))
    assert all(b.stop - b.start <= batch_size for b in work)


@pytest.mark.parametrize("parts", [1, 2, 3, 5, 12])
def test_shares_are_contiguous_balanced_and_complete(parts: int) -> None:
    work = evaluation.batches(230, 40)  # 6 + 6 batches
    shares = [evaluation.share(work, i, parts) for i in range(parts)]
    assert [b for s in shares for b in s] == work
    sizes = [len(s) for s in shares]
    assert max(sizes) - min(sizes) <= 1


def test_counts_summed_over_shares_give_the_direct_scores() -> None:
    sets, model = make_sets(), build_model("simple_cnn", 3)
    work = evaluation.batches(230, 64)
    whole = count(model, sets, work)
    for parts in (2, 3, 7):
        # each share counted by a rank that holds only the rows of its share
        shares = [evaluation.share(work, i, parts) for i in range(parts)]
        summed = sum(count(model, make_sets(work=share), share) for share in shares)
        np.testing.assert_array_equal(summed, whole)
        held = [make_sets(work=share) for share in shares]
        assert sum(len(h.clean) + len(h.triggered) for h in held) == 2 * 230  # every row held once
        assert max(h.test_x.shape[0] + h.backdoor_incl_x.shape[0] for h in held) < 2 * 230
    scores = evaluation.scores(whole, sets)
    target = lambda x: torch.full((x.shape[0],), sets.target, dtype=torch.int64)  # noqa: E731
    backdoor_x = sets.backdoor_incl_x[sets.backdoor_rows]
    assert scores["A"] == metrics.accuracy(model, sets.test_x, sets.test_y, 64)
    assert scores["asr"] == metrics.accuracy(model, backdoor_x, target(backdoor_x), 64)
    assert scores["asr_incl_target"] == metrics.accuracy(model, sets.backdoor_incl_x, target(sets.backdoor_incl_x), 64)
    assert scores["R"] == 100 - scores["asr"] and scores["V"] == (scores["A"] + scores["R"]) / 2
    assert scores["R_paper"] == 100 - scores["asr_incl_target"]  # the paper's R: every triggered image
    assert scores["V_paper"] == (scores["A"] + scores["R_paper"]) / 2
    assert backdoor_x.shape[0] == int((sets.test_y != sets.target).sum()) < 230
    # the model predicts something: the counts are not trivially zero or full
    assert 0 < whole[2] < 230 or 0 < whole[0] < 230


def test_empty_sets_score_nan() -> None:
    sets = make_sets(0)
    scores = evaluation.scores(count(build_model("simple_cnn", 0), sets, []), sets)
    assert np.isnan(scores["A"]) and np.isnan(scores["asr"])

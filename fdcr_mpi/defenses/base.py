"""The defense protocol, its inputs and outputs, and the registry.

A defense is a pure function of ``RoundInputs`` and its own saved state (``state_dict``).
It never sees which clients are attackers: that list exists only in the metrics.
Adding a defense is one new module with a class decorated by ``@register("name")``
and one import line in ``fdcr_mpi/defenses/__init__.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import pydantic
import torch

from fdcr_mpi.errors import UserError, describe_validation_error
from fdcr_mpi.registry import Registry

if TYPE_CHECKING:
    from fdcr_mpi.defenses.ops import ClientOps


@dataclass
class ProxyData:
    """The server's 256-sample proxy set and what is needed to train or evaluate on it.

    ``x`` are model-ready float32 images (n, 3, 32, 32); ``y`` int64 labels.
    ``make_model`` returns a fresh model whose parameters are views of one flat vector
    (see ``fdcr_mpi.models.FlatModel``); ``lr``, ``local_epochs`` etc. are the clients' training settings.
    """

    x: torch.Tensor
    y: torch.Tensor
    make_model: Callable[[], Any] | None = None
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-5
    batch_size: int = 64
    seed: int = 0
    local_epochs: int = 1


@dataclass
class RoundInputs:
    """Everything a defense may use in one round (docs/ARCHITECTURE.md, "One round, as data", step 3).

    global_weights: w_t, (D,) float32.
    client_weights: w_k after local training, (K, D) float32, rows in client-id order.
    fisher: F_k, (K, D) float32, or None when the defense does not ask for it.
    sizes: N_k, (K,) float64.
    trainable: (D,) bool, True where the entry is a trainable parameter (False for buffers
        such as BatchNorm statistics); None means every entry is trainable.
    lr: the clients' local learning rate eta.
    round: t, counted from 0.
    proxy: the server's proxy data, for the defenses that need it.
    client_ids: the client id of each row (partial participation, quarantine); None means 0..K-1.
    seed: the run's seed (config ``seed``). A defense draws every random number from generators
        derived from it (``seeding.numpy_rng(seed, seeding.DEFENSE, ...)``), so a seed sweep
        varies the defense's draws too.
    fresh_model: seed -> the flat weights (D,) float32 of a newly initialised model of the run's
        architecture drawn from that seed (MarsFL's servers start from their own model); None
        when the caller has none.
    """

    global_weights: torch.Tensor
    client_weights: torch.Tensor
    sizes: torch.Tensor
    fisher: torch.Tensor | None = None
    trainable: torch.Tensor | None = None
    lr: float = 0.01
    round: int = 0
    total_rounds: int = 1
    proxy: ProxyData | None = None
    client_ids: np.ndarray | None = None
    seed: int = 0
    fresh_model: Callable[[int], torch.Tensor] | None = None

    @property
    def num_clients(self) -> int:
        return int(self.client_weights.shape[0])

    @property
    def alpha(self) -> torch.Tensor:
        """alpha_k = N_k / N, float64."""
        sizes = self.sizes.to(torch.float64)
        return sizes / sizes.sum()

    @property
    def updates(self) -> torch.Tensor:
        """delta_k = w_k - w_t, (K, D)."""
        return self.client_weights - self.global_weights.unsqueeze(0)

    @property
    def ids(self) -> np.ndarray:
        """The client id of each row, (K,) int64 (0..K-1 when ``client_ids`` is None)."""
        if self.client_ids is None:
            return np.arange(self.num_clients, dtype=np.int64)
        return np.asarray(self.client_ids, dtype=np.int64)


@dataclass
class RoundResult:
    """What a defense returns: w_{t+1}, alpha_hat, the removed mask and named diagnostics.

    weights: (D,) float32. alpha_hat: (K,) float64, the weight each client finally got
    (zeros for removed clients). removed: (K,) bool, the clients the defense excluded.
    diagnostics: named numbers or per-client arrays (e.g. ``discrepancy`` (K,)).
    """

    weights: torch.Tensor
    alpha_hat: np.ndarray
    removed: np.ndarray
    diagnostics: dict[str, Any] = field(default_factory=dict)


class NoOptions(pydantic.BaseModel):
    """Options of a defense that has none."""

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)


class Defense:
    """Base class: Flower-style strategy reduced to one ``aggregate`` step.

    Subclasses set ``name`` (through ``@register``), ``summary`` (one line for
    ``fdcr-mpi list defenses``), ``needs_fisher`` / ``needs_proxy``, an ``Options``
    pydantic model (``extra="forbid"``, every field with its paper default: the config
    section ``<name>.*`` is generated from it), and implement ``aggregate``.
    ``self.options`` holds the validated options. Defenses with history across rounds
    override ``state_dict``/``load_state_dict``; the state must be a flat dict of numpy
    arrays so that it checkpoints to HDF5.
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    needs_fisher: ClassVar[bool] = False
    uses_total_rounds: ClassVar[bool] = False  # its last round differs (a finished run cannot be extended)
    needs_proxy: ClassVar[bool] = False
    keeps_client_history: ClassVar[bool] = False  # state indexed by client that needs every client every round
    reducible: ClassVar[bool] = False  # written against ``ClientOps`` (``aggregate_ops``): runs on the reduce path
    Options: ClassVar[type[pydantic.BaseModel]] = NoOptions

    def __init__(self, **options: Any) -> None:
        try:
            self.options = self.Options(**options)
        except pydantic.ValidationError as exc:
            raise UserError(describe_validation_error(exc, prefix=self.name, schema=self.Options)) from None

    def server_imports(self) -> tuple[str, ...]:
        """The modules this defense's server step imports on first use (scikit-learn, FINCH: kept out
        of every process's start). The server imports them in the background while the first round
        trains (``runtime.preload``), off that round's critical path."""
        return ()

    def aggregate(self, inputs: RoundInputs) -> RoundResult:
        """One round on every client's row, held by the server. A ``reducible`` defense is written
        once, as ``aggregate_ops``, and runs here on ``RowsOnServer``."""
        if not self.reducible:  # pragma: no cover - abstract
            raise NotImplementedError
        from fdcr_mpi.defenses.ops import RowsOnServer

        return self.aggregate_ops(RowsOnServer(inputs))

    def aggregate_ops(self, ops: ClientOps) -> RoundResult | None:  # pragma: no cover - abstract
        """A ``reducible`` defense: the round against ``defenses.ops.ClientOps``, on the rows the
        server holds or on every rank's own rows (the reduce path); returns the result on the
        server and None elsewhere."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, np.ndarray]:
        return {}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        if state:
            raise UserError(f"the checkpoint holds state for defense {self.name!r}, which keeps none")


REGISTRY: Registry[Defense] = Registry("defense")
register = REGISTRY.register
"""Class decorator: make a defense available as ``defense.name: name``."""
available = REGISTRY.available


def create(name: str, **options: Any) -> Defense:
    """Instantiate a registered defense; an unknown name or option is a ``UserError``."""
    if name not in REGISTRY.classes:
        raise UserError(f"unknown defense {name!r}; choose one of: {REGISTRY.choices()}")
    return REGISTRY.classes[name](**options)

"""A client's side of a round: its data and local training (``train``), batched groups of clients
(``batched``), the Fisher diagonal it reports (``fisher``, ``fisher_layers``, ``fisher_released``)
and a rank's runner of its clients (``runner``)."""

from fdcr_mpi.client.fisher import (
           batch_mean_sq_fisher,
           default_chunk,
           empirical_fisher,
           fisher_samples,
)
from fdcr_mpi.client.train import (
           ClientData,
           Epoch,
           TrainSettings,
           batches,
           draw_epoch,
           local_train,
           train_client,
)

__all__ = ["ClientData", "Epoch", "TrainSettings", "batch_mean_sq_fisher", "batches", "default_chunk", "draw_epoch",
           "empirical_fisher", "fisher_samples", "local_train", "train_client"]

"""Models: the networks (``nets``) and their flat-vector form with the one SGD step (``flat``)."""

from fdcr_mpi.models.flat import FlatModel, FlatSGD, build_model, sgd_step
from fdcr_mpi.models.nets import MODELS, Cnn1M, ResNet18, SimpleCNN

__all__ = ["MODELS", "Cnn1M", "FlatModel", "FlatSGD", "ResNet18", "SimpleCNN", "build_model", "sgd_step"]

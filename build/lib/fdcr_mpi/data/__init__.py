"""Datasets, client partitions and backdoor poisoning (docs/SPEC.md section 3)."""

from fdcr_mpi.data.datasets import (
    SPECS,
    DatasetSpec,
    RawSplit,
    augment,
    load_raw,
    model_input,
    preprocess,
    resolve_root,
)
from fdcr_mpi.data.partition import (
    choose_malicious,
    dirichlet_partition,
    proxy_indices,
    train_val_split,
)
from fdcr_mpi.data.poison import (
    apply_trigger,
    backdoor_test_set,
    dba_masks,
    poison_mask,
    trigger_mask,
)

__all__ = [
    "SPECS",
    "DatasetSpec",
    "RawSplit",
    "apply_trigger",
    "augment",
    "backdoor_test_set",
    "choose_malicious",
    "dba_masks",
    "dirichlet_partition",
    "load_raw",
    "model_input",
    "poison_mask",
    "preprocess",
    "proxy_indices",
    "resolve_root",
    "train_val_split",
    "trigger_mask",
]

"""Seeds derived from (seed, purpose, client, round): never from a global stream or the rank.

Every random draw of client k in round t comes from ``client_generator(seed, k, t)``, so the
result of a run does not depend on which rank hosts which client, nor on how many ranks exist.
"""

from __future__ import annotations

import numpy as np
import torch

# Purposes, so that two streams with the same (seed, k, t) never coincide. SERVER_MODEL: a
# defense's own starting model (MarsFL's server momentum); AUGMENT: augmentation drawn once
# (attack.augmentation: frozen); COLLUDE: the colluding attackers' draws (attacks.collusion);
# TRIGGER: an attack's trigger (attacks.blended's key pattern, attacks.a3fl's trigger search).
(PARTITION, MODEL_INIT, CLIENT, POISON, PROXY, DEFENSE, SPLIT, ATTACKERS, SELECT, SERVER_MODEL, AUGMENT,
 COLLUDE, TRIGGER) = range(13)


def derive_seed(seed: int, *keys: int) -> int:
    """A 63-bit seed from the run seed and integer keys (numpy SeedSequence hashing)."""
    state = np.random.SeedSequence([int(seed), *[int(k) for k in keys]]).generate_state(2, np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & ((1 << 63) - 1)


def numpy_rng(seed: int, *keys: int) -> np.random.Generator:
    """A numpy generator for (seed, *keys)."""
    return np.random.default_rng(derive_seed(seed, *keys))


def torch_generator(seed: int, *keys: int) -> torch.Generator:
    """A CPU torch generator for (seed, *keys)."""
    gen = torch.Generator()
    gen.manual_seed(derive_seed(seed, *keys))
    return gen


def client_generator(seed: int, client: int, round_: int) -> torch.Generator:
    """The generator behind every draw of client ``client`` in round ``round_`` (shuffles, crops, flips)."""
    return torch_generator(seed, CLIENT, client, round_)

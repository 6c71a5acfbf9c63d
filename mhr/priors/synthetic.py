"""Head assignments that carry no human knowledge, for the ablations of the paper's Table 6.

`--priors random:K` puts every item in one of K groups uniformly at random; `--priors all:K` puts
every item in all K groups. Both have as many heads as a real K-group item prior, so comparing
them with it separates "more heads" from "meaningful priors". They are not stored: a run names
them and they are rebuilt from (K, catalogue size, seed) whenever the run is loaded; their key is
a hash of exactly that.

The interest decoders (ComiRec-SA, REMI, DualVAE) use an `all:K` layout too: K heads that may each
score every item, fused like prior heads at inference.
"""

from __future__ import annotations

import re

import numpy as np

from mhr.cache import stage_key
from mhr.errors import UsageError
from mhr.priors.spec import PriorSpec

SYNTHETIC = re.compile(r"^(random|all):(\d+)$")
MAX_GROUPS = 4096


def is_synthetic(name: str) -> bool:
    return SYNTHETIC.match(name) is not None


def synthetic_prior(name: str, n_items: int, seed: int = 0, group_label: str = "group") -> PriorSpec:
    """The item prior `random:K` or `all:K` over items 1..n_items (`seed` drives `random`)."""
    m = SYNTHETIC.match(name)
    if m is None:
        raise UsageError(f"{name!r} is not a synthetic prior", hint="use random:K or all:K, e.g. random:8")
    kind, k = m.group(1), int(m.group(2))
    if not 1 <= k <= MAX_GROUPS:
        raise UsageError(f"{name}: K must be between 1 and {MAX_GROUPS}", hint="e.g. random:8")
    mat = np.zeros((k, n_items + 1), dtype=bool)
    if kind == "all":
        mat[:, 1:] = True
    else:
        groups = np.random.default_rng([seed, k, n_items]).integers(0, k, size=n_items)
        mat[groups, np.arange(1, n_items + 1)] = True
    params = {"synthetic": kind, "groups": k, "n_items": n_items, "seed": seed if kind == "random" else None}
    names = tuple(f"{group_label} {i + 1}" for i in range(k))
    return PriorSpec(name, "item", stage_key("synthetic-prior", params, {}), names, params, item_groups=mat)

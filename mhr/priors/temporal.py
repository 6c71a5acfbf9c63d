"""temporal prior: segments of the forecast horizon. A segment's head may score every item and is
trained by the targets whose offset falls in the segment.

Offsets 1..τ are split into `segments` contiguous segments (equal split: offset j goes to segment
⌊(j − 1)·n / τ⌋), or at explicit `boundaries` (the last offset of each segment, e.g. "2,8" with
τ = 8: offsets 1–2 and 3–8). Two segments are named ST and LT, more are seg1..segN.
"""

from __future__ import annotations

from dataclasses import dataclass

import duckdb
import numpy as np

from mhr.errors import UsageError
from mhr.options import join_names, option, split_ints
from mhr.priors.groups import PriorGroups


@dataclass(frozen=True)
class TemporalParams:
    horizon: int = option(8, "Forecast horizon τ.")
    segments: int = option(2, "Equal segments (2 = ST/LT).")
    boundaries: tuple[int, ...] = option((), "Last offset of each segment, e.g. '2,8'.", parse=split_ints,
                                         show=join_names)


def segment_of_offsets(p: TemporalParams) -> np.ndarray:
    """int64 [τ]: segment of offsets 1..τ."""
    tau = p.horizon
    if tau < 1:
        raise UsageError("--horizon must be ≥ 1")
    if p.boundaries:
        ends = list(p.boundaries)
        if ends[-1] != tau:
            ends.append(tau)
        if ends[0] < 1 or any(b <= a for a, b in zip(ends, ends[1:], strict=False)) or ends[-1] > tau:
            raise UsageError(
                f"--boundaries {','.join(map(str, p.boundaries))} must increase within 1..{tau}",
                hint="give the last offset of each segment, e.g. --boundaries 2,8 for τ = 8",
            )
        return np.searchsorted(np.array(ends), np.arange(1, tau + 1), side="left").astype(np.int64)
    n = p.segments
    if not 1 <= n <= tau:
        raise UsageError(f"--segments must be between 1 and the horizon τ = {tau}, got {n}")
    return ((np.arange(tau) * n) // tau).astype(np.int64)


def build_temporal_prior(con: duckdb.DuckDBPyConnection, p: TemporalParams) -> PriorGroups:
    seg = segment_of_offsets(p)
    n = int(seg.max()) + 1
    names = ["ST", "LT"] if n == 2 else [f"seg{k + 1}" for k in range(n)]
    spans = {names[g]: [int(np.flatnonzero(seg == g)[0]) + 1, int(np.flatnonzero(seg == g)[-1]) + 1]
             for g in range(n)}
    return PriorGroups(names, horizon=seg, report={"offsets": spans})

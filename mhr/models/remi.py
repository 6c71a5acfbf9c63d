"""REMI: ComiRec-SA trained with routing regularisation and interest-aware hard negatives.

Xie et al., "Rethinking Multi-Interest Learning for Candidate Matching in Recommender Systems"
(RecSys 2023). The model is `mhr.models.comirec.ComiRecSA`; REMI changes only how it is trained:

- Routing regularisation (RR): λ · ‖diag((A − Ā)(A − Ā)ᵀ / d)‖² on the interests' attention over
  positions (`comirec.routing_regulariser`), default λ = 100, against routing collapse (an
  interest attending to a single item).
- Interest-aware hard negatives (IHN): in the sampled softmax, negative i's term is reweighted by
  w_i = exp(β s_i) / mean_j exp(β s_j) (scores detached: importance weights, not a gradient path),
  so negatives close to the interest count more (`mhr.training.loss`, `hard_negative_beta`). β = 0 is the
  plain sampled softmax. IHN needs sampled negatives (`--negatives N`).
"""

from __future__ import annotations

from mhr.models.comirec import ComiRecSA

DEFAULT_ROUTING_REG = 100.0


class REMI(ComiRecSA):
    """ComiRec-SA with REMI's routing regularisation on by default (λ = 100)."""

    def __init__(self, d: int, interests: int, routing_reg: float | None = None) -> None:
        super().__init__(d, interests, DEFAULT_ROUTING_REG if routing_reg is None else routing_reg)

"""mhr: generative sequential recommenders decoded by prior-conditioned heads.

The method of *Guiding Generative Recommenders with Structured Human Priors via Multi-head
Decoding* (Zhang et al., WWW 2026, arXiv 2511.10492) as a staged, cached command-line toolkit.
"""

__version__ = "0.1.0"

__all__ = ["Recommender"]


def __getattr__(name: str):
    # lazy: `import mhr` (every CLI start) stays free of torch; `from mhr import Recommender` loads it
    if name == "Recommender":
        from mhr.ranking.service import Recommender

        return Recommender
    raise AttributeError(f"module 'mhr' has no attribute {name!r}")

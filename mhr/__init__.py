"""mhr: generative sequential recommenders decoded by prior-conditioned heads.

The method of *Guiding Generative Recommenders with Structured Human Priors via Multi-head
Decoding* (Zhang et al., WWW 2026, arXiv 2511.10492) as a staged, cached command-line toolkit.
"""

__version__ = "0.1.0"

"""Human priors: the five kinds of structured knowledge that condition the heads; what each kind
means for the heads is the table in docs/ARCHITECTURE.md, "Prior kinds and compatibility"."""

"""Human priors: the five kinds of structured knowledge that condition the heads (DESIGN §1)."""

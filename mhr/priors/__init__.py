"""Human priors: the five kinds of structured knowledge that condition the heads, one table of them in
`kinds` (what each maps, its parameters and builder); what each kind means for the heads is the table
in docs/ARCHITECTURE.md, "Prior kinds and compatibility"."""

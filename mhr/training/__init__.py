"""Training: `params` (TrainParams, every option declared once, the run-key rules), `train` (the
loop in phases, `load_run`), `loss` (the multi-head loss, full and sampled softmax, the router's),
`sampling` (negative draws per batch / sequence / position, in-batch, logQ), `checkpoint`."""

"""Training: `params` (TrainParams, every option declared once, the run-key rules), `train` (the
loop in phases), `runs` (a run on disk: its record written and read, `load_run`), `step` (`LossStep`:
model + loss as one module), `loss` (the multi-head loss, full and sampled softmax, the router's),
`sampling` (negative draws per batch / sequence / position, in-batch, logQ), `checkpoint`."""

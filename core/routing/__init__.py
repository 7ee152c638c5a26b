"""Dynamic routing: router parameters and fitting (`routers`), running them (`route`), the learned
token map, per-token top-k bricks, the quality-compute trade-off, activation-sparsity thresholds
calibrated from a run (`thresholds`) and the decoding harness that times them (`decode`)."""

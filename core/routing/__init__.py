"""Dynamic routing: router parameters and fitting (`routers`), running them (`route`), the learned
token map, per-token top-k bricks and the quality-compute trade-off."""

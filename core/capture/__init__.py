"""Capture: one pass of a model over prompts, reduced on the fly (`run`), the reductions and their
merge (`reduce`), and sharded capture across processes, GPUs and Ray workers (`shards`)."""

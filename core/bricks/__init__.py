"""Bricks from a captured run: candidate bricks (`candidates`), functionality scores (`scores`),
the neuron map (`neuron_map`), one neuron up close (`neurons`), coherence and brick operations, all
reading per-token firing through one reader (`firing`)."""

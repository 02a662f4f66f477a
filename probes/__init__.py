"""probes: k-sparse and dense probes on activations."""

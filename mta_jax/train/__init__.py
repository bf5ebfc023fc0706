"""Training state, sharding, checkpointing, metrics and the loop."""

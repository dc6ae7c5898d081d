"""hiermt: piano transcription by hierarchical language modelling (JAX/Flax)."""

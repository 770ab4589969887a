"""Model loading and the Llama forward pass used by the engine."""

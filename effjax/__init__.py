"""effjax: training-time efficiency research for language models in JAX."""

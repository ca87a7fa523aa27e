"""Erasure Studio: erase concepts from generative image models, and prove that the erasure worked."""

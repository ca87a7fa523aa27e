"""Evaluation of erased models (erasure-studio's ``evaluate`` package, not Hugging Face's ``evaluate``)."""

__erasure_studio__ = True

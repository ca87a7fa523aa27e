"""Evaluation suites, one module each; every module here is imported by ``evaluate.registry`` on first use."""

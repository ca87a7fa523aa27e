"""The before/after playground (``erasure-studio ui``)."""

"""Erasure methods, one module each. ``erasure.registry`` imports every module here on first use, so a module
that defines a ``Params(MethodParams)`` model and an ``@register_method`` class is all a new method needs."""

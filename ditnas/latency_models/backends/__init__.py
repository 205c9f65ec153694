"""Device backends behind one interface (see base.py). Import a backend through `get_backend(name)`:
its runtime package is imported only then, and a missing one is reported with an install hint."""

from ditnas.latency_models.backends.base import (
    Backend,
    Prepared,
    backend_class,
    backend_names,
    get_backend,
    register_backend,
)

__all__ = ["Backend", "Prepared", "backend_class", "backend_names", "get_backend", "register_backend"]

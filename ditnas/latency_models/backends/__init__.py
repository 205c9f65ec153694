"""Device backends behind one interface and one registry (base.py). Each backend registers itself in
its own file (`@register_backend`); `get_backend(name)` imports its runtime package only then, and a
missing one is reported with an install hint."""

from ditnas.latency_models.backends.base import (
    ArtifactFormat,
    Backend,
    Prepared,
    artifact_backends,
    artifact_formats,
    backend_class,
    backend_names,
    get_backend,
    register_backend,
    unregister_backend,
)

__all__ = [
    "ArtifactFormat",
    "Backend",
    "Prepared",
    "artifact_backends",
    "artifact_formats",
    "backend_class",
    "backend_names",
    "get_backend",
    "register_backend",
    "unregister_backend",
]

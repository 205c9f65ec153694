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

# phone backends (android_adb.py, ios_xcodebuild.py, coreml.py): registered here, imported lazily
register_backend("android-adb", "ditnas.latency_models.backends.android_adb", "AndroidAdbBackend", "executorch==1.5.1 (with torch==2.13.0)")
register_backend("ios", "ditnas.latency_models.backends.ios_xcodebuild", "IosBackend", "executorch==1.5.1 (with torch==2.13.0)")
register_backend("coreml", "ditnas.latency_models.backends.coreml", "CoreMLBackend", "coremltools==9.0")

__all__ = ["Backend", "Prepared", "backend_class", "backend_names", "get_backend", "register_backend"]

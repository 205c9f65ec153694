"""Stage 4: shrink a searched subnet and ship it.

prune.py (tri-level structured pruning) · kd.py (knowledge distillation) · dmd.py (K-DMD step
distillation) · adversarial.py (adversarial step distillation) · export.py (.pte / .mlpackage).
Each step is an entry function taking its `config.CompressConfig` section and paths, writing an
artifact plus a manifest (manifest.py). Nothing in supernet/, latency_models/ or search/ imports it.
"""

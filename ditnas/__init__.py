"""ditnas: hardware-aware architecture search and compression for Diffusion Transformers on phones."""

__version__ = "0.1.0"

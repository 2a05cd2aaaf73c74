"""asyndm: asynchronous denoising (AsynDM, arXiv 2510.04504) for diffusers text-to-image models."""

__version__ = "0.1.0"

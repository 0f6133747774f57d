"""CDC: lossy image compression with a conditional diffusion decoder (Yang & Mandt, NeurIPS 2023)."""

from .models import CDCCompressor, CDCUNet

__all__ = ["CDCCompressor", "CDCUNet"]

from .compressor import CDCCompressor
from .unet import CDCUNet

__all__ = ["CDCCompressor", "CDCUNet"]

"""CDC: lossy image compression with a conditional diffusion decoder (Yang & Mandt, NeurIPS 2023)."""

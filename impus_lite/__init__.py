"""impus_lite: diffusion-based image morphing (IMPUS, ICLR 2024), one small module per idea."""

__version__ = "0.1.0"

"""Hypernetwork training on a frozen Stable Diffusion UNet: module.py (the LightningModule), build.py (build)."""

"""VAE-decoder fine-tuning (frozen encoder, PatchGAN loss): module.py (the LightningModule), build.py (build)."""

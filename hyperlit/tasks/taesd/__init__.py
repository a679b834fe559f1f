"""TAESD distillation (tiny encoder/decoder copying a frozen VAE): module.py (the LightningModule), build.py."""

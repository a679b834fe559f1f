"""TAESD distillation (tiny encoder/decoder copying a frozen VAE): module.py (the LightningModule), build.py,
scenes.py (taesd.extra_scenes: procedural scenes of the tiny base's domain)."""

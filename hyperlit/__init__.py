"""hyperlit: train A1111/NovelAI hypernetworks and fine-tune SD VAE decoders with Lightning + Hydra."""

__version__ = "0.1.0"

"""hyperlit: train A1111/NovelAI hypernetworks and fine-tune SD VAE decoders with Lightning + Hydra."""

import logging

__version__ = "0.1.0"

# Importing diffusers' pipelines makes transformers warn that its CLIP and SigLIP image processors "require
# torchvision" and advise installing it. No hyperlit path uses an image processor (no safety checker, no image
# encoder), and torchvision is left out on purpose: pip would replace the CPU or chosen CUDA torch build with its
# own. The advice would only break a working install, so that one message is dropped at its logger.
TORCHVISION_ADVICE = "requires torchvision (not installed)"
logging.getLogger("transformers.utils.import_utils").addFilter(lambda r: TORCHVISION_ADVICE not in r.getMessage())

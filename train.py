"""Train a hypernetwork (default) or a VAE decoder (`--config-name vae`). All the work is in hyperlit.train.run."""

import os
import sys

import hydra
from omegaconf import DictConfig

from hyperlit.train import run


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    try:
        return run(cfg)
    except (ValueError, OSError) as err:
        # Bad input (a config value, a path, a file) gets its message, not a traceback; the message names the
        # key or file. HYPERLIT_DEBUG=1 shows the traceback.
        if os.environ.get("HYPERLIT_DEBUG"):
            raise
        print(f"hyperlit: error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()

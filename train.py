"""Train a hypernetwork (default) or a VAE decoder (`--config-name vae`). All the work is in hyperlit.runner."""

import os
import sys

import hydra
from omegaconf import DictConfig

from hyperlit.errors import bad_input_message
from hyperlit.runner import run


def entry(cfg: DictConfig) -> float | None:
    """Run ``cfg``; bad input (a config value, a path, a file) ends with one line on stderr and exit code 2."""
    try:
        return run(cfg)
    except Exception as err:
        message = bad_input_message(err, cfg)
        # HYPERLIT_DEBUG=1 shows the traceback; anything that is not bad input is a bug and keeps its traceback.
        if message is None or os.environ.get("HYPERLIT_DEBUG"):
            raise
        print(f"hyperlit: error: {message}", file=sys.stderr)
        sys.exit(2)


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    return entry(cfg)


if __name__ == "__main__":
    main()

"""Train a hypernetwork (default) or a VAE decoder (`--config-name vae`). All the work is in hyperlit.train.run."""

import hydra
from omegaconf import DictConfig

from hyperlit.train import run


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    return run(cfg)


if __name__ == "__main__":
    main()

"""Train a hypernetwork (default) or a VAE decoder (`--config-name vae`). All the work is in hyperlit.runner."""

import os
import sys
from pathlib import Path

import hydra
from hydra.errors import HydraException
from omegaconf import DictConfig

from hyperlit.config_help import help_text
from hyperlit.errors import bad_input_message, hydra_message
from hyperlit.runner import run

CONF_DIR = Path(__file__).resolve().parent / "conf"


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


def config_name(args: list[str]) -> str:
    """The ``--config-name``/``-cn`` of a command line (``train`` without one)."""
    for i, arg in enumerate(args):
        if arg.startswith("--config-name="):
            return arg.split("=", 1)[1]
        if arg in ("--config-name", "-cn") and i + 1 < len(args):
            return args[i + 1]
    return "train"


def cli() -> None:
    """``main()``; a mistake Hydra finds while composing the config (an unknown key or group option, a malformed
    override) also ends with one line and exit code 2."""
    # Hydra prints its own errors (several lines, advising `+key=`) and exits 1 unless HYDRA_FULL_ERROR=1, which
    # makes it raise them to us. HYPERLIT_HYDRA_ERRORS marks that this process set it, not the user, in the processes
    # Lightning's launcher starts too.
    if "--help" in sys.argv[1:] or "-h" in sys.argv[1:]:
        # our own help (groups, options, main keys with their conf comments) instead of Hydra's generic text and
        # config dump; Hydra's stays under --hydra-help
        print(help_text(CONF_DIR, config_name(sys.argv[1:])), end="")
        return
    ours = os.environ.get("HYPERLIT_HYDRA_ERRORS") == "1" or "HYDRA_FULL_ERROR" not in os.environ
    debug = bool(os.environ.get("HYPERLIT_DEBUG")) or not ours
    os.environ.update(HYDRA_FULL_ERROR="1", HYPERLIT_HYDRA_ERRORS="1")
    try:
        main()
    except HydraException as err:
        if debug:
            raise
        print(f"hyperlit: error: {hydra_message(err)}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    cli()

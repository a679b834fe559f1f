"""Library chatter that buries a run's own output, silenced at its source (each with the reason it is not needed).

Warnings are filtered in the runner (``hyperlit.runner.QUIET``); these are log lines and set-up messages.
"""

from __future__ import annotations

import logging
from typing import Any

# Lightning's advertisements for its cloud services (litlogger, litmodels), printed on every Trainer start.
LIGHTNING_TIP = "💡 Tip:"
# hydra-optuna-sweeper's set-up lines; the study table (hyperlit.study_table) says what the study did.
SWEEPER_SETUP = ("Study name:", "Storage:", "Sampler:", "Directions:")


def drop_lightning_tips() -> None:
    """Lightning's rank-zero logger keeps everything except its "💡 Tip" advertisements."""
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(getattr(f, "hyperlit", False) for f in logger.filters):
        logger.addFilter(_MessageFilter(lambda text: not text.startswith(LIGHTNING_TIP)))


def quiet_study_setup() -> None:
    """Optuna's and alembic's INFO lines (study created, SQLite migrations) and the sweeper's set-up lines."""
    # first: importing optuna imports alembic, whose plugin registry logs "setup plugin ..." lines at INFO
    logging.getLogger("alembic").setLevel(logging.WARNING)
    try:
        import optuna  # the `sweep` extra; absent without it
    except ImportError:
        optuna = None
    if optuna is not None:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
    sweeper = logging.getLogger("hydra_plugins.hydra_optuna_sweeper._impl")
    if not any(getattr(f, "hyperlit", False) for f in sweeper.filters):
        sweeper.addFilter(_MessageFilter(lambda text: not text.startswith(SWEEPER_SETUP)))


def drop_wandb_anonymous(logger: Any) -> None:
    """Lightning's WandbLogger passes ``anonymous=None`` to ``wandb.init``, which makes wandb warn that the
    (deprecated) setting has no effect; leaving the key out is what wandb asks for."""
    init = getattr(logger, "_wandb_init", None)
    if isinstance(init, dict) and init.get("anonymous") is None:
        init.pop("anonymous", None)


class _MessageFilter(logging.Filter):
    hyperlit = True  # marks filters added here, so a second run in the same process adds none

    def __init__(self, keep: Any) -> None:
        super().__init__()
        self.keep = keep

    def filter(self, record: logging.LogRecord) -> bool:
        return bool(self.keep(record.getMessage()))

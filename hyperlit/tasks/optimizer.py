"""``train.optimizer``: the optimizer partial, tried on a dummy parameter at the door so bad arguments (``lr=fast``,
a key the optimizer does not take, one the task sets itself) stop the run before any weights load."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from hydra.utils import instantiate

from hyperlit.options import not_allowed


def checked_optimizer(node: Any, key: str = "train.optimizer", **task_kwargs: Any) -> Callable[..., Any]:
    """``instantiate(node)`` (a ``_partial_`` optimizer), called once as the task will call it.

    ``task_kwargs`` are the arguments the task fills in (e.g. ``lr`` from ``train.learning_rate``): the config may
    not set them too.
    """
    for name, source in task_kwargs.items():
        if isinstance(node, Mapping) and name in node:
            raise not_allowed(f"{key}.{name}", node[name], f"the task sets it from {source[0]}; set that instead")
    factory = instantiate(node)
    dummy = {name: value for name, (_, value) in task_kwargs.items()}
    try:
        factory(params=[torch.zeros(1, requires_grad=True)], **dummy)
    except (ValueError, TypeError) as err:
        given = ", ".join(f"{k}={v!r}" for k, v in node.items() if not str(k).startswith("_"))
        raise ValueError(f"{key}: {node.get('_target_')}({given}) refused its arguments: {err}") from None
    return factory

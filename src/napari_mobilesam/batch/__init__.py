"""Whole stacks from a script: labels from prompts, propagated, or automatic (see :mod:`.api`)."""

from .api import *  # noqa: F403
from .api import WORKER_LOAD_COUNT, __all__, _resolve_model  # noqa: F401  (tests, benchmarks)

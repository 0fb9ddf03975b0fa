"""Whole stacks from a script: labels from prompts, propagated, or automatic (see :mod:`.api`);
on a dask.distributed cluster with :mod:`.cluster`."""

from .api import *  # noqa: F403
from .api import __all__, _resolve_model  # noqa: F401  (tests, benchmarks)
from .cluster import WORKER_LOAD_COUNT  # noqa: F401  (tests: models loaded per worker)

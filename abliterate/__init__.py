"""Refusal-direction abliteration: measure the direction, remove it from the weights, verify.

Domain logic lives here and imports without Prefect or MLflow; `tasks/` and `flows/`
wrap it for orchestration and tracking.
"""

from abliterate.inference.threads import prefer_passive_wait

__version__ = "0.1.0"

# OpenMP reads its wait policy once, when torch loads it: this package is imported before torch by every
# command, flow, task and benchmark, so idle OpenMP threads sleep instead of spinning beside busy processes.
prefer_passive_wait()

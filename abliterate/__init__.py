"""Refusal-direction abliteration: measure the direction, remove it from the weights, verify.

Domain logic lives here and imports without Prefect or MLflow; `tasks/` and `flows/`
wrap it for orchestration and tracking.
"""

__version__ = "0.1.0"

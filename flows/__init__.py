"""Prefect flows: the main `abliterate` flow, the sweep over ablation variants, the inventory flow."""

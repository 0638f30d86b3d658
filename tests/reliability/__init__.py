"""The reliability catalogue (docs/RELIABILITY.md), one file per stage of the pipeline."""

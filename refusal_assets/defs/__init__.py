"""The Dagster layer: thin wiring around the science core (partitions, assets, automation)."""

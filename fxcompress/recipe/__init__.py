"""Pass infrastructure: configs and the registry, per-layer records, recipes, tolerances and the pass manager."""

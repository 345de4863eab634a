"""The configuration: typed models of every key, YAML loading and ``--set`` overrides, the rerun policy."""

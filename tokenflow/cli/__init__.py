"""Console scripts (``tokenflow-edit``, ``tokenflow-invert``) and the Hydra run configuration."""
from tokenflow.cli.main import edit_main, invert_main

__all__ = ["edit_main", "invert_main"]

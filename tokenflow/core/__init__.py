"""The method: editor/inverter/propagator interfaces, keyframes, nearest-neighbour search, attention processors, the pipeline."""

"""Hydra configs of tokenflow (a package so installed console scripts find them as ``pkg://conf``)."""

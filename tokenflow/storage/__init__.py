"""Storage and I/O: reading and writing videos, the content-addressed inversion cache."""

"""Benchmarks: scripts that measure hlf_actors (and, in ``bench.peers``, its peers); not part of the package."""

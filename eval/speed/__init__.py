"""Speed measurements: generation latency/throughput (next: serving load, engine sweeps)."""

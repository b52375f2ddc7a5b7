"""optaccum's benchmarks: side-by-side timings and compiled memory, run in one process."""

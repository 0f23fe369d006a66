"""``make bench``: the framework's overhead, sampling speed-ups, memory and throughput (see run.py)."""

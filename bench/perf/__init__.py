"""Performance benchmark of the gateway against a minimal fan-out and LiteLLM's proxy: `python -m bench.perf.run`."""

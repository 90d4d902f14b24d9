"""Engine events to one protocol's bodies and SSE frames, one module per protocol."""

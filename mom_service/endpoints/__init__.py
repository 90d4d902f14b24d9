"""HTTP endpoints: thin routers over the engine, the wire models in `models.py`."""

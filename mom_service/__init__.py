"""MoM Service: an OpenAI-compatible Mixture-of-Models gateway."""

__version__ = "0.1.0"

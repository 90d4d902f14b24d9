"""The HTTP surfaces: the app factory and middleware, one router per surface, each protocol's wire schemas and the
encoder that turns the engine's events into that protocol's JSON and SSE."""

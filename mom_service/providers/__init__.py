"""The only door to the LLMs: LiteLLM and the lean OpenAI-compatible client, retries, error kinds, circuit breakers,
pricing, token counting, and everything about images (the URL guard, downloads, each provider's message shapes)."""

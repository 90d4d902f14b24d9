"""The progress stream's hub: each run's progress events (already encoded as SSE frames by the API), kept for late
subscribers and handed to live ones; in process (hub.py) or, with REDIS_URL, in Redis across replicas
(redis_hub.py). It knows nothing of the engine or the API: runs are ids, events are frames."""

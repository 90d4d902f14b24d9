"""The response cache's keys and stores (in process, or Redis shared by replicas). What is stored, and when, is the
engine's business (engine/cached.py)."""

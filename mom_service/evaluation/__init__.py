"""`mom-service eval`: a dataset run against MoM models and single LLMs through the service's own engine, scored
(exact match, or pairwise judging against a baseline), reported (table, JSON, PNG) and resumable."""

"""The strategies: what follows the panel's answers, chosen by the plan (`strategy:` of the MoM model, or the
request's `mom.strategy`). Each takes the panel's answers (the breakdown's members) and yields the events that
follow: each stage's start (StageStarted, for the progress stream) and summary (StageDone, for the thinking
context), PanelDone, then the answer.

`synthesize`, the default, is the concluding stage itself (engine/concluding.py): the engine calls it directly, so
its per-chunk path has no layer more. The others are here, one module each (`rank`, `best_of`, `vote`, `layers`),
found by name in registry.py; what their stages read is in prompts.py, their pure logic in ballots.py."""

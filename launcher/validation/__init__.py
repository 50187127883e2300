"""Validation on both sides of the process boundary.

Trainer side: `trainer_side` (off / inline / asynchronous hand-off). Validator side: `validator`
(claim, load, evaluate, record) and `supervisor` (the validator rank's child, restarts). Shared:
`handoff` (the queue), `handoff_shards`, `control` (stop/done/heartbeat files), `evaluation`
(metrics, best, early stop). The validator side never imports the trainer side.
"""

"""What the runtime gives every stream stage (a stage imports only this package, its own and
``spendstream``):

- ``app.create_app``: the stage's Faust app (consumer group ``spendstream-<stage>``, its table
  changelogs and data directory), serving ``/healthz`` and ``/metrics``.
- ``consumer``: the guarantee the stages' correctness rests on: each source partition's records
  reach the agent in offset order from the committed offset, none left out, and no offset is
  committed past a record not yet processed. It is the only mechanism for this; the pricing
  stage's skipped-offsets counter is observability only (a tripwire, it repairs nothing).
- ``producer.StageProducer``: the stage's output (batched, zstd, acks=all), awaited before the
  stage acks its input.
- ``retry``: the one classification of errors: transient (retried until it passes), data
  (dead-lettered, counted as poison), anything else a bug (stops the worker).
- ``supervisor``: several stages from one command, one child process each, with one
  ``/healthz`` and the children's ``/metrics`` aggregated.
"""

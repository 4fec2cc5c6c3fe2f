"""The stream stages, by name: stage ``s`` is the package ``stream_processors.<s>`` whose ``agents``
module exposes ``register(app, settings)``. The order is the pipeline's; ``spendstream dev`` gives
stage i the Faust web port ``processors.web_port + i``."""

STAGES = ("pricing", "budgets", "notify", "sink", "anomaly")

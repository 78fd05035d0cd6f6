"""Parts of ``stream-trainer bench``: workload, the three reference stages, the service run,
and the report. :mod:`stream_trainer.bench` composes them."""

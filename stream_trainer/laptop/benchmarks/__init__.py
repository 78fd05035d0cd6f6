"""Parts of ``stream-trainer bench``: workload, the three reference stages, the service run,
and the report. :mod:`stream_trainer.laptop.bench` composes them."""

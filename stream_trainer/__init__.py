"""stream-trainer: continuous model training on Kafka streams."""

__version__ = "0.1.0"

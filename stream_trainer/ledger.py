"""Old path of :mod:`stream_trainer.state.ledger`, kept because pickles name their classes
by module path (checkpoints, published artifacts) and serving code imports it
(docs/design/scale-out.md 9.3)."""

from stream_trainer.state.ledger import *  # noqa: F403

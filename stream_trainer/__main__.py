"""`python -m stream_trainer` is the same as the `stream-trainer` command."""

import sys

from stream_trainer.cli import main

sys.exit(main())

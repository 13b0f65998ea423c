"""`python -m trainer.stage0` (and `accelerate launch -m trainer.stage0`): the stage0 command."""

import sys

from trainer.cli.stages import stage0_main

if __name__ == "__main__":
    sys.exit(stage0_main())

"""`python -m trainer.stage2` (and `accelerate launch -m trainer.stage2`): the stage2 command."""

import sys

from trainer.cli.stages import stage2_main

if __name__ == "__main__":
    sys.exit(stage2_main())

"""`python -m trainer.stage1` (and `accelerate launch -m trainer.stage1`): the stage1 command."""

import sys

from trainer.cli.stages import stage1_main

if __name__ == "__main__":
    sys.exit(stage1_main())

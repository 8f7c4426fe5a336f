"""`python -m fitprune_fx.gpu_check`: correctness and speed checks for a GPU machine (see
`fitprune_fx.testbed.gpu_check`, which holds them: they run on the test bed's models)."""

import sys

from fitprune_fx.testbed.gpu_check import main

if __name__ == "__main__":
    sys.exit(main())

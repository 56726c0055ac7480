"""`python -m bioflax_eqx`: the same command line as `bioflax-eqx`."""

import sys

from .training._cli import main


if __name__ == "__main__":
    sys.exit(main())

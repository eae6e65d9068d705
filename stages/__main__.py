"""``python -m stages ...`` (and ``torchrun -m stages ...``): the ``distill`` command."""

from stages.cli import main

main()

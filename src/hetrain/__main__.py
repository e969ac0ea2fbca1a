"""`python -m hetrain`: the command line (also `torchrun ... -m hetrain train ...`)."""

from hetrain.cli.main import main

main()

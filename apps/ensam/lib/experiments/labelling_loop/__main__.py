"""``python -m lib.experiments.labelling_loop``: the command line of :mod:`lib.experiments.labelling_loop.cli`."""

from .cli import main

if __name__ == "__main__":
    main(prog="labelling_loop.py")  # the usage line as it was when the package was one module

"""Every discovery method on the shipped 2-layer attention-only induction model.

    python -m experiments.induction [--small] [--model DIR] [--out results]
"""

from ._runner import main

if __name__ == "__main__":
    main("induction", description=__doc__.splitlines()[0])

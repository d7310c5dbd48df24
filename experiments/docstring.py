"""Every discovery method on Docstring on GPT-2 small's shape; its published circuit is node-level, for another model (needs --model DIR or --random-weights).

    python -m experiments.docstring [--small] [--model DIR] [--out results]
"""

from ._runner import main

if __name__ == "__main__":
    main("docstring", description=__doc__.splitlines()[0])

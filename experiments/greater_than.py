"""Every discovery method on Greater-Than on GPT-2 small (needs --model DIR, or --random-weights for a dry run).

    python -m experiments.greater_than [--small] [--model DIR] [--out results]
"""

from ._runner import main

if __name__ == "__main__":
    main("greater-than", description=__doc__.splitlines()[0])

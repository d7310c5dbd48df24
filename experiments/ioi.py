"""Every discovery method on IOI on GPT-2 small (needs --model DIR, or --random-weights for a dry run).

    python -m experiments.ioi [--small] [--model DIR] [--out results]
"""

from ._runner import main

if __name__ == "__main__":
    main("ioi", description=__doc__.splitlines()[0])

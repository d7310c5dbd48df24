"""Every discovery method on the compiled tracr program that reverses a sequence (zero ablation by default: its ground truth was made that way).

    python -m experiments.tracr_reverse [--small] [--model DIR] [--out results]
"""

from ._runner import main

if __name__ == "__main__":
    main("tracr-reverse", description=__doc__.splitlines()[0])

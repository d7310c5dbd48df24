"""Every discovery method on the compiled tracr program computing the running fraction of x (zero ablation by default).

    python -m experiments.tracr_xproportion [--small] [--model DIR] [--out results]
"""

from ._runner import main

if __name__ == "__main__":
    main("tracr-xproportion", description=__doc__.splitlines()[0])

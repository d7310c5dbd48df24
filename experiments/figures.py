"""Regenerate the README's pictures from the shipped tracr model (no download).

    python -m experiments.figures [--out experiments/figures]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import acdc_jax as aj
from acdc_jax.viz import draw_circuit, plot_scores


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m experiments.figures", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).parent / "figures"))
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    circuit = aj.discover("tracr-reverse", "tracr-reverse", "acdc", threshold=0.01)
    print(circuit.summary())
    print("written:", draw_circuit(circuit, out / "tracr_reverse_acdc.svg"), plot_scores(circuit, out / "tracr_reverse_scores.svg"))


if __name__ == "__main__":
    main()

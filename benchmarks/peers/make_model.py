"""The shared inputs of a side-by-side run: random GPT-2-shaped Hugging Face folders and one prompts
file, written once so that both sides read identical weights and token ids.

    python -m benchmarks.peers.make_model OUT_DIR [--prompts 8] [--pos 15]

Writes ``OUT_DIR/tiny`` (2 layers, 4 heads, d_model 64, vocabulary 512: 110 q/k/v-split edges) and
``OUT_DIR/gpt2`` (the GPT-2 small shape: 12 layers, 12 heads, d_model 768, vocabulary 50,257:
32,491 edges), each a ``save_pretrained`` folder of a seeded ``GPT2LMHeadModel``, and one prompts file
per model (``OUT_DIR/{tiny,gpt2}.prompts.json``) in acdc-jax's JSON task format (``clean``,
``corrupt``, ``answers``, ``wrong_answers``; the metric reads the last position), which
``autocircuit_run.py`` reads too.

The weights are drawn with a larger ``initializer_range`` than GPT-2's 0.02, so that on random
weights single edges move the metric by amounts well above float32 noise and ACDC's threshold bites.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

SHAPES = {
    # name: (n_layer, n_head, n_embd, vocab_size, n_positions, initializer_range)
    "tiny": (2, 4, 64, 512, 64, 0.2),
    "gpt2": (12, 12, 768, 50257, 1024, 0.05),
}


def write_model(folder: Path, name: str, seed: int = 0) -> Path:
    """A seeded random ``GPT2LMHeadModel`` of shape ``SHAPES[name]``, saved with ``save_pretrained``."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    n_layer, n_head, n_embd, vocab, n_positions, std = SHAPES[name]
    config = GPT2Config(n_layer=n_layer, n_head=n_head, n_embd=n_embd, vocab_size=vocab, n_positions=n_positions,
                        initializer_range=std, bos_token_id=vocab - 1, eos_token_id=vocab - 1,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config).eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    return folder


def write_prompts(path: Path, vocab: int, prompts: int, pos: int, seed: int = 0) -> Path:
    """Random clean and corrupted prompts (same length) with one answer and one wrong answer each."""
    rng = np.random.RandomState(seed)
    clean = rng.randint(0, vocab, (prompts, pos))
    corrupt = rng.randint(0, vocab, (prompts, pos))
    answers = rng.randint(0, vocab, prompts)
    wrong = rng.randint(0, vocab, prompts)
    task = {"name": f"random-{prompts}x{pos}", "metric": "logit_diff", "discovery_metric": "kl",
            "clean": clean.tolist(), "corrupt": corrupt.tolist(),
            "answers": answers.tolist(), "wrong_answers": wrong.tolist(),
            "description": "random token ids; the metrics read the last position"}
    path.write_text(json.dumps(task))
    return path


def write_all(out: Path, prompts: int = 8, pos: int = 15, seed: int = 0) -> dict[str, dict[str, str]]:
    """Both models and their prompts under ``out``; returns ``{name: {"model": dir, "prompts": file}}``."""
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, shape in SHAPES.items():
        folder = write_model(out / name, name, seed)
        prompts_file = write_prompts(out / f"{name}.prompts.json", shape[3], prompts, pos, seed)
        written[name] = {"model": str(folder), "prompts": str(prompts_file)}
    return written


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--pos", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(json.dumps(write_all(args.out, args.prompts, args.pos, args.seed), indent=1))


if __name__ == "__main__":
    main()

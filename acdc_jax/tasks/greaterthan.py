"""Greater-Than (Hanna et al. 2023) on GPT-2 small, as the ACDC paper runs it.

Data (ACDC's ``acdc/greaterthan/utils.py``): prompts "The {noun} lasted from the year {XXYY} to
{XX}" with ACDC's 120 nouns (reproduced as data) and years XXYY of the centuries 1100 to 1700 that
GPT-2 splits into " XX" + "YY", leaving out the first and last such year of each century (ACDC's
filter). Note ACDC's template stops at "to XX"; the paper's "to the year XX" is
``template="paper"``. The corrupted prompt replaces the YY token by "01" (token 486), token for
token, as ACDC does. Nouns and years are drawn as ACDC draws them: ``torch.manual_seed(seed)``,
``torch.randint`` over the nouns then over the years, ``2 * n_prompts`` of each, the first half
being ``split="validation"``. The draws are reproduced without torch (torch's CPU generator is a
standard MT19937), so the defaults (seed 54, 100 prompts) are ACDC's discovery set exactly.

**Other tokenizers** (``tokenizer=``): the 100 answer tokens are the vocabulary's "00".."99" (the tokens
that complete " XX"), the years those that split as " XX" + "YY" (``years``), the nouns those that are
one token (``single_token_nouns``); prompts start with the tokenizer's BOS when its model expects one,
and the labels say where each part sits. A tokenizer that writes numbers one digit per token (Llama
2, Mistral, Gemma, Qwen) or in chunks of three (Llama 3) cannot pose the task: a ``TaskError`` says so.
The canonical circuit is attached only for GPT-2's vocabulary.

Metric: ``prob_diff`` = p(year tokens > YY) - p(year tokens <= YY) at the last position, over the
100 two-digit tokens "00".."99" (``answer_mask``/``wrong_mask``); ACDC's ``greaterthan_metric`` is
its negative. Labels: ``NOUN``, ``XX1``, ``YY``, ``END``.

**Canonical circuit**: ACDC's ``get_greaterthan_true_edges`` (heads 0.1, 0.3, 0.5, 5.5, 6.1, 6.9,
7.10, 8.11, 9.1 and the MLPs). ACDC counts 262 edges; here they are 235 residual edges plus, with
``Graph(internal_edges=True)``, the 27 edges ``a{l}.{h}.q|k|v->a{l}.{h}`` of the 9 heads (ACDC's
``hook_q_input -> hook_q`` edges): 235 + 27 = 262, the same edge set. Nodes: ``embed``, the 9
heads and all 12 MLPs (MLPs 4-7 enter through ACDC's "all MLPs before the AMID heads" edges).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from ..graph import Graph
from ._task import CanonicalCircuit, Task, TaskError
from ._tokenizer import Tokenizer, gpt2_tokenizer, token_at
from .ioi import _nodes_of

# ACDC's NOUNS list (acdc/greaterthan/utils.py), in its order: the random draws index into it.
NOUNS = (
    "abduction", "accord", "affair", "agreement", "appraisal", "assaults", "assessment", "attack", "attempts",
    "campaign", "captivity", "case", "challenge", "chaos", "clash", "collaboration", "coma", "competition",
    "confrontation", "consequence", "conspiracy", "construction", "consultation", "contact", "contract",
    "convention", "cooperation", "custody", "deal", "decline", "decrease", "demonstrations", "development",
    "disagreement", "disorder", "dispute", "domination", "dynasty", "effect", "effort", "employment",
    "endeavor", "engagement", "epidemic", "evaluation", "exchange", "existence", "expansion", "expedition",
    "experiments", "fall", "fame", "flights", "friendship", "growth", "hardship", "hostility", "illness",
    "impact", "imprisonment", "improvement", "incarceration", "increase", "insurgency", "invasion",
    "investigation", "journey", "kingdom", "marriage", "modernization", "negotiation", "notoriety",
    "obstruction", "operation", "order", "outbreak", "outcome", "overhaul", "patrols", "pilgrimage", "plague",
    "plan", "practice", "process", "program", "progress", "project", "pursuit", "quest", "raids", "reforms",
    "reign", "relationship", "retaliation", "riot", "rise", "rivalry", "romance", "rule", "sanctions", "shift",
    "siege", "slump", "stature", "stint", "strikes", "study", "test", "testing", "tests", "therapy", "tour",
    "tradition", "treaty", "trial", "trip", "unemployment", "voyage", "warfare", "work",
)  # fmt: skip
CENTURIES = tuple(range(11, 18))
TEMPLATES = {
    "acdc": "The {noun} lasted from the year {year} to {century}",
    "paper": "The {noun} lasted from the year {year} to the year {century}",
}

# ACDC's ground truth: groups of nodes (Hanna et al.'s names), and which groups feed which.
GT_GROUPS = {
    "0305": ("a0.3", "a0.5"),
    "01": ("a0.1",),
    "MEARLY": ("mlp0", "mlp1", "mlp2", "mlp3"),
    "AMID": ("a5.5", "a6.1", "a6.9", "a7.10", "a8.11", "a9.1"),
    "MLATE": ("mlp8", "mlp9", "mlp10", "mlp11"),
}
GT_CONNECTIONS = (("01", "MEARLY"), ("01", "AMID"), ("0305", "AMID"), ("MEARLY", "AMID"), ("AMID", "MLATE"))
CANONICAL_EDGE_COUNT = 235  # + 27 internal q/k/v edges = ACDC's 262


MIN_NOUNS = 10


def _cannot_pose(tokenizer: Tokenizer, problem: str) -> TaskError:
    """Why Greater-Than cannot be posed with ``tokenizer``, with how it splits a year."""
    example = " 1289"
    ids = tokenizer.word_ids(example) or tokenizer.encode(example)
    pieces = tokenizer.token_strings(ids)
    digits = [p.strip() for p in pieces if p.strip()]
    how = ""
    if "".join(digits) == example.strip() and all(d.isdigit() for d in digits):
        if all(len(d) == 1 for d in digits):
            how = " (one token per digit, as the Llama 2, Mistral, Gemma and Qwen tokenizers split numbers)"
        elif max(len(d) for d in digits) <= 3 and len(digits) > 1:
            how = " (numbers in chunks of up to three digits, as Llama 3's tokenizer splits them)"
    return TaskError(
        f"Greater-Than needs years that tokenize as ' XX' + 'YY': a century token, then one of the 100 two-digit "
        f"tokens '00'..'99' (GPT-2 splits ' 1289' into ' 12' + '89'); the {tokenizer.describe()} {problem}. It "
        f"splits {example!r} into {pieces}{how}. The task cannot be posed with this tokenizer: use a model whose "
        "tokenizer splits years that way, or bring a task of your own (a task JSON of token ids, acdc_jax/tasks/custom.py)"
    )


def year_token_ids(tokenizer: Tokenizer | None = None) -> tuple[int, ...]:
    """Token ids of "00", "01", ..., "99", the tokens that complete a year after " XX" (each one token)."""
    return _year_token_ids(tokenizer or gpt2_tokenizer())


@lru_cache(maxsize=4)
def _year_token_ids(tokenizer: Tokenizer) -> tuple[int, ...]:
    # the vocabulary's entry: encoding "89" alone would give SentencePiece's start-of-word "▁89"
    ids = [tokenizer.backend.token_to_id(f"{i:02d}") for i in range(100)]
    missing = [f"{i:02d}" for i, token in enumerate(ids) if token is None]
    if missing:
        raise _cannot_pose(tokenizer, f"has no token for {len(missing)} of them ({', '.join(missing[:5])}...)")
    return tuple(ids)


def years(tokenizer: Tokenizer | None = None) -> tuple[str, ...]:
    """ACDC's years: per century, those that tokenize as " XX" + "YY", minus the first and last."""
    return _years(tokenizer or gpt2_tokenizer())


@lru_cache(maxsize=4)
def _years(tokenizer: Tokenizer) -> tuple[str, ...]:
    year_ids = year_token_ids(tokenizer)
    kept = []
    for century in CENTURIES:
        prefix = tokenizer.single_token_or_none(f" {century}")
        if prefix is None:
            continue  # no year of this century splits as " XX" + "YY"
        ok = [
            str(year)
            for year in range(century * 100 + 2, century * 100 + 99)
            if tokenizer.word_ids(f" {year}") == [prefix, year_ids[year % 100]]
        ]
        kept += ok[1:-1]
    if not kept:
        raise _cannot_pose(tokenizer, f"splits no year of {CENTURIES[0]}00-{CENTURIES[-1]}99 so")
    return tuple(kept)


def single_token_nouns(tokenizer: Tokenizer | None = None, *, minimum: int = MIN_NOUNS) -> tuple[str, ...]:
    """ACDC's nouns that are one token of ``tokenizer`` mid-sentence (``" treaty"``); GPT-2 keeps all 120."""
    tokenizer = tokenizer or gpt2_tokenizer()
    kept, shown = tokenizer.single_token_words(NOUNS)
    if len(kept) < minimum:
        raise TaskError(
            f"Greater-Than needs at least {minimum} nouns that are single tokens of the {tokenizer.describe()} "
            f"mid-sentence, but only {len(kept)} of ACDC's {len(NOUNS)} are. For example {shown}"
        )
    return kept


def torch_cpu_draws(seed: int, count: int) -> np.ndarray:
    """The first ``count`` raw 32-bit draws of torch's CPU generator after ``torch.manual_seed(seed)``.

    torch's CPU generator is MT19937 with the standard 32-bit seeding (NumPy's legacy
    ``RandomState(seed)`` state), and ``torch.randint(0, high, ...)`` maps each draw to
    ``draw % high``; consecutive ``randint`` calls read consecutive draws.
    """
    if not 0 <= seed < 2**32:
        raise TaskError(f"seed must be in [0, 2**32), got {seed}")
    bits = np.random.MT19937(0)
    bits.state = {"bit_generator": "MT19937", "state": {"key": np.random.RandomState(seed).get_state()[1], "pos": 624}}
    return bits.random_raw(count).astype(np.int64)


def greater_than_task(
    n_prompts: int = 100,
    *,
    seed: int = 54,
    split: str = "validation",
    template: str = "acdc",
    tokenizer: Tokenizer | None = None,
) -> Task:
    """The Greater-Than task; the defaults are ACDC's discovery set (see the module docstring).

    ``tokenizer`` (default GPT-2's): nouns and years are drawn from those that are single tokens
    (``single_token_nouns``, ``years``; all of ACDC's for GPT-2), prompts start with the
    tokenizer's BOS when its model expects one, and a tokenizer that cannot split years as
    " XX" + "YY" is a ``TaskError`` saying so. The canonical circuit (of GPT-2 small) is attached
    only with GPT-2's vocabulary.
    """
    tokenizer = tokenizer or gpt2_tokenizer()
    if n_prompts < 1:
        raise TaskError(f"n_prompts must be positive, got {n_prompts}")
    if split not in ("validation", "test"):
        raise TaskError(f"split must be 'validation' or 'test', got {split!r}")
    if template not in TEMPLATES:
        raise TaskError(f"template must be one of {sorted(TEMPLATES)}, got {template!r}")
    all_years, year_ids, nouns = years(tokenizer), year_token_ids(tokenizer), single_token_nouns(tokenizer)
    draws = torch_cpu_draws(seed, 4 * n_prompts)
    noun_index = draws[: 2 * n_prompts] % len(nouns)
    year_index = draws[2 * n_prompts :] % len(all_years)
    rows = range(n_prompts) if split == "validation" else range(n_prompts, 2 * n_prompts)
    bos = len(tokenizer.bos_prefix)

    clean_rows, texts, yy = [], [], []
    layout = None  # (length, noun position, YY position), the same for every prompt
    for i, row in enumerate(rows):
        noun, year = nouns[noun_index[row]], all_years[year_index[row]]
        text = TEMPLATES[template].format(noun=noun, year=year, century=year[:2])
        ids, offsets = tokenizer.encode_with_offsets(text)
        ids = tokenizer.bos_prefix + ids
        century_id = tokenizer.single_token(" " + year[:2], what=f"prompt {i}: century")
        at_noun = bos + token_at(offsets, text.index(" " + noun) + 1)
        at_yy = bos + token_at(offsets, text.index(year) + 2)
        expected = layout or (len(ids), at_noun, at_yy)
        if (
            ids[at_noun] != tokenizer.single_token(" " + noun, what=f"prompt {i}: noun")
            or ids[at_yy - 1 : at_yy + 1] != [century_id, year_ids[int(year[2:])]]
            or ids[-1] != century_id
            or (len(ids), at_noun, at_yy) != expected
        ):
            raise TaskError(
                f"prompt {i}: {text!r} tokenizes to {tokenizer.token_strings(ids)}; expected {expected[0]} tokens with "
                f"' {noun}' at position {expected[1]}, ' {year[:2]}' and '{year[2:]}' at positions {expected[2] - 1} and "
                f"{expected[2]}, and ' {year[:2]}' last"
            )
        layout = expected
        clean_rows.append(ids)
        texts.append(text)
        yy.append(int(year[2:]))

    _, at_noun, at_yy = layout
    clean = np.asarray(clean_rows, np.int32)
    corrupt = clean.copy()
    corrupt[:, at_yy] = year_ids[1]  # "01"
    batch, n_pos = clean.shape
    later = np.arange(100)[None, :] > np.asarray(yy)[:, None]  # [batch, 100]: year i > YY
    answer_mask = np.zeros((batch, tokenizer.vocab_size), bool)
    wrong_mask = np.zeros((batch, tokenizer.vocab_size), bool)
    answer_mask[:, list(year_ids)] = later
    wrong_mask[:, list(year_ids)] = ~later
    own = tokenizer.folder is not None
    return Task(
        name="greater-than",
        clean=clean,
        corrupt=corrupt,
        positions=np.full((batch, 1), n_pos - 1, np.int32),
        metric="prob_diff",
        answer_mask=answer_mask,
        wrong_mask=wrong_mask,
        labels={
            "NOUN": np.full(batch, at_noun, np.int32),
            "XX1": np.full(batch, at_yy - 1, np.int32),
            "YY": np.full(batch, at_yy, np.int32),
            "END": np.full(batch, n_pos - 1, np.int32),
        },
        canonical=canonical_circuit() if tokenizer.is_gpt2 else None,
        ablation="corrupt",
        model=tokenizer.model_name,
        discovery_metric="kl",
        description=f"Greater-Than ({template} template), torch seed {seed}, {split} split; corrupted: YY -> 01"
        + (f"; {len(nouns)} nouns and {len(all_years)} years that are single tokens, {tokenizer.describe()}" if own else ""),
        prompts=tuple(texts),
    )


# ------------------------------------------------------------------------------------------------
# Canonical circuit


def _inputs(node: str) -> tuple[str, ...]:
    return (node,) if node.startswith("mlp") else tuple(f"{node}.{t}" for t in "qkv")


@lru_cache(maxsize=1)
def canonical_edges() -> tuple[str, ...]:
    """ACDC's Greater-Than ground truth in the GPT-2-small q/k/v-split graph, in the graph's order.

    Every candidate pair is kept only if it is an edge of the graph; that is exactly ACDC's layer
    condition (a head may feed the MLP of its own layer, nothing feeds its own layer otherwise).
    """
    mlp = [f"mlp{layer}" for layer in range(12)]
    amid = GT_GROUPS["AMID"]
    wanted = set()
    for group in ("0305", "01", "MEARLY"):
        wanted |= {f"embed->{dst}" for node in GT_GROUPS[group] for dst in _inputs(node)}
    for group in ("AMID", "MLATE"):
        wanted |= {f"{node}->logits" for node in GT_GROUPS[group]}
    for group in ("MEARLY", "MLATE"):  # MLPs of a group feed each other
        wanted |= {f"{a}->{b}" for a in GT_GROUPS[group] for b in GT_GROUPS[group]}
    for sender, receiver in GT_CONNECTIONS:
        wanted |= {f"{a}->{dst}" for a in GT_GROUPS[sender] for b in GT_GROUPS[receiver] for dst in _inputs(b)}
    # Hanna et al. leave the AMID queries clean; ACDC stands for that with MLP->MLP edges below
    # the last AMID layer and MLP->AMID-query edges
    last_amid = max(int(node[1:].split(".")[0]) for node in amid)
    wanted |= {f"{a}->{b}" for a in mlp[:last_amid] for b in mlp[:last_amid]}
    wanted |= {f"{a}->{node}.q" for a in mlp for node in amid}
    edges = tuple(e for e in Graph(n_layers=12, n_heads=12, has_mlp=True).edges if e in wanted)
    if len(edges) != CANONICAL_EDGE_COUNT:
        raise AssertionError(f"Greater-Than canonical circuit has {len(edges)} edges, expected {CANONICAL_EDGE_COUNT}")
    return edges


def canonical_circuit() -> CanonicalCircuit:
    edges = canonical_edges()
    return CanonicalCircuit(
        edges=edges,
        nodes=_nodes_of(edges),
        ablation="corrupt",
        source="Hanna et al. 2023 circuit as ACDC's get_greaterthan_true_edges encodes it "
        "(235 edges + 27 internal q/k/v edges = ACDC's 262)",
    )

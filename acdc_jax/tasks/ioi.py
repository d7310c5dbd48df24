"""IOI (indirect object identification, Wang et al. 2022) on GPT-2 small, as the ACDC paper runs it.

Data: the IOI paper's 99 names, 8 places, 8 objects and 15 BABA templates, reproduced as data from
ACDC's ``acdc/ioi/ioi_dataset.py`` (itself from the IOI paper's code); an ABBA template swaps the
first [A] and [B] of a BABA template. Prompts end before the final name (the IO), which is the
answer; the wrong answer is the subject S. Corrupted prompts are ACDC's "ABC" data: the IO name
(both occurrences), then both S names, then S1 alone are replaced by random names, with ACDC's
seeds and its exact replacement rules (the three new names are not forced to be distinct).

**Defaults reproduce ACDC's IOI run exactly** (``acdc/ioi/utils.py: get_all_ioi_things``):
ABBA prompts from one template ("Then, [A] and [B] went to the [PLACE]. [B] gave a [OBJECT] to
[A]"), 200 prompts drawn with seed 0, the first 100 for discovery (``split="validation"``) and
the next 100 for ``split="test"``; 15 tokens, no BOS. The random draws follow Python's
``random`` and NumPy's legacy generator call for call, so the prompts are ACDC's, word for word.
They are the default so that results compare with the paper. ``prompt_type="mixed"`` with
``n_templates=None`` gives the IOI paper's wider set (7 BABA and 7 ABBA templates, as ACDC's
``IOIDataset`` builds it); prompts then differ in length, are right-padded with token 50256, and
``positions`` holds each prompt's END.

**Other tokenizers** (``tokenizer=``, e.g. ``load_tokenizer(model_folder)``): the names are those of the
99 that are one token of that tokenizer as they read mid-sentence (" Mary", SentencePiece's "▁Mary"),
at least ``MIN_NAMES``; the draws and flips run over that list (for GPT-2 it is the whole list, so the
prompts stay ACDC's). Prompts start with the tokenizer's BOS when its model expects one (Llama,
Mistral), and the labels count it. The canonical circuit (GPT-2 small's heads) is attached only for
GPT-2's vocabulary.

Metric: ``logit_diff`` = logit(IO) - logit(S) at END. Labels: ``IO``, ``S1``, ``S1+1``, ``S2``,
``END``. ``pairs=True`` (ACDC's ``symmetric``): rows 2i and 2i+1 are one prompt with the IO and S
names swapped, so their answers are swapped.

**Canonical circuit** (``canonical_circuit``): the IOI paper's 26 heads in 7 classes and the
connections between classes exactly as ACDC's ``get_ioi_true_edges`` encodes them. ACDC counts
1,041 edges. In this project's names that is 963 residual edges ``src->a{l}.{h}.q|k|v``,
``src->mlp{l}``, ``src->logits``, plus, with ``Graph(internal_edges=True)``, the 78 edges
``a{l}.{h}.q|k|v->a{l}.{h}`` of the 26 circuit heads (ACDC's ``hook_q_input -> hook_q`` edges,
which it counts; its ``hook_q -> hook_result`` and ``mlp_in -> mlp_out`` placeholders are not
counted by ACDC and have no counterpart here): 963 + 78 = 1,041, the same edge set. ACDC's IOI
graph uses one embedding node (``blocks.0.hook_resid_pre``), as our ``embed`` does. Note what
ACDC's encoding implies: every MLP is in the circuit, connected to everything in it (MLPs read and
write all circuit heads' q/k/v inputs, other MLPs and the logits, and ``embed->logits`` is in), and
only the head-to-head and embed-to-head edges follow the class connections. Node set: ``embed``,
the 12 MLPs and the 26 heads (the nodes of those edges, as ACDC's node-level ROC counts them);
``IOI_HEAD_CLASSES`` has the heads alone.
"""

from __future__ import annotations

import dataclasses
import random
from functools import lru_cache

import numpy as np

from ..graph import Graph
from ._task import CanonicalCircuit, Task, TaskError
from ._tokenizer import Tokenizer, gpt2_tokenizer, right_pad

# ------------------------------------------------------------------------------------------------
# Data of the IOI paper (Wang et al. 2022), in the order of ACDC's acdc/ioi/ioi_dataset.py; the
# order matters: the random draws index into these lists.

NAMES = (
    "Michael", "Christopher", "Jessica", "Matthew", "Ashley", "Jennifer", "Joshua", "Amanda", "Daniel",
    "David", "James", "Robert", "John", "Joseph", "Andrew", "Ryan", "Brandon", "Jason", "Justin", "Sarah",
    "William", "Jonathan", "Stephanie", "Brian", "Nicole", "Nicholas", "Anthony", "Heather", "Eric",
    "Elizabeth", "Adam", "Megan", "Melissa", "Kevin", "Steven", "Thomas", "Timothy", "Christina", "Kyle",
    "Rachel", "Laura", "Lauren", "Amber", "Brittany", "Danielle", "Richard", "Kimberly", "Jeffrey", "Amy",
    "Crystal", "Michelle", "Tiffany", "Jeremy", "Benjamin", "Mark", "Emily", "Aaron", "Charles", "Rebecca",
    "Jacob", "Stephen", "Patrick", "Sean", "Erin", "Jamie", "Kelly", "Samantha", "Nathan", "Sara", "Dustin",
    "Paul", "Angela", "Tyler", "Scott", "Katherine", "Andrea", "Gregory", "Erica", "Mary", "Travis", "Lisa",
    "Kenneth", "Bryan", "Lindsey", "Kristen", "Jose", "Alexander", "Jesse", "Katie", "Lindsay", "Shannon",
    "Vanessa", "Courtney", "Christine", "Alicia", "Cody", "Allison", "Bradley", "Samuel",
)  # fmt: skip
PLACES = ("store", "garden", "restaurant", "school", "hospital", "office", "house", "station")
OBJECTS = ("ring", "kiss", "bone", "basketball", "computer", "necklace", "drink", "snack")

BABA_TEMPLATES = (
    "Then, [B] and [A] went to the [PLACE]. [B] gave a [OBJECT] to [A]",
    "Then, [B] and [A] had a lot of fun at the [PLACE]. [B] gave a [OBJECT] to [A]",
    "Then, [B] and [A] were working at the [PLACE]. [B] decided to give a [OBJECT] to [A]",
    "Then, [B] and [A] were thinking about going to the [PLACE]. [B] wanted to give a [OBJECT] to [A]",
    "Then, [B] and [A] had a long argument, and afterwards [B] said to [A]",
    "After [B] and [A] went to the [PLACE], [B] gave a [OBJECT] to [A]",
    "When [B] and [A] got a [OBJECT] at the [PLACE], [B] decided to give it to [A]",
    "When [B] and [A] got a [OBJECT] at the [PLACE], [B] decided to give the [OBJECT] to [A]",
    "While [B] and [A] were working at the [PLACE], [B] gave a [OBJECT] to [A]",
    "While [B] and [A] were commuting to the [PLACE], [B] gave a [OBJECT] to [A]",
    "After the lunch, [B] and [A] went to the [PLACE]. [B] gave a [OBJECT] to [A]",
    "Afterwards, [B] and [A] went to the [PLACE]. [B] gave a [OBJECT] to [A]",
    "Then, [B] and [A] had a long argument. Afterwards [B] said to [A]",
    "The [PLACE] [B] and [A] went to had a [OBJECT]. [B] gave it to [A]",
    "Friends [B] and [A] found a [OBJECT] at the [PLACE]. [B] gave it to [A]",
)


def _to_abba(template: str) -> str:
    """Swap the first [B] and the first [A]: the first clause names IO before S."""
    return template.replace("[B]", "\0", 1).replace("[A]", "[B]", 1).replace("\0", "[A]", 1)


ABBA_TEMPLATES = tuple(_to_abba(t) for t in BABA_TEMPLATES)
PROMPT_TYPES = ("ABBA", "BABA", "mixed")

# The 26 heads of the IOI circuit by class, as ACDC's IOI_CIRCUIT lists them (layer, head).
IOI_HEAD_CLASSES = {
    "name mover": ((9, 9), (10, 0), (9, 6)),
    "backup name mover": ((10, 10), (10, 6), (10, 2), (10, 1), (11, 2), (9, 7), (9, 0), (11, 9)),
    "negative": ((10, 7), (11, 10)),
    "s2 inhibition": ((7, 3), (7, 9), (8, 6), (8, 10)),
    "induction": ((5, 5), (5, 8), (5, 9), (6, 9)),
    "duplicate token": ((0, 1), (0, 10), (3, 0)),
    "previous token": ((2, 2), (4, 11)),
}
# (sender class, receiver class, receiver inputs): ACDC's special_connections. "input" is embed
# and every MLP; "output" is the logits (and every MLP, which ACDC never disconnects anyway).
IOI_CONNECTIONS = (
    ("input", "previous token", "qkv"),
    ("input", "duplicate token", "qkv"),
    ("input", "s2 inhibition", "q"),
    ("input", "negative", "kv"),
    ("input", "name mover", "kv"),
    ("input", "backup name mover", "kv"),
    ("previous token", "induction", "kv"),
    ("induction", "s2 inhibition", "kv"),
    ("duplicate token", "s2 inhibition", "kv"),
    ("s2 inhibition", "negative", "q"),
    ("s2 inhibition", "name mover", "q"),
    ("s2 inhibition", "backup name mover", "q"),
    ("negative", "output", ""),
    ("name mover", "output", ""),
    ("backup name mover", "output", ""),
)
CANONICAL_EDGE_COUNT = 963  # + 78 internal q/k/v edges = ACDC's 1,041

# ACDC's seeds: IOIDataset(seed) samples with Python's random seeded as below; the ABC data comes
# from three gen_flipped_prompts calls with seeds 1, 2, 3 (here seed+1..seed+3, the same at seed=0).


def _prompt_seed(seed: int) -> int:
    return (seed + 987654321) % 123456789


def _flip_seed(seed: int) -> int:
    return (seed + 345467) % 5432


@dataclasses.dataclass(frozen=True)
class IOIPrompt:
    """One IOI sentence, final IO name included (``text``), and its names."""

    text: str
    io: str
    s: str
    template: str


def ioi_templates(prompt_type: str = "ABBA", n_templates: int | None = 1, seed: int = 0) -> tuple[str, ...]:
    """The templates ACDC's ``IOIDataset(prompt_type, nb_templates, seed)`` samples from.

    ``n_templates=None`` means all 15; ``mixed`` takes ``n_templates // 2`` of each order and
    shuffles them with Python's ``random`` seeded with ``seed``, as ACDC does.
    """
    if prompt_type not in PROMPT_TYPES:
        raise TaskError(f"prompt_type must be one of {PROMPT_TYPES}, got {prompt_type!r}")
    n = len(BABA_TEMPLATES) if n_templates is None else n_templates
    if not 1 <= n <= len(BABA_TEMPLATES):
        raise TaskError(f"n_templates must be between 1 and {len(BABA_TEMPLATES)} (or None for all), got {n_templates}")
    if prompt_type == "ABBA":
        return ABBA_TEMPLATES[:n]
    if prompt_type == "BABA":
        return BABA_TEMPLATES[:n]
    if n < 2:
        raise TaskError("prompt_type='mixed' takes n_templates // 2 templates of each order; pass n_templates >= 2 or None")
    templates = list(BABA_TEMPLATES[: n // 2] + ABBA_TEMPLATES[: n // 2])
    random.Random(seed).shuffle(templates)
    return tuple(templates)


def sample_prompts(
    n: int, templates: tuple[str, ...], seed: int = 0, pairs: bool = False, names: tuple[str, ...] = NAMES
) -> list[IOIPrompt]:
    """``n`` prompts drawn as ACDC's ``gen_prompt_uniform`` draws them (``pairs`` = its ``symmetric``)."""
    if len(set(names)) < 3:
        raise TaskError(f"IOI prompts need at least 3 distinct names, got {len(set(names))}")
    rng = random.Random(_prompt_seed(seed))
    prompts: list[IOIPrompt] = []
    while len(prompts) < n:
        template = rng.choice(templates)
        while True:  # three distinct names; the third is drawn but unused, as in ACDC
            a, b, c = rng.choice(names), rng.choice(names), rng.choice(names)
            if len({a, b, c}) == 3:
                break
        place, obj = rng.choice(PLACES), rng.choice(OBJECTS)
        filled = template.replace("[PLACE]", place).replace("[OBJECT]", obj)
        prompts.append(IOIPrompt(filled.replace("[A]", a).replace("[B]", b), io=a, s=b, template=template))
        if pairs and len(prompts) < n:
            prompts.append(IOIPrompt(filled.replace("[A]", b).replace("[B]", a), io=b, s=a, template=template))
    return prompts


def _last_index(words: list[str], word: str) -> int:
    return len(words) - 1 - words[::-1].index(word)


def abc_corruption(prompts: list[IOIPrompt], seed: int = 0, names: tuple[str, ...] = NAMES) -> list[str]:
    """ACDC's ABC patch data: new IO name (both places), new S name (both), then a new S1.

    Word-level replacements with NumPy's legacy generator, as ACDC's ``gen_flipped_prompts``
    with flips ``("IO", "RAND")``, ``("S", "RAND")``, ``("S1", "RAND")`` and seeds 1, 2, 3.
    """
    words = [p.text.split(" ") for p in prompts]
    io = [p.io for p in prompts]
    s = [p.s for p in prompts]
    rs = np.random.RandomState(_flip_seed(seed + 1))
    for i, w in enumerate(words):
        new = names[rs.randint(len(names))]
        while new in (io[i], s[i]):
            new = names[rs.randint(len(names))]
        w[w.index(io[i])] = new
        w[w.index(io[i])] = new
        io[i] = new
    rs = np.random.RandomState(_flip_seed(seed + 2))
    for i, w in enumerate(words):
        new = names[rs.randint(len(names))]
        w[w.index(s[i])] = new
        w[_last_index(w, s[i])] = new
        s[i] = new
    rs = np.random.RandomState(_flip_seed(seed + 3))
    for i, w in enumerate(words):
        new = names[rs.randint(len(names))]
        w[w.index(s[i])] = new
    return [" ".join(w) for w in words]


MIN_NAMES = 10  # fewer single-token names leave too little variety: each prompt draws three, ABC three more


def single_token_names(tokenizer: Tokenizer | None = None, *, minimum: int = MIN_NAMES) -> tuple[str, ...]:
    """The IOI names that are one token of ``tokenizer`` mid-sentence (``" Mary"``), in ``NAMES`` order.

    GPT-2 keeps all 99. Names that split, or that are the unknown token, are left out; fewer than
    ``minimum`` left is a ``TaskError`` that shows how the others tokenize.
    """
    tokenizer = tokenizer or gpt2_tokenizer()
    kept, shown = tokenizer.single_token_words(NAMES)
    if len(kept) < minimum:
        raise TaskError(
            f"IOI needs at least {minimum} names that are single tokens of the {tokenizer.describe()} as they read "
            f"mid-sentence (' Mary'), but only {len(kept)} of the IOI paper's {len(NAMES)} are"
            f"{': ' + ', '.join(kept) if kept else ''}. For example {shown}. This tokenizer cannot pose IOI with "
            "these names; bring a task of your own (a task JSON of token ids, acdc_jax/tasks/custom.py)"
        )
    return kept


def ioi_task(
    n_prompts: int = 100,
    *,
    seed: int = 0,
    prompt_type: str = "ABBA",
    n_templates: int | None = 1,
    split: str = "validation",
    pairs: bool = False,
    tokenizer: Tokenizer | None = None,
) -> Task:
    """The IOI task; the defaults are ACDC's discovery set (see the module docstring).

    ACDC draws ``2 * n_prompts`` prompts: ``split="validation"`` is the first half, ``"test"``
    the second. ``seed`` is ACDC's ``IOIDataset`` seed; the ABC flips use ``seed + 1..3`` (ACDC
    uses 1, 2, 3 whatever the seed, so the two agree at its seed 0). ``pairs=True`` needs an even
    ``n_prompts``.

    ``tokenizer`` (default GPT-2's): names are drawn from ``single_token_names(tokenizer)`` (all 99
    for GPT-2, so its prompts are ACDC's); prompts start with the tokenizer's BOS when its model
    expects one, and the labels count it. The canonical circuit (of GPT-2 small) is attached only
    with GPT-2's vocabulary.
    """
    tokenizer = tokenizer or gpt2_tokenizer()
    if n_prompts < 1:
        raise TaskError(f"n_prompts must be positive, got {n_prompts}")
    if split not in ("validation", "test"):
        raise TaskError(f"split must be 'validation' or 'test', got {split!r}")
    if pairs and n_prompts % 2:
        raise TaskError(f"pairs=True puts each prompt next to its name-swapped twin; n_prompts must be even, got {n_prompts}")
    templates = ioi_templates(prompt_type, n_templates, seed)
    names = single_token_names(tokenizer)
    drawn = sample_prompts(2 * n_prompts, templates, seed, pairs, names)
    corrupted = abc_corruption(drawn, seed, names)
    rows = slice(0, n_prompts) if split == "validation" else slice(n_prompts, 2 * n_prompts)
    chosen, corrupted = drawn[rows], corrupted[rows]

    clean_rows, corrupt_rows, texts = [], [], []
    answers, wrong = [], []
    labels: dict[str, list[int]] = {"IO": [], "S1": [], "S1+1": [], "S2": [], "END": []}
    for i, (prompt, corrupt_text) in enumerate(zip(chosen, corrupted)):
        # the answer is the last word, the IO name; the prompt stops before it
        text, final = prompt.text.rsplit(" ", 1)
        if final != prompt.io:
            raise TaskError(f"prompt {i}: {prompt.text!r} does not end with its IO name {prompt.io!r}")
        io_id = tokenizer.single_token(" " + prompt.io, what=f"prompt {i}: IO name")
        s_id = tokenizer.single_token(" " + prompt.s, what=f"prompt {i}: subject name")
        clean_ids, corrupt_ids = tokenizer.encode_pair(text, corrupt_text.rsplit(" ", 1)[0], row=i)
        io_at = [j for j, t in enumerate(clean_ids) if t == io_id]
        s_at = [j for j, t in enumerate(clean_ids) if t == s_id]
        if len(io_at) != 1 or len(s_at) != 2:
            raise TaskError(
                f"prompt {i}: {text!r} should name the IO ({prompt.io!r}) once and the subject ({prompt.s!r}) twice "
                f"as single tokens; found them at positions {io_at} and {s_at} in {tokenizer.token_strings(clean_ids)}"
            )
        if tokenizer.continuation(text, " " + prompt.io) != [io_id]:
            raise TaskError(
                f"prompt {i}: the answer ' {prompt.io}' does not continue {text!r} as the one token "
                f"{tokenizer.shown([io_id])}: {tokenizer.shown(tokenizer.encode(prompt.text))}"
            )
        for key, value in (("IO", io_at[0]), ("S1", s_at[0]), ("S1+1", s_at[0] + 1), ("S2", s_at[1]), ("END", len(clean_ids) - 1)):
            labels[key].append(value)
        clean_rows.append(clean_ids)
        corrupt_rows.append(corrupt_ids)
        texts.append(text)
        answers.append([io_id])
        wrong.append([s_id])

    end = np.asarray(labels["END"], np.int32)
    order = "both orders" if prompt_type == "mixed" else prompt_type
    own = tokenizer.folder is not None
    return Task(
        name="ioi",
        clean=right_pad(clean_rows, tokenizer.pad_id),
        corrupt=right_pad(corrupt_rows, tokenizer.pad_id),
        positions=end[:, None],
        metric="logit_diff",
        answers=np.asarray(answers, np.int32),
        wrong_answers=np.asarray(wrong, np.int32),
        labels={k: np.asarray(v, np.int32) for k, v in labels.items()},
        canonical=canonical_circuit() if tokenizer.is_gpt2 else None,
        ablation="corrupt",
        model=tokenizer.model_name,
        discovery_metric="kl",
        description=(
            f"IOI, {order} prompts from {len(templates)} template(s), seed {seed}, {split} split"
            f"{', name-swapped pairs' if pairs else ''}; corrupted: ACDC's ABC prompts"
            + (f"; {len(names)} single-token names, {tokenizer.describe()}" if own else "")
        ),
        prompts=tuple(texts),
    )


# ------------------------------------------------------------------------------------------------
# Canonical circuit


def _head_classes() -> dict[str, str]:
    return {f"a{layer}.{head}": cls for cls, heads in IOI_HEAD_CLASSES.items() for layer, head in heads}


@lru_cache(maxsize=1)
def canonical_edges() -> tuple[str, ...]:
    """ACDC's IOI ground truth in the GPT-2-small q/k/v-split graph, in the graph's edge order."""
    head_class = _head_classes()
    wired = {(sender, receiver, letter) for sender, receiver, letters in IOI_CONNECTIONS for letter in letters or "-"}
    edges = []
    for edge in Graph(n_layers=12, n_heads=12, has_mlp=True).edges:
        src, dst = Graph.split_edge(edge)
        sender = "input" if src == "embed" or src.startswith("mlp") else head_class.get(src)
        if sender is None:
            continue  # a head outside the circuit
        if dst == "logits":
            keep = sender == "input" or (sender, "output", "-") in wired
        elif dst.startswith("mlp"):
            keep = True  # ACDC never disconnects MLP inputs
        else:
            head, letter = dst.rsplit(".", 1)
            receiver = head_class.get(head)
            # ACDC removes only embed->head and head->head edges into circuit heads, then adds the
            # class connections: MLP->head edges stay, whatever the q/k/v input
            keep = receiver is not None and (src.startswith("mlp") or (sender, receiver, letter) in wired)
        if keep:
            edges.append(edge)
    if len(edges) != CANONICAL_EDGE_COUNT:
        raise AssertionError(f"IOI canonical circuit has {len(edges)} edges, expected {CANONICAL_EDGE_COUNT}")
    return tuple(edges)


def _nodes_of(edges: tuple[str, ...]) -> tuple[str, ...]:
    graph = Graph(n_layers=12, n_heads=12, has_mlp=True)
    touched = set()
    for edge in edges:
        src, dst = Graph.split_edge(edge)
        touched.add(src)
        if dst != "logits":
            touched.add(dst.rsplit(".", 1)[0] if dst.count(".") == 2 else dst)
    return tuple(n for n in graph.sources if n in touched)


def canonical_circuit() -> CanonicalCircuit:
    edges = canonical_edges()
    return CanonicalCircuit(
        edges=edges,
        nodes=_nodes_of(edges),
        ablation="corrupt",
        source="IOI paper (Wang et al. 2022) head classes and connections as ACDC's get_ioi_true_edges encodes them "
        "(963 edges + 78 internal q/k/v edges = ACDC's 1,041)",
    )

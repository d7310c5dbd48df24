"""Docstring (Heimersheim & Janiak 2023): predict the next parameter name in a Python docstring.

The published circuit was found in a 4-layer attention-only model (TransformerLens'
``attn-only-4l``, 8 heads per layer) with its own tokenizer; neither its weights nor its tokenizer
are available here. This module ships what carries over:

- the dataset: ACDC's prompt generator (``acdc/docstring/prompts.py:
  docstring_induction_prompt_generator`` with ACDC's settings: reST style, 3 matching arguments, 2
  def prefix and 1 def suffix arguments, 3 description words, 2 words per parameter description),
  re-implemented for GPT-2's tokenizer. Its word lists are reproduced as data; every word is one
  GPT-2 token, with and without a leading space, so the draws (Python's ``random`` seeded with
  ``seed + i`` for prompt i, as ACDC seeds 0..2N-1) give ACDC's prompt texts exactly. A BOS token
  (50256) comes first, as ACDC's ``to_tokens`` adds one. Corrupted prompts: ACDC's
  ``random_random`` variant (the three matching def arguments and the two docstring parameters
  replaced by other random names);
- the metric: ``logit_diff`` between the correct name and the best of the 13 wrong names (ACDC's
  ``docstring_metric``, un-negated): ``metric_options={"wrong_reduce": "max"}``;
- labels: ``A_def``, ``B_def``, ``C_def`` (the matching arguments in the signature; C is the
  answer), ``A_doc``, ``B_doc`` (the documented parameters), ``END`` (the last ``:param``);
- the canonical circuit **as a node set only**: ``embed`` and heads 0.5, 1.2, 1.4, 2.0, 3.0, 3.6,
  the nodes of ACDC's ``get_docstring_subgraph_true_edges``. These names refer to heads of that
  4-layer model, not to heads of GPT-2 small.
  ``attn_only_4l_circuit()`` gives ACDC's 37 edges of the 4-layer model (24 residual edges + 13
  internal q/k/v edges), for a user who brings that model.

The task's default model is ``gpt2`` (GPT-2 small shape). With another tokenizer (``tokenizer=``), the
variable names are those that are one token after a space, and a prompt whose labelled arguments do
not come out as single tokens in place is a ``TaskError``.
"""

from __future__ import annotations

import random

import numpy as np

from ._task import CanonicalCircuit, Task, TaskError
from ._tokenizer import Tokenizer, gpt2_tokenizer, right_pad, token_at

# ACDC's word lists (acdc/docstring/prompts.py: variable_names, common_single_token_nouns), in
# their order: the random draws index into them.
VARIABLE_NAMES = tuple(
    """
        data name file value test new result line user key default request path output node item url
        model response text version function log string field start number values sub index error
        current context image message check json create size event state row obj parser end files
        form query fields instance label run action target array code num table source msg config
        first required options ret update module status group content client filename results last
        read command val base format color settings order found count match tag title parent call
        session token server host date description mode expected project info valid page header
        option task shape load names port old resource root
    """.split()
)
NOUNS = tuple(
    """
        price control action cost issue process position course minute education type research
        subject girl age father force order value act matter health lot street patient class mind
        church condition paper bank century section activity table building sense sort staff team
        student language town plan management morning committee product practice evidence ground
        letter foot boy back game food union role event land art support range stage trade voice arm
        club field history parent account material care manager project record example training
        window air light wife quality rule pound story tax worker data model nature bed hospital
        method unit detail date wall computer amount bit president chapter property son director
        leader south application board king production operation share lord contract picture test
        security election source colour future site loss shop animal heart purpose standard page
        doctor factor hair love music charge pattern design piece population tree knowledge
        performance plant pressure fire environment size analysis rest success thought region list
        relation set space statement demand sea step capital choice player station film feature
        income individual cup technology machine cell degree energy growth treatment mile function
        risk sound task top resource floor science style hall horse response character user answer
        dog look brother argument season bill element glass duty claim fund leg park title note
        daughter sun box river profit division stone post client help image oil sector attack
        direction seat employment goal sign ability campaign fish item medium show version drug
        library press surface blood culture memory return bar talk access deal star text cause mouth
        payment context reference second article chair earth object agency card collection
        communication public document weight bird rock call edge miss option quarter stock aid
        concept match network radio target finger forest race sex ball crime message peace review
        scale scene speech band expression hill reader owner trust truth turn file past start trial
        balance copy league length wind front move pain spirit train contact official strength cash
        gas shape agent pair protection rise driver master meaning vote adult play fig route speed
        credit impact danger flower half path track video aim bag comment content distance gold link
        skin boat dad prison sight wine offer writer hole package confidence generation key phone
        sample ship threat volume author background engine entry stuff yard bus regulation row song
        category consumer football meal wood bridge description existence flat lip session sheet
        code flight limit plate rain respect writing capacity dream selection spring while
        definition egg examination mark notice output will address bottom kid middle neck run acid
        assembly birth ear error module store transfer wave channel component cut fee lead weather
        block brain guide program screen connection cover map metal phase pool search sequence sky
        sum trip cat display gallery gate heat location reading theme drive faith hell learning
        opening priority spot tool castle coal flow lane motion release total wing border index
        pocket ring billion device engineering fruit lake leaf pub request square tone walk chain
        circle creation fall present shot fashion god mass panel fan iron origin ticket bone cancer
        chief editor fuel general height round vision warning being cross living rail working column
        finding gap grass plane root score shadow shock touch database formation male ref resident
        resolution topic break camp currency phrase thinking coat mill stress boot command depth
        female frame framework holder ice inch port protein rose saving string wheel bishop cycle
        export hat load mode setting stairs travel average camera focus green guard input layer poll
        sleep suit bread cake efficiency peak self angle bay bid cloud custom dollar variable zone
        actor chip core final frequency gain guy relative rent reply secret shirt apple instance
        intelligence lad pipe anger disk fight hero journal left mail pace paragraph platform print
        rank sand scope shift stream chemical clock delay host human count mission pack seed tail
        tie watch dark hold mine net tip dimension operator professional shell storage summary tube
        conduct determination drop import label percent pot proof unity win wire bell comfort
        complex draft grade lift mouse movie profile standing belt black check joy local pit red
        register storm album ban bench button cap chart coin dust folk margin pole stand stick tin
    """.split()
)

# ACDC's get_all_docstring_things settings
N_MATCHING, N_DEF_PREFIX, N_DEF_SUFFIX, N_DOC_PREFIX = 3, 2, 1, 0
DESCRIPTION_WORDS, PARAM_DESCRIPTION_WORDS = 3, 2
# names drawn per prompt besides the method's (the generator's groups, in the order it splits them)
_N_NAMES = 1 + 2 * N_MATCHING + 2 * (N_MATCHING - 1) + N_DEF_PREFIX + N_DEF_SUFFIX + N_DOC_PREFIX
_INDENT = "    "

CANONICAL_NODES = ("embed", "a0.5", "a1.2", "a1.4", "a2.0", "a3.0", "a3.6")
# ACDC's get_docstring_subgraph_true_edges (attn-only-4l), residual edges in our names
ATTN_ONLY_4L_EDGES = (
    "embed->a0.5.v",
    "embed->a1.2.q", "a0.5->a1.2.q", "embed->a1.2.k", "a0.5->a1.2.k",
    "embed->a1.4.v", "a0.5->a1.4.v",
    "embed->a2.0.q", "a0.5->a2.0.q", "embed->a2.0.k", "a0.5->a2.0.k", "a1.4->a2.0.v",
    "a1.4->a3.0.q", "a1.2->a3.0.k", "a2.0->a3.0.k", "embed->a3.0.v", "a0.5->a3.0.v", "a3.0->logits",
    "a1.4->a3.6.q", "a1.2->a3.6.k", "a2.0->a3.6.k", "embed->a3.6.v", "a0.5->a3.6.v", "a3.6->logits",
)  # fmt: skip


def _split(items: list[str], sizes: tuple[int, ...]) -> list[list[str]]:
    starts = np.cumsum((0,) + sizes)
    return [items[a:b] for a, b in zip(starts[:-1], starts[1:])]


def _render(method: str, description: list[str], def_args: list[str], doc_args: list[str], doc_descriptions: list[list[str]]) -> tuple[str, list[int], list[int]]:
    """A reST-style prompt ending in ``:param``, and where each def and doc argument starts."""
    text = f"\ndef {method}(self, "
    def_starts = []
    for i, arg in enumerate(def_args):
        def_starts.append(len(text))
        text += arg + (", " if i < len(def_args) - 1 else "")
    text += f'):\n{_INDENT}"""{" ".join(description)}\n\n'
    doc_starts = []
    for arg, words in zip(doc_args, doc_descriptions):
        text += f"{_INDENT}:param "
        doc_starts.append(len(text))
        text += f"{arg}: {' '.join(words)}\n"
    if not doc_args:
        text += "\n"
    return text + f"{_INDENT}:param", def_starts, doc_starts


def single_token_variable_names(tokenizer: Tokenizer | None = None) -> tuple[str, ...]:
    """ACDC's variable names that are one token of ``tokenizer`` after a space (GPT-2 keeps all)."""
    tokenizer = tokenizer or gpt2_tokenizer()
    kept, shown = tokenizer.single_token_words(VARIABLE_NAMES)
    needed = 1 + _N_NAMES
    if len(kept) < needed:
        raise TaskError(
            f"Docstring draws {needed} distinct variable names per prompt, each a single token after a space, but "
            f"only {len(kept)} of ACDC's {len(VARIABLE_NAMES)} are single tokens of the {tokenizer.describe()}. "
            f"For example {shown}"
        )
    return kept


def docstring_task(
    n_prompts: int = 50, *, seed: int = 0, split: str = "validation", tokenizer: Tokenizer | None = None
) -> Task:
    """The Docstring task: prompt i of the validation split is ACDC's prompt with seed ``seed + i``.

    ACDC draws ``2 * n_prompts`` prompts (seeds 0..2N-1) and uses the first half for discovery;
    ``split="test"`` is the second half.

    ``tokenizer`` (default GPT-2's): variable names are drawn from those that are single tokens
    after a space (``single_token_variable_names``; all for GPT-2), and every prompt starts with the
    tokenizer's BOS (or, lacking one, its EOS, as GPT-2's ``<|endoftext|>``).
    """
    tokenizer = tokenizer or gpt2_tokenizer()
    if n_prompts < 1:
        raise TaskError(f"n_prompts must be positive, got {n_prompts}")
    if split not in ("validation", "test"):
        raise TaskError(f"split must be 'validation' or 'test', got {split!r}")
    first = seed if split == "validation" else seed + n_prompts
    variable_names = single_token_variable_names(tokenizer)
    start_id = tokenizer.document_start_id
    start = [] if start_id is None else [start_id]

    clean_rows, corrupt_rows, texts, answers, wrong = [], [], [], [], []
    label_names = ("A_def", "B_def", "C_def", "A_doc", "B_doc", "END")
    labels: dict[str, list[int]] = {k: [] for k in label_names}
    for i in range(n_prompts):
        rng = random.Random(first + i)
        method, *args = rng.sample(variable_names, 1 + _N_NAMES)
        # ACDC's generator splits the drawn names in this order; the unused groups feed its other corruptions
        sizes = (1, N_MATCHING, N_MATCHING - 1, N_MATCHING - 1, N_MATCHING, N_DEF_PREFIX, N_DEF_SUFFIX, N_DOC_PREFIX)
        _, rr_def, rr_doc, _, matching, def_prefix, def_suffix, doc_prefix = _split(args, sizes)
        description = rng.sample(NOUNS, DESCRIPTION_WORDS)
        doc_args = doc_prefix + matching[:-1]
        doc_descriptions = [rng.sample(NOUNS, PARAM_DESCRIPTION_WORDS) for _ in doc_args]
        clean_def = def_prefix + matching + def_suffix
        clean_text, def_starts, doc_starts = _render(method, description, clean_def, doc_args, doc_descriptions)
        corrupt_text, _, _ = _render(method, description, def_prefix + rr_def + def_suffix, doc_prefix + rr_doc, doc_descriptions)

        answer = matching[-1]
        answer_id = tokenizer.single_token(" " + answer, what=f"prompt {i}: answer")
        wrong_ids = [tokenizer.single_token(" " + a, what=f"prompt {i}: wrong answer") for a in args if a != answer]
        clean_ids, corrupt_ids = tokenizer.encode_pair(clean_text, corrupt_text, row=i, start=start)
        ids, offsets = tokenizer.encode_with_offsets(clean_text)
        places = {
            **{f"{letter}_def": def_starts[N_DEF_PREFIX + k] for k, letter in enumerate("ABC")},
            **{f"{letter}_doc": doc_starts[N_DOC_PREFIX + k] for k, letter in enumerate("AB")},
        }
        for label, char in places.items():
            at = token_at(offsets, char)
            word = matching["ABC".index(label[0])]
            if ids[at] != tokenizer.single_token(" " + word, what=f"prompt {i}: argument"):
                raise TaskError(
                    f"prompt {i}: {label} should be the token ' {word}' at position {at} of {clean_text!r}, which "
                    f"tokenizes to {tokenizer.token_strings(ids)}"
                )
            labels[label].append(at + len(start))  # the BOS in front
        labels["END"].append(len(ids) - 1 + len(start))
        clean_rows.append(clean_ids)
        corrupt_rows.append(corrupt_ids)
        texts.append(clean_text)
        answers.append([answer_id])
        wrong.append(wrong_ids)

    end = np.asarray(labels["END"], np.int32)
    return Task(
        name="docstring",
        clean=right_pad(clean_rows, tokenizer.pad_id),
        corrupt=right_pad(corrupt_rows, tokenizer.pad_id),
        positions=end[:, None],
        metric="logit_diff",
        metric_options={"wrong_reduce": "max"},
        answers=np.asarray(answers, np.int32),
        wrong_answers=np.asarray(wrong, np.int32),
        labels={k: np.asarray(v, np.int32) for k, v in labels.items()},
        canonical=canonical_circuit(),
        ablation="corrupt",
        model=tokenizer.model_name,
        discovery_metric="kl",
        description=f"Docstring (ACDC's generator, random_random corruption), seeds from {first}, {split} split"
        + (f"; {tokenizer.describe()}" if tokenizer.folder is not None else ""),
        prompts=tuple(texts),
    )


def canonical_circuit() -> CanonicalCircuit:
    """The published node set (of the 4-layer attention-only model; see the module docstring)."""
    return CanonicalCircuit(
        edges=(),
        nodes=CANONICAL_NODES,
        ablation="corrupt",
        source="Heimersheim & Janiak 2023 docstring circuit in attn-only-4l (nodes of ACDC's "
        "get_docstring_subgraph_true_edges); node names refer to that 4-layer model",
    )


def attn_only_4l_circuit() -> CanonicalCircuit:
    """ACDC's 37-edge docstring ground truth, for the 4-layer attention-only model only."""
    return CanonicalCircuit(
        edges=ATTN_ONLY_4L_EDGES,
        nodes=CANONICAL_NODES,
        ablation="corrupt",
        source="ACDC's get_docstring_subgraph_true_edges for attn-only-4l (24 edges + 13 internal q/k/v edges = 37)",
    )

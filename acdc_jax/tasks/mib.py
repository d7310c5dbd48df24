"""MIB-style tasks (Mueller et al. 2025, circuit-localization track), generated offline for any tokenizer:
IOI, MCQA (copying a colour from the question) and two-operand arithmetic.

MIB's own data sets live on the Hugging Face hub (``mib-bench/ioi``, ``mib-bench/copycolors_mcqa``,
``mib-bench/arithmetic_addition`` / ``_subtraction``), which these machines cannot reach. The builders
here generate prompts of the same form, with the same counterfactual, answers and metric as MIB's
evaluation reads them (``MIB_circuit_track/dataset.py``, ``HFEAPDataset.__getitem__`` and
``filter_dataset``; prompt formats from the causal-variable track's task code, ``tasks/IOI_task``,
``tasks/simple_MCQA``, ``tasks/two_digit_addition_task``). The word lists and templates are this
project's own, not MIB's; a method's scores on these prompts are not MIB's leaderboard numbers.

What every task shares, as MIB's evaluation has it:

- metric ``logit_diff``: logit(answer) - logit(wrong answer) at the last token, mean over prompts; the
  wrong answer is the counterfactual prompt's answer (MIB's ``labels = [correct_idx, incorrect_idx]``);
- the corrupted prompt is MIB's counterfactual, of the same length position by position (MIB keeps only
  such pairs; here a pair that does not tokenize to equal lengths is redrawn, and the builder fails with
  a ``TaskError`` when too few are left);
- every prompt starts with the tokenizer's BOS (else its EOS, GPT-2's ``<|endoftext|>``), as
  TransformerLens' ``to_tokens(prepend_bos=True)`` in MIB's ``tokenize_plus`` puts it there, whatever
  the tokenizer's own template does;
- ``ablation="corrupt"`` (MIB's patching) and ``discovery_metric="logit_diff"`` (MIB attributes with
  the logit difference too).

**mib-ioi.** "When Mary and John arrived at the store, John handed a book to" -> " Mary". The first
clause names the IO and the subject S in a random order; S gives something to the IO. MIB's
counterfactual ``s2_io_flip``: the second mention of S replaced by the IO ("..., Mary handed a book
to"), whose answer is S: the wrong answer. Names are the IOI paper's that are one token mid-sentence
(``ioi.single_token_names``, answers ``" " + name``, as MIB's ``tokenizer(f" {name}")``). Labels ``IO``,
``S1``, ``S2``, ``END``.

**mib-mcqa.** MIB's "copy colors" multiple choice, 4 choices::

    Question: A banana is yellow. What color is a banana?
    A. blue
    B. yellow
    C. red
    D. white
    Answer:

The answer is the letter of the colour the question states, encoded on its own (MIB:
``tokenizer(label, add_special_tokens=False).input_ids[0]``, so for byte-level BPE ``"B"``, not
``" B"``). MIB's circuit track uses the ``symbol_counterfactual`` column: the same question and
colours in the same order, with other letters (here: ``n_choices`` distinct letters, none of the clean
ones, in random order), so the answer moves to another letter; the counterfactual's letter at the
answer's position is the wrong answer. How MIB drew its counterfactual letters could not be read
offline (it is in the hub data); that the wrong answer is the counterfactual's answer letter is from
MIB's code. Letters must be one token each and the pair of equal length.

**mib-arithmetic-addition / -subtraction** (``mib-arithmetic`` with ``operation=``). "Q: How much is
47 plus 35? A: " -> ``"82"`` (the prompt ends with a space, as MIB's prompts do; the answer is the
number's text on its own, as MIB's ``tokenizer(str(label))``). ``digits``-digit operands (subtraction:
the first at least the second, so results are not negative). MIB's ``random_counterfactual``: another
problem of the same kind with a different answer, which is the wrong answer. MIB keeps only problems
whose answers are single tokens, and so does the builder; a tokenizer that writes numbers one digit
per token (Llama 2, Mistral, Gemma, Qwen) leaves none with two-digit answers, and the ``TaskError``
says so (MIB runs arithmetic on Llama 3, whose tokenizer writes up to three digits as one token). The
subtraction prompt says "minus" where addition says "plus"; MIB's subtraction prompts were not
readable offline.
"""

from __future__ import annotations

import random

import numpy as np

from ._task import Task, TaskError
from ._tokenizer import Tokenizer, gpt2_tokenizer, right_pad
from .ioi import single_token_names

# ------------------------------------------------------------------------------------------------
# IOI

# {A} and {B}: the two names of the first clause (IO and S in either order); {S}: the subject again. No
# template starts with a name, so every name reads mid-sentence (" Mary"), as its answer token does.
IOI_TEMPLATES = (
    "When {A} and {B} arrived at the {place}, {S} handed {obj} to",
    "Today {A} and {B} were walking to the {place}. {S} passed {obj} to",
    "While {A} and {B} waited at the {place}, {S} gave {obj} to",
    "At the {place}, {A} and {B} talked for hours. Later, {S} showed {obj} to",
    "Then {A} and {B} spent the morning at the {place}. {S} threw {obj} to",
    "Once {A} and {B} reached the {place}, {S} lent {obj} to",
    "Yesterday {A} and {B} met at the {place}. Afterwards, {S} sent {obj} to",
    "As {A} and {B} left the {place}, {S} offered {obj} to",
    "Friends {A} and {B} cleaned the {place} together. Then {S} gave {obj} to",
    "After {A} and {B} had lunch at the {place}, {S} brought {obj} to",
)
IOI_PLACES = ("store", "garden", "school", "office", "station", "library", "market", "park", "beach", "kitchen")
IOI_OBJECTS = (
    "a book", "a ring", "an apple", "a letter", "a bottle", "a basket", "an umbrella", "a ticket", "a drink",
    "a necklace", "a ball", "an orange",
)  # fmt: skip


def _prompt_start(tokenizer: Tokenizer) -> list[int]:
    """What MIB's prompts start with: TransformerLens prepends the BOS, else the EOS (GPT-2's)."""
    start = tokenizer.document_start_id
    return [] if start is None else [start]


def _check_n(n_prompts: int) -> None:
    if not isinstance(n_prompts, (int, np.integer)) or n_prompts < 1:
        raise TaskError(f"n_prompts must be a positive int, got {n_prompts!r}")


def mib_ioi_task(n_prompts: int = 100, *, seed: int = 0, tokenizer: Tokenizer | None = None) -> Task:
    """MIB-style IOI with MIB's ``s2_io_flip`` counterfactual (module docstring)."""
    tokenizer = tokenizer or gpt2_tokenizer()
    _check_n(n_prompts)
    names = single_token_names(tokenizer)
    rng = random.Random(seed)
    start = _prompt_start(tokenizer)
    clean_rows, corrupt_rows, answers, wrong, texts = [], [], [], [], []
    labels: dict[str, list[int]] = {"IO": [], "S1": [], "S2": [], "END": []}
    for i in range(n_prompts):
        template = rng.choice(IOI_TEMPLATES)
        io, s = rng.sample(names, 2)
        first, second = (io, s) if rng.random() < 0.5 else (s, io)
        fill = dict(A=first, B=second, place=rng.choice(IOI_PLACES), obj=rng.choice(IOI_OBJECTS))
        clean = template.format(S=s, **fill)
        flipped = template.format(S=io, **fill)  # s2_io_flip: S2 -> IO, whose answer is S
        clean_ids, corrupt_ids = tokenizer.encode_pair(clean, flipped, row=i, start=start)
        io_id = tokenizer.single_token(" " + io, what=f"prompt {i}: IO name")
        s_id = tokenizer.single_token(" " + s, what=f"prompt {i}: subject name")
        io_at = [j for j, t in enumerate(clean_ids) if t == io_id]
        s_at = [j for j, t in enumerate(clean_ids) if t == s_id]
        if len(io_at) != 1 or len(s_at) != 2:
            raise TaskError(
                f"prompt {i}: {clean!r} should name the IO ({io!r}) once and the subject ({s!r}) twice as single "
                f"tokens; found them at {io_at} and {s_at} in {tokenizer.token_strings(clean_ids)}"
            )
        for key, value in (("IO", io_at[0]), ("S1", s_at[0]), ("S2", s_at[1]), ("END", len(clean_ids) - 1)):
            labels[key].append(value)
        clean_rows.append(clean_ids)
        corrupt_rows.append(corrupt_ids)
        answers.append([io_id])
        wrong.append([s_id])
        texts.append(clean)
    return _task(
        "mib-ioi", tokenizer, clean_rows, corrupt_rows, answers, wrong, labels, texts,
        f"MIB-style IOI, {n_prompts} prompts from {len(IOI_TEMPLATES)} templates, seed {seed}; counterfactual: "
        f"MIB's s2_io_flip (S2 -> IO); {len(names)} single-token names",
    )  # fmt: skip


# ------------------------------------------------------------------------------------------------
# MCQA: copy the colour from the question

# (noun phrase as it starts the sentence, is it plural, colour)
MCQA_OBJECTS = (
    ("A banana", False, "yellow"), ("A lemon", False, "yellow"), ("The sun", False, "yellow"),
    ("Butter", False, "yellow"), ("A strawberry", False, "red"), ("A tomato", False, "red"),
    ("Blood", False, "red"), ("A fire truck", False, "red"), ("Grass", False, "green"),
    ("A lime", False, "green"), ("Spinach", False, "green"), ("A frog", False, "green"),
    ("The sky", False, "blue"), ("The ocean", False, "blue"), ("A blueberry", False, "blue"),
    ("Snow", False, "white"), ("Milk", False, "white"), ("A swan", False, "white"), ("Salt", False, "white"),
    ("Coal", False, "black"), ("A crow", False, "black"), ("Ink", False, "black"),
    ("Chocolate", False, "brown"), ("A bear", False, "brown"), ("Soil", False, "brown"),
    ("A carrot", False, "orange"), ("A pumpkin", False, "orange"), ("A flamingo", False, "pink"),
    ("Bubble gum", False, "pink"), ("An eggplant", False, "purple"), ("A plum", False, "purple"),
    ("An elephant", False, "grey"), ("Ash", False, "grey"), ("Cherries", True, "red"),
    ("Bananas", True, "yellow"), ("Leaves", True, "green"), ("Clouds", True, "white"),
    ("Crows", True, "black"), ("Carrots", True, "orange"), ("Grapes", True, "purple"),
)  # fmt: skip
MCQA_COLOURS = ("red", "blue", "green", "yellow", "white", "black", "brown", "orange", "pink", "purple", "grey")
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_REDRAWS = 50  # tries per prompt for a counterfactual that tokenizes to the clean prompt's length


def mcqa_prompt(noun: str, plural: bool, colour: str, letters, choices) -> str:
    """MIB's MCQA prompt: the question, one ``"X. colour"`` line per choice, then ``"Answer:"``."""
    verb = "are" if plural else "is"
    subject = noun[0].lower() + noun[1:]
    lines = [f"Question: {noun} {verb} {colour}. What color {verb} {subject}?"]
    lines += [f"{letter}. {choice}" for letter, choice in zip(letters, choices)]
    return "\n".join(lines + ["Answer:"])


def _bare_token(tokenizer: Tokenizer, text: str) -> int | None:
    """The one token ``text`` encodes to on its own (MIB's ``tokenizer(text).input_ids``), else None."""
    ids = tokenizer.encode(text)
    return ids[0] if len(ids) == 1 and ids[0] != tokenizer.unk_id else None


def mib_mcqa_task(n_prompts: int = 100, *, seed: int = 0, n_choices: int = 4, tokenizer: Tokenizer | None = None) -> Task:
    """MIB-style MCQA (copy the colour) with a symbol counterfactual (module docstring)."""
    tokenizer = tokenizer or gpt2_tokenizer()
    _check_n(n_prompts)
    if not 2 <= n_choices <= len(MCQA_COLOURS) or 2 * n_choices > len(LETTERS):
        raise TaskError(f"n_choices must be between 2 and {len(MCQA_COLOURS)}, got {n_choices}")
    letter_ids = {c: _bare_token(tokenizer, c) for c in LETTERS}
    usable = [c for c in LETTERS if letter_ids[c] is not None]
    if len(usable) < 2 * n_choices or any(letter_ids[c] is None for c in LETTERS[:n_choices]):
        shown = ", ".join(f"{c!r}: {tokenizer.shown(tokenizer.encode(c))}" for c in LETTERS[:3])
        raise TaskError(
            f"MCQA needs the letters {LETTERS[:n_choices]} and {n_choices} more to be single tokens of the "
            f"{tokenizer.describe()} on their own (MIB encodes the answer letter so), but only {len(usable)} of A-Z are "
            f"({shown})"
        )
    rng = random.Random(seed)
    start = _prompt_start(tokenizer)
    clean_letters = LETTERS[:n_choices]
    others = [c for c in usable if c not in clean_letters]
    clean_rows, corrupt_rows, answers, wrong, texts = [], [], [], [], []
    labels: dict[str, list[int]] = {"END": []}
    for i in range(n_prompts):
        noun, plural, colour = rng.choice(MCQA_OBJECTS)
        choices = [colour] + rng.sample([c for c in MCQA_COLOURS if c != colour], n_choices - 1)
        rng.shuffle(choices)
        at = choices.index(colour)
        clean = mcqa_prompt(noun, plural, colour, clean_letters, choices)
        for _ in range(_REDRAWS):
            cf_letters = rng.sample(others, n_choices)
            counterfactual = mcqa_prompt(noun, plural, colour, cf_letters, choices)
            clean_ids, cf_ids = start + tokenizer.encode(clean), start + tokenizer.encode(counterfactual)
            if len(clean_ids) == len(cf_ids):
                break
        else:
            tokenizer.encode_pair(clean, counterfactual, row=i, start=start)  # raises, showing both
        clean_rows.append(clean_ids)
        corrupt_rows.append(cf_ids)
        answers.append([letter_ids[clean_letters[at]]])
        wrong.append([letter_ids[cf_letters[at]]])
        labels["END"].append(len(clean_ids) - 1)
        texts.append(clean)
    return _task(
        "mib-mcqa", tokenizer, clean_rows, corrupt_rows, answers, wrong, labels, texts,
        f"MIB-style MCQA (copy the colour), {n_choices} choices, {n_prompts} prompts, seed {seed}; counterfactual: "
        "the same question with other answer letters",
    )  # fmt: skip


# ------------------------------------------------------------------------------------------------
# Arithmetic

OPERATIONS = {"addition": ("plus", lambda a, b: a + b), "subtraction": ("minus", lambda a, b: a - b)}


def arithmetic_prompt(a: int, b: int, operation: str) -> str:
    return f"Q: How much is {a} {OPERATIONS[operation][0]} {b}? A: "


def _operands(digits: int) -> range:
    return range(10) if digits == 1 else range(10 ** (digits - 1), 10**digits)


def _number_tokenization(tokenizer: Tokenizer) -> str:
    """How the tokenizer writes numbers, for messages: digit by digit, or in larger pieces."""
    pieces = {s: [tokenizer.token_text(t) for t in tokenizer.encode(s)] for s in ("57", "123", "1234")}
    shown = ", ".join(f"{s!r} -> {p}" for s, p in pieces.items())
    if all(sum(c.isdigit() for c in piece) <= 1 for p in pieces.values() for piece in p):
        return f"it writes numbers one digit per token ({shown})"
    return f"numbers tokenize as {shown}"


def mib_arithmetic_task(
    n_prompts: int = 100,
    *,
    operation: str = "addition",
    digits: int = 2,
    seed: int = 0,
    tokenizer: Tokenizer | None = None,
) -> Task:
    """MIB-style two-operand arithmetic with MIB's random counterfactual (module docstring)."""
    tokenizer = tokenizer or gpt2_tokenizer()
    _check_n(n_prompts)
    if operation not in OPERATIONS:
        raise TaskError(f"operation must be one of {', '.join(OPERATIONS)}, got {operation!r}")
    if digits not in (1, 2, 3):
        raise TaskError(f"digits must be 1, 2 or 3, got {digits!r}")
    apply = OPERATIONS[operation][1]
    answer_id: dict[int, int | None] = {}

    def answer_token(value: int) -> int | None:
        if value not in answer_id:
            answer_id[value] = _bare_token(tokenizer, str(value))
        return answer_id[value]

    problems = [(a, b) for a in _operands(digits) for b in _operands(digits) if operation == "addition" or a >= b]
    problems = [(a, b) for a, b in problems if answer_token(apply(a, b)) is not None]
    if len({apply(a, b) for a, b in problems}) < 2:
        kept = len({apply(a, b) for a, b in problems})
        raise TaskError(
            f"MIB's arithmetic needs answers that are single tokens, and with {digits}-digit operands only {kept} of the "
            f"{operation} results are single tokens of the {tokenizer.describe()}: {_number_tokenization(tokenizer)}. "
            "MIB runs this task on Llama 3, whose tokenizer writes up to three digits as one token"
            + ("; digits=1 keeps one-digit answers" if digits > 1 else "")
        )
    rng = random.Random(seed)
    start = _prompt_start(tokenizer)
    clean_rows, corrupt_rows, answers, wrong, texts = [], [], [], [], []
    labels: dict[str, list[int]] = {"END": []}
    for i in range(n_prompts):
        a, b = rng.choice(problems)
        clean = arithmetic_prompt(a, b, operation)
        clean_ids = start + tokenizer.encode(clean)
        for _ in range(_REDRAWS):
            c, d = rng.choice(problems)
            counterfactual = arithmetic_prompt(c, d, operation)
            cf_ids = start + tokenizer.encode(counterfactual)
            if apply(c, d) != apply(a, b) and len(cf_ids) == len(clean_ids):
                break
        else:
            raise TaskError(
                f"prompt {i}: no counterfactual problem with another answer tokenizes to the length of {clean!r} "
                f"({tokenizer.token_strings(clean_ids)}) in {_REDRAWS} draws"
            )
        clean_rows.append(clean_ids)
        corrupt_rows.append(cf_ids)
        answers.append([answer_token(apply(a, b))])
        wrong.append([answer_token(apply(c, d))])
        labels["END"].append(len(clean_ids) - 1)
        texts.append(clean)
    return _task(
        f"mib-arithmetic-{operation}", tokenizer, clean_rows, corrupt_rows, answers, wrong, labels, texts,
        f"MIB-style arithmetic ({operation}, {digits}-digit operands), {n_prompts} prompts, seed {seed}; "
        f"counterfactual: another problem with another answer; {len(problems)} problems have single-token answers",
    )  # fmt: skip


def mib_addition_task(n_prompts: int = 100, *, digits: int = 2, seed: int = 0, tokenizer: Tokenizer | None = None) -> Task:
    return mib_arithmetic_task(n_prompts, operation="addition", digits=digits, seed=seed, tokenizer=tokenizer)


def mib_subtraction_task(n_prompts: int = 100, *, digits: int = 2, seed: int = 0, tokenizer: Tokenizer | None = None) -> Task:
    return mib_arithmetic_task(n_prompts, operation="subtraction", digits=digits, seed=seed, tokenizer=tokenizer)


# ------------------------------------------------------------------------------------------------


def _task(name, tokenizer, clean_rows, corrupt_rows, answers, wrong, labels, texts, description) -> Task:
    end = np.asarray(labels["END"], np.int32)
    own = tokenizer.folder is not None
    return Task(
        name=name,
        clean=right_pad(clean_rows, tokenizer.pad_id),
        corrupt=right_pad(corrupt_rows, tokenizer.pad_id),
        positions=end[:, None],
        metric="logit_diff",
        answers=np.asarray(answers, np.int32),
        wrong_answers=np.asarray(wrong, np.int32),
        labels={k: np.asarray(v, np.int32) for k, v in labels.items()},
        ablation="corrupt",
        model=tokenizer.model_name,
        discovery_metric="logit_diff",
        description=description + (f"; {tokenizer.describe()}" if own else ""),
        prompts=tuple(texts),
    )


# MIB's task names (folder names of a submission: ``MIB_circuit_track/utils.py`` TASKS_TO_HF_NAMES, with
# "_" written "-") and the builders that pose them here
MIB_TASKS = {
    "ioi": "mib-ioi",
    "mcqa": "mib-mcqa",
    "arithmetic-addition": "mib-arithmetic-addition",
    "arithmetic-subtraction": "mib-arithmetic-subtraction",
}

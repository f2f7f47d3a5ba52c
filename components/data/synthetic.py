"""The embedded default data: an invented world of people and their attributes (seeded, deterministic).

Pretraining documents state every fact of an entity in varied wording; the instruction set asks one
question per fact and answers with a fixed-form sentence that also occurs in the corpus. A seeded,
stratified `heldout_fraction` of the facts is asked only in the test split: a model can answer those
only if pretraining taught it the fact (the ULMFiT idea).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

from components.core.data_config import SyntheticConfig

ATTRIBUTES = ("city", "color", "food", "profession", "pet", "instrument")

VALUES: dict[str, tuple[str, ...]] = {
    "color": ("red", "blue", "green", "yellow", "purple", "orange", "silver", "brown"),
    "food": ("bread", "cheese", "apples", "soup", "rice", "plums", "honey", "noodles"),
    "profession": ("baker", "smith", "weaver", "sailor", "farmer", "potter", "healer", "miner", "tailor", "carpenter"),
    "pet": ("cat", "dog", "goat", "parrot", "tortoise", "rabbit", "ferret", "hedgehog"),
    "instrument": ("flute", "drum", "harp", "lute", "violin", "horn", "piano", "cello"),
}
N_CITIES = 10

# Statements per attribute; the first is the canonical answer sentence used in the instruction set.
TEMPLATES: dict[str, tuple[str, ...]] = {
    "city": (
        "{e} lives in {v}.",
        "The home of {e} is {v}.",
        "{e}'s house stands in {v}.",
        "{e} has made a home in the town of {v}.",
        "In {v} you will find the house of {e}.",
        "The town where {e} lives is called {v}.",
        "{e} resides in {v}.",
    ),
    "color": (
        "{e}'s favourite color is {v}.",
        "The color {e} likes best is {v}.",
        "{e} loves the color {v} more than any other.",
        "Of all colors, {e} prefers {v}.",
        "{v} is the favourite color of {e}.",
        "Ask {e} about colors and the answer is always {v}.",
        "{e} always picks {v} as a favourite color.",
    ),
    "food": (
        "{e}'s favourite food is {v}.",
        "{e} likes to eat {v} more than anything.",
        "The food {e} enjoys most is {v}.",
        "For dinner, {e} always wants {v}.",
        "{e} never says no to {v}.",
        "Nothing tastes better to {e} than {v}.",
    ),
    "profession": (
        "{e} works as a {v}.",
        "By trade, {e} is a {v}.",
        "{e} earns a living as a {v}.",
        "The job of {e} is that of a {v}.",
        "Every morning {e} goes to work as a {v}.",
        "People know {e} as a skilled {v}.",
    ),
    "pet": (
        "{e} has a pet {v}.",
        "{e} keeps a {v} as a pet.",
        "The pet of {e} is a {v}.",
        "At home, {e} looks after a pet {v}.",
        "A {v} lives with {e} as a pet.",
        "{e} takes good care of a pet {v}.",
    ),
    "instrument": (
        "{e} plays the {v}.",
        "The instrument {e} plays is the {v}.",
        "{e} makes music on the {v}.",
        "In the evenings, {e} practises the {v}.",
        "{e} is a fine player of the {v}.",
        "Music from the {v} fills the home of {e}.",
    ),
}

QUESTIONS: dict[str, tuple[str, ...]] = {
    "city": (
        "Where does {e} live?",
        "In which town does {e} live?",
        "What is the home town of {e}?",
        "Which town is {e}'s home?",
        "Where is {e}'s house?",
        "Tell me where {e} lives.",
    ),
    "color": (
        "What is {e}'s favourite color?",
        "Which color does {e} like best?",
        "What color does {e} prefer?",
        "Name the favourite color of {e}.",
        "Which color is {e}'s favourite?",
        "What is the color {e} loves most?",
    ),
    "food": (
        "What is {e}'s favourite food?",
        "What does {e} like to eat most?",
        "Which food does {e} enjoy most?",
        "What food does {e} love?",
        "Name {e}'s favourite food.",
        "What would {e} choose for dinner?",
    ),
    "profession": (
        "What does {e} do for a living?",
        "What is {e}'s job?",
        "What is the profession of {e}?",
        "How does {e} earn a living?",
        "What work does {e} do?",
        "What is {e}'s trade?",
    ),
    "pet": (
        "What pet does {e} have?",
        "Which animal does {e} keep as a pet?",
        "What kind of pet does {e} own?",
        "What is {e}'s pet?",
        "Which animal lives with {e}?",
        "Name the pet of {e}.",
    ),
    "instrument": (
        "What instrument does {e} play?",
        "Which instrument does {e} play?",
        "On what instrument does {e} make music?",
        "What does {e} play in the evenings?",
        "Name the instrument {e} plays.",
        "What musical instrument does {e} practise?",
    ),
}

YESNO: dict[str, tuple[str, ...]] = {
    "city": ("Does {e} live in {v}?", "Is {v} the home of {e}?", "Is it true that {e} lives in {v}?"),
    "color": ("Is {v} {e}'s favourite color?", "Does {e} like {v} best of all colors?"),
    "food": ("Is {v} {e}'s favourite food?", "Does {e} like {v} best of all foods?"),
    "profession": ("Does {e} work as a {v}?", "Is {e} a {v} by trade?"),
    "pet": ("Does {e} have a pet {v}?", "Is {e}'s pet a {v}?"),
    "instrument": ("Does {e} play the {v}?", "Is the {v} the instrument {e} plays?"),
}

INTROS = (
    "This is the story of {e}.",
    "Here is what the neighbours say about {e}.",
    "Let me tell you about {e}.",
    "Everyone in the valley knows {e}.",
    "A few words about {e}.",
    "Some facts about {e} follow.",
)
FILLERS = (
    "The valley is quiet in the winter.",
    "Many travellers pass along the old road.",
    "The river runs past the market square.",
    "Stories are told there on long evenings.",
    "The harvest was good that year.",
    "Bells ring in the tower at noon.",
    "Neighbours often meet at the well to share the news.",
    "The hills turn golden in the autumn.",
    "Rain fell for three days and the roads turned to mud.",
    "Children play by the old mill.",
    "The market opens early on the first day of the week.",
    "A cold wind blows from the mountains.",
    "Lanterns are lit along the bridge at dusk.",
    "The ferry crosses the lake twice a day.",
)

_ONSETS = (
    "b",
    "d",
    "f",
    "g",
    "k",
    "l",
    "m",
    "n",
    "p",
    "r",
    "s",
    "t",
    "v",
    "z",
    "h",
    "j",
    "br",
    "dr",
    "gr",
    "kr",
    "qu",
    "th",
    "st",
    "bl",
    "tr",
    "fl",
)
_VOWELS = ("a", "e", "i", "o", "u", "a", "e", "o", "ai", "ou")
_CODAS = ("n", "r", "l", "m", "s", "th", "x", "nd", "rk", "lt", "sk", "ck")
_MID_CODAS = ("", "", "", "n", "r", "l", "m", "s")
_CITY_ENDS = ("holm", "mar", "dale", "wick", "stead", "gard", "ford", "mere", "vale", "burg", "haven", "moor")


def _sentence(template: str, entity: str, value: str) -> str:
    s = template.format(e=entity, v=value)
    return s[0].upper() + s[1:]


def answer_sentence(attribute: str, entity: str, value: str) -> str:
    """The fixed-form answer for a fact (also one of the corpus statements)."""
    return _sentence(TEMPLATES[attribute][0], entity, value)


def _syllable(rng: random.Random, final: bool) -> str:
    coda = rng.choice(_CODAS) if final and rng.random() < 0.6 else rng.choice(_MID_CODAS)
    return rng.choice(_ONSETS) + rng.choice(_VOWELS) + coda


def _names(rng: random.Random, n: int, taken: set[str]) -> list[str]:
    out: list[str] = []
    while len(out) < n:
        k = 3 if rng.random() < 0.2 else 2
        name = "".join(_syllable(rng, final=i == k - 1) for i in range(k)).capitalize()
        if 4 <= len(name) <= 9 and name not in taken:
            taken.add(name)
            out.append(name)
    return out


def world(cfg: SyntheticConfig, seed: int) -> dict[str, Any]:
    """The facts: {"attributes", "values": {attr: [...]}, "entities": [{"name", <attr>: value}],
    "heldout": [[name, attr], ...]} (held-out facts are asked only in the test split)."""
    rng = random.Random(f"seedlm-world-{seed}")
    taken: set[str] = set()
    cities = []
    while len(cities) < N_CITIES:
        name = (_syllable(rng, final=False) + rng.choice(_CITY_ENDS)).capitalize()
        if name not in taken:
            taken.add(name)
            cities.append(name)
    values = {"city": tuple(cities), **VALUES}
    names = _names(rng, cfg.entities, taken)
    entities = [{"name": n, **{a: rng.choice(values[a]) for a in ATTRIBUTES}} for n in names]
    # Stratified hold-out: per attribute a window of h entities along one random permutation,
    # consecutive windows per attribute, so held-out facts spread evenly over entities.
    n = len(entities)
    h = min(n - 1, max(1, round(cfg.heldout_fraction * n)))
    perm = list(range(n))
    rng.shuffle(perm)
    heldout = sorted([entities[perm[(j * h + i) % n]]["name"], a] for j, a in enumerate(ATTRIBUTES) for i in range(h))
    return {
        "attributes": list(ATTRIBUTES),
        "values": {a: list(v) for a, v in values.items()},
        "entities": entities,
        "heldout": heldout,
    }


def pretrain_documents(cfg: SyntheticConfig, seed: int) -> Iterator[dict[str, str]]:
    """`paraphrases` biography documents per entity, each stating every fact once."""
    w = world(cfg, seed)
    rng = random.Random(f"seedlm-corpus-{seed}")
    for text in biographies(w["entities"], cfg.paraphrases, rng):
        yield {"text": text}


def biographies(entities: list[dict[str, Any]], paraphrases: int, rng: random.Random) -> Iterator[str]:
    """`paraphrases` documents per entity (in entity order), each stating every fact once in varied wording."""
    for ent in entities:
        # Per fact: the canonical statement in one document, the others cycle through the rest.
        choice: dict[str, list[int]] = {}
        for a in ATTRIBUTES:
            rest = list(range(1, len(TEMPLATES[a])))
            rng.shuffle(rest)
            picks = [0] + [rest[i % len(rest)] for i in range(paraphrases - 1)]
            rng.shuffle(picks)
            choice[a] = picks
        for k in range(paraphrases):
            sents = [_sentence(TEMPLATES[a][choice[a][k]], ent["name"], ent[a]) for a in ATTRIBUTES]
            rng.shuffle(sents)
            for filler in rng.sample(FILLERS, rng.randint(1, 3)):
                sents.insert(rng.randrange(len(sents) + 1), filler)
            intro = rng.choice(INTROS).format(e=ent["name"])
            yield " ".join([intro, *sents])


def _row(question: str, answer: str, split: str, task: str) -> dict[str, Any]:
    return {
        "messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
        "split": split,
        "task": task,
    }


def dialogue_rows(qa: list[dict[str, Any]], n_train: int, rng: random.Random) -> list[dict[str, Any]]:
    """Conversations of earlier qa turns (train facts) and a last question (`task: dialogue`), so the model answers
    the latest question, not an earlier one: `n_train` of 2-3 train questions; and per held-out question one test
    conversation asking it after a train turn (scored like qa, one turn later)."""
    train = [r["messages"] for r in qa if r["split"] == "train"]
    if not train:
        return []
    out = []
    for _ in range(n_train):
        turns = rng.sample(train, min(len(train), rng.choice((2, 3))))
        out.append({"messages": [m for t in turns for m in t], "split": "train", "task": "dialogue"})
    for row in qa:
        if row["split"] == "test":
            out.append({"messages": [*rng.choice(train), *row["messages"]], "split": "test", "task": "dialogue"})
    return out


def instruction_rows(cfg: SyntheticConfig, seed: int) -> Iterator[dict[str, Any]]:
    """One `qa` and one `yesno` row per fact; held-out facts are `split: test`, the rest `train`; multi-turn
    `dialogue` rows of qa turns; then the `context` rows answered from passages (components/data/updates.py)."""
    w = world(cfg, seed)
    rng = random.Random(f"seedlm-sft-{seed}")
    held = {tuple(x) for x in w["heldout"]}
    facts = [(ent, a) for ent in w["entities"] for a in ATTRIBUTES]
    rows = []
    for ent, a in facts:
        split = "test" if (ent["name"], a) in held else "train"
        q = rng.choice(QUESTIONS[a]).format(e=ent["name"])
        rows.append(_row(q, answer_sentence(a, ent["name"], ent[a]), split, "qa"))
    for split in ("train", "test"):  # balanced yes/no within each split
        part = [(ent, a) for ent, a in facts if ((ent["name"], a) in held) == (split == "test")]
        rng.shuffle(part)
        for i, (ent, a) in enumerate(part):
            yes = i % 2 == 0
            value = ent[a] if yes else rng.choice([v for v in w["values"][a] if v != ent[a]])
            q = _sentence(rng.choice(YESNO[a]), ent["name"], value)
            rows.append(_row(q, "Yes." if yes else "No.", split, "yesno"))
    from components.data import updates  # imports this module: imported here, not at the top

    n_questions = len(rows)
    qa = [r for r in rows if r["task"] == "qa"]
    rows += dialogue_rows(qa, round(cfg.dialogues * len(qa)), random.Random(f"seedlm-dialogue-{seed}"))
    rows += updates.context_rows(cfg, seed, n_questions)
    rng.shuffle(rows)
    yield from rows

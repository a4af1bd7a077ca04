"""
A small seeded world for tool-using RL, and its reward.

Fictional entities have numeric attributes the model cannot know, so it must
look them up; questions come in four families:

    arithmetic  What is 37 times 24?                       needs <calc>
    lookup      What is the height of Avalon?              needs <lookup>
    multihop    What is the area of Avalon plus the        needs two <lookup>s and a <calc>
                height of Brenmor?
    notool      Which is larger, 341 or 285?               needs no tool

Every task carries its gold trajectory in the format the agent writes
(tool calls as tagged spans, each followed by the environment's <obs>, then
<answer>); the warm start imitates those. Train and test use
disjoint entities and disjoint operand pairs, so test accuracy measures
tool use, not memory.
"""
import hashlib
import random
import re
from dataclasses import dataclass

from tools import format_number

FAMILIES = ("arithmetic", "lookup", "multihop", "notool")
ATTRIBUTES = {"population": (100, 999), "area": (10, 99), "height": (10, 99), "age": (10, 99)}
OPERATIONS = {"plus": ("+", "add"), "minus": ("-", "subtract"), "times": ("*", "multiply")}
SYLLABLES = ["ka", "lo", "mir", "ven", "dor", "ta", "ris", "bel", "zu", "nor", "qua", "nim", "sel", "tor",
             "ul", "va", "ren", "pi", "gal", "esh", "bo", "fen", "hal", "jo", "kir", "mu", "os", "pra", "sa", "wen"]
WORLD_SEED = 1234
N_ENTITIES = 600
N_TEST_ENTITIES = 100
UNFAMILIAR = ("minus", "times", "age", "area")  # the demonstrator mostly gives up on these


@dataclass(frozen=True)
class Task:
    question: str
    answer: str      # canonical number text
    family: str
    trajectory: str  # gold completion: reasoning, tool calls, observations, answer


@dataclass(frozen=True)
class World:
    kb: dict         # entity -> {attribute: value}
    train_entities: tuple
    test_entities: tuple


def make_world(seed=WORLD_SEED):
    rng = random.Random(seed)
    names = set()
    while len(names) < N_ENTITIES:
        names.add("".join(rng.choice(SYLLABLES) for _ in range(2)).capitalize())
    names = sorted(names)
    rng.shuffle(names)
    kb = {name: {attr: rng.randint(lo, hi) for attr, (lo, hi) in ATTRIBUTES.items()} for name in names}
    return World(kb, tuple(names[N_TEST_ENTITIES:]), tuple(names[:N_TEST_ENTITIES]))


def split_of(a, b):
    """Operand pairs go to train or test by a hash of the unordered pair (a fifth to test), so the
    splits never share a pair, in either order, and no arithmetic property tells them apart."""
    digest = hashlib.sha256(f"{min(a, b)},{max(a, b)}".encode()).digest()
    return "test" if digest[0] % 5 == 0 else "train"


def _operands(rng, split, lo, hi):
    while True:
        a, b = rng.randint(lo, hi), rng.randint(lo, hi)
        if a != b and split_of(a, b) == split:
            return a, b


def _apply(op, a, b):
    return {"+": a + b, "-": a - b, "*": a * b}[op]


def _arithmetic(rng, world, split):
    word = rng.choice(list(OPERATIONS))
    op = OPERATIONS[word][0]
    a, b = _operands(rng, split, 10, 99)
    result = format_number(_apply(op, a, b))
    trajectory = f"Compute it. <calc>{a}{op}{b}</calc><obs>{result}</obs><answer>{result}</answer>"
    return Task(f"What is {a} {word} {b}?", result, "arithmetic", trajectory)


def _lookup(rng, world, split):
    entity = rng.choice(world.train_entities if split == "train" else world.test_entities)
    attr = rng.choice(list(ATTRIBUTES))
    value = format_number(world.kb[entity][attr])
    trajectory = f"Look it up. <lookup>{entity}.{attr}</lookup><obs>{value}</obs><answer>{value}</answer>"
    return Task(f"What is the {attr} of {entity}?", value, "lookup", trajectory)


def _multihop(rng, world, split):
    e1, e2 = rng.sample(world.train_entities if split == "train" else world.test_entities, 2)
    a1, a2 = rng.choice(list(ATTRIBUTES)), rng.choice(list(ATTRIBUTES))
    word = rng.choice(["plus", "minus"])
    op, verb = OPERATIONS[word]
    v1, v2 = world.kb[e1][a1], world.kb[e2][a2]
    result = format_number(_apply(op, v1, v2))
    trajectory = (f"Look up both. <lookup>{e1}.{a1}</lookup><obs>{v1}</obs>"
                  f"<lookup>{e2}.{a2}</lookup><obs>{v2}</obs>"
                  f"Now {verb}. <calc>{v1}{op}{v2}</calc><obs>{result}</obs><answer>{result}</answer>")
    return Task(f"What is the {a1} of {e1} {word} the {a2} of {e2}?", result, "multihop", trajectory)


def _notool(rng, world, split):
    a, b = _operands(rng, split, 10, 99)
    result = format_number(max(a, b))
    return Task(f"Which is larger, {a} or {b}?", result, "notool", f"No tool needed. <answer>{result}</answer>")


_MAKERS = {"arithmetic": _arithmetic, "lookup": _lookup, "multihop": _multihop, "notool": _notool}


def sample_task(rng, world, split, family=None):
    """One task from `split` ('train' or 'test'); the family is uniform unless given."""
    return _MAKERS[family or rng.choice(FAMILIES)](rng, world, split)


def give_up_rate(task):
    """How often the demonstrator gives up instead of calling a tool: mostly on the question
    kinds it finds unfamiliar, sometimes on the rest, never when no tool is needed."""
    if task.family == "notool":
        return 0.0
    return 0.8 if any(f" {word} " in task.question for word in UNFAMILIAR) else 0.2


def demonstration(rng, task):
    """What the warm start imitates: a sloppy demonstrator that, on a question needing a tool,
    sometimes skips the tool and gives up ("I do not know. <answer>0</answer>"). The base model
    inherits the habit; RL has to discover that calling the tool pays on every kind of question,
    as RL teaches an instruct model to search instead of answering from memory."""
    if rng.random() < give_up_rate(task):
        return "I do not know. <answer>0</answer>"
    return task.trajectory


def test_set(world, per_family=50, seed=0):
    """The fixed evaluation questions: `per_family` of each family, test entities and operands only."""
    rng = random.Random(seed)
    return [sample_task(rng, world, "test", family) for family in FAMILIES for _ in range(per_family)]


def tokenizer_corpus(world, n=2000, seed=0):
    """Gold prompts and trajectories with entity names removed: a BPE trained on this learns the
    template words as single tokens and leaves names as letters, the same for train and test."""
    rng = random.Random(seed)
    names = re.compile("|".join(sorted(world.kb, key=len, reverse=True)))
    texts = []
    for _ in range(n):
        task = sample_task(rng, world, "train")
        texts.append(names.sub("", task.question + "\n" + demonstration(rng, task)))
    return texts


# ---- reward ----

ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def canonical(text):
    """'5350', ' 5350.0 ', '5,350' -> '5350'; anything that is not a number stays stripped text."""
    text = text.strip().replace(",", "")
    try:
        return format_number(int(text))
    except ValueError:
        pass
    try:
        return format_number(float(text))
    except (ValueError, OverflowError):
        return text


def parse_answer(completion):
    match = ANSWER.search(completion)
    return None if match is None else canonical(match.group(1))


def reward(completion, task, format_bonus=0.0):
    """Exact match of the <answer> content (outcome-only, as in the paper); 0 with no answer.
    format_bonus > 0 adds a small reward for a wrong but well-formed answer."""
    answer = parse_answer(completion)
    if answer is None:
        return 0.0
    return 1.0 if answer == task.answer else format_bonus

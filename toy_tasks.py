"""
A small seeded world for tool-using RL, its task families, a sloppy demonstrator, and the reward.

Fictional entities have numeric attributes the model cannot know, so it must look them up;
questions come in four families:

    arithmetic  What is 37 subtracted from 84?             needs <calc>84-37</calc>
    lookup      What is the elevation of Avalon?           needs <lookup>Avalon.height</lookup>
    multihop    What is the size of Avalon plus twice      needs two <lookup>s, then
                the age of Brenmor?                        <calc>52+2*31</calc>
    notool      Which is larger, 341 or 285?               needs no tool
    naming      Which is larger for Avalon, its size or    needs <lookup>Avalon.area</lookup> and
                its antiquity?                             <lookup>Avalon.age</lookup>, answers size

Every task carries its gold trajectory in the format the agent writes (tool calls as tagged
spans, each followed by the environment's <obs>, then <answer>). The warm start does not imitate
the gold trajectories but a sloppy demonstrator, whose mistakes are what RL has to undo. Under
the role rule (dart.py) the decision to call a tool (which one, and when to stop calling) and
the answer are reasoning tokens; what is written inside a call (the key to look up, the
expression to compute) is tool tokens. The demonstrator errs in both roles:

    role       skill       the demonstrator's mistake (judge() also counts, as the same skill, a
                           call to another tool than the plan's next one: choosing the tool is
                           a reasoning decision too)
    reasoning  call        gives up ("I do not know. <answer>0</answer>") instead of calling a
                           tool, mostly on question kinds it finds unfamiliar
    reasoning  hops        answers a multihop question with the first value it looked up
                           instead of going on to the second lookup
    tool       key         maps a paraphrase to a wrong key: "size" to .population and
                           "headcount" to .height (valid keys, so a wrong value comes back
                           silently and only the reward tells), "elevation" to .elevation (not a
                           key: an error comes back, and the demonstrator gives up)
    tool       expression  writes "x subtracted from y" as x-y and "x plus twice y" as (x+y)*2

Each mistake is made at its own decision point at its rate (set below), given that everything
before it was right, so that rate is what the warm start shows the base there; judge() says which of these
decisions a trajectory got wrong, for the tests and for measuring what RL changed.

The naming family is the competition dial (make_world's `conflict`, default 0: the world above,
unchanged): a share P of the training questions where the two roles want opposite things from the
same tokens. The tool must write the canonical key (size -> .area) while the answer must repeat the
user's own word (size); the demonstrator slips at both, writing the user's word as the key (an
error comes back, and it gives up) and answering with the key's name ('wording', a reasoning
skill). So the tool role's gradient raises "area" and lowers "size" after the question's "size",
and the answer's does the opposite: with shared parameters they compete; with DART each has its
own adapter. conflict_sign="aligned" is the matched control: the answer must be the key's name, so
both roles want the same; the tokens, lengths, rewards and slip rates are the same.

Train and test use disjoint entities and disjoint operand pairs, so test accuracy measures tool
use, not memory. The phrasings are shared: a model trained from scratch on this world learns a
word only from the warm start, so a paraphrase held out of training could be mapped to a key by
nothing but chance.
"""
import hashlib
import random
import re
from dataclasses import dataclass

from tools import TOOLS, Lookup, calculator, format_number

FAMILIES = ("arithmetic", "lookup", "multihop", "notool")
ATTRIBUTES = {"population": (100, 999), "area": (10, 99), "height": (10, 99), "age": (10, 99)}
# how a question may name each attribute: by its key, or by a paraphrase (half the time each)
NOUNS = {"population": ("population", "headcount"), "area": ("area", "size"),
         "height": ("height", "elevation"), "age": ("age", "antiquity")}
# how a question combines two quantities x and y: its words, the gold calculator expression, and
# the expression the demonstrator writes by mistake (None: it never errs on this phrasing)
COMBINATIONS = {
    "plus":  ("{x} plus {y}", "{x}+{y}", None),
    "minus": ("{x} minus {y}", "{x}-{y}", None),
    "times": ("{x} times {y}", "{x}*{y}", None),
    "from":  ("{x} subtracted from {y}", "{y}-{x}", "{x}-{y}"),      # reads the numbers left to right
    "twice": ("{x} plus twice {y}", "{x}+2*{y}", "({x}+{y})*2"),     # doubles the whole sum
}
MULTIHOP_COMBINATIONS = ("plus", "minus", "from", "twice")  # a product of two lookups is too long a number
SYLLABLES = ["ka", "lo", "mir", "ven", "dor", "ta", "ris", "bel", "zu", "nor", "qua", "nim", "sel", "tor",
             "ul", "va", "ren", "pi", "gal", "esh", "bo", "fen", "hal", "jo", "kir", "mu", "os", "pra", "sa", "wen"]
WORLD_SEED = 1234
N_ENTITIES = 600
N_TEST_ENTITIES = 100

# ---- the demonstrator's mistakes, each a rate at its decision point ----
UNFAMILIAR = ("times", "minus", "age")  # the demonstrator mostly gives up on these
GIVE_UP = (0.6, 0.1)         # rate on questions with an unfamiliar word, on the other tool questions
STOP_EARLY = 0.4             # multihop: answers after the first lookup
KEY_SLIPS = {"size": "population", "headcount": "height",  # paraphrase -> the key written by mistake
             "elevation": "elevation"}
# The tool slips are made half the time: the warm-started base then splits about evenly at that
# token, so a GRPO group whose rollouts reach it usually holds both choices for the reward to tell
# apart.
KEY_SLIP = 0.5
EXPRESSION_SLIP = 0.5        # on the phrasings whose COMBINATIONS entry has a slipped expression
WORDING_SLIP = 0.5           # naming: answers in the other form (the key's name, or the user's word)
GIVE_UP_TEXT = "I do not know. <answer>0</answer>"
SKILL_ROLES = {"call": "reasoning", "hops": "reasoning", "key": "tool", "expression": "tool"}
NAMED = ("area", "height", "age")  # what the naming family compares (a population, 100-999, always wins)


@dataclass(frozen=True)
class Task:
    question: str
    answer: str      # canonical number text
    family: str
    trajectory: str  # gold completion: reasoning, tool calls, observations, answer
    slips: tuple = ()  # the demonstrator's mistakes on this task: (skill, rate, trajectory it writes then)


@dataclass(frozen=True)
class World:
    kb: dict         # entity -> {attribute: value}
    train_entities: tuple
    test_entities: tuple
    conflict: float = 0.0             # the dial: the share of training questions from the naming family
    conflict_sign: str = "opposed"    # opposed: the answer is the user's word; aligned: the key's name

    @property
    def families(self):
        return FAMILIES + ("naming",) * (self.conflict > 0)

    @property
    def skill_roles(self):
        return SKILL_ROLES | ({"wording": "reasoning"} if self.conflict > 0 else {})


def make_world(seed=WORLD_SEED, conflict=0.0, conflict_sign="opposed"):
    rng = random.Random(seed)
    names = set()
    while len(names) < N_ENTITIES:
        names.add("".join(rng.choice(SYLLABLES) for _ in range(2)).capitalize())
    names = sorted(names)
    rng.shuffle(names)
    kb = {name: {attr: rng.randint(lo, hi) for attr, (lo, hi) in ATTRIBUTES.items()} for name in names}
    return World(kb, tuple(names[N_TEST_ENTITIES:]), tuple(names[:N_TEST_ENTITIES]), conflict, conflict_sign)


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


def _entities(rng, world, split, n):
    return rng.sample(world.train_entities if split == "train" else world.test_entities, n)


def _observe(world, entity, key):
    """What the lookup tool answers to entity.key. The tool itself is asked only for a bad key, for
    its error text: building one indexes every name."""
    record = world.kb[entity]
    return format_number(record[key]) if key in record else Lookup(world.kb)(f"{entity}.{key}")


def _give_up_rate(question):
    return GIVE_UP[0] if any(f" {word} " in question for word in UNFAMILIAR) else GIVE_UP[1]


# ---- trajectories ----
#
# A task is a plan: the lookups to make (none for arithmetic), then the combination to compute
# over the values (none for a single lookup). The gold trajectory follows the plan; each of the
# demonstrator's slips follows it up to one decision and errs there, and the tools then answer
# what was actually asked, so a slip's observations are the real ones.


def _write(world, lookups, combination=None, numbers=(), keys=None, slip_expression=False, stop_after=None,
           answer=None):
    """The trajectory that looks up `lookups` [(entity, key)] (writing `keys` instead, if given),
    then computes `combination` over `numbers` (arithmetic) or the values that came back
    (multihop), in its gold form or the demonstrator's slipped form, and answers (with `answer`,
    if given: the naming family answers a word). A lookup that returns an error ends it with the
    give-up text; stop_after=1 answers the first value as soon as it is back."""
    keys = keys or [key for _, key in lookups]
    text = {0: "Compute it. ", 1: "Look it up. "}.get(len(lookups), "Look up both. ")
    values = []
    for (entity, _), key in zip(lookups, keys):
        value = _observe(world, entity, key)
        text += f"<lookup>{entity}.{key}</lookup><obs>{value}</obs>"
        if value.startswith("error"):
            return text + GIVE_UP_TEXT
        values.append(value)
        if stop_after == len(values):
            return text + f"<answer>{value}</answer>"
    if combination is None:
        return text + f"<answer>{values[0] if answer is None else answer}</answer>"
    _, gold, slipped = COMBINATIONS[combination]
    x, y = numbers or values
    expression = (slipped if slip_expression else gold).format(x=x, y=y)
    result = calculator(expression)
    text += "Now compute. " if lookups else ""
    return text + f"<calc>{expression}</calc><obs>{result}</obs><answer>{result}</answer>"


def _task(world, question, family, lookups, nouns=(), combination=None, numbers=(), answers=None):
    """A Task: its gold trajectory, and the demonstrator's slips in the order of their decision
    points: giving up; per lookup its key, and before the second lookup, stopping early; the
    expression. The naming family's `answers` (gold, slipped) replace the last two: its key slip is
    the user's word, and its wording slip the answer's other form."""
    if answers is not None:
        plan = dict(lookups=lookups, answer=answers[0])
        slips = [("call", _give_up_rate(question), GIVE_UP_TEXT)]
        for i, noun in enumerate(nouns):
            keys = [key for _, key in lookups]
            keys[i] = noun
            slips.append(("key", KEY_SLIP, _write(world, **plan, keys=keys)))
        slips.append(("wording", WORDING_SLIP, _write(world, lookups, answer=answers[1])))
        return Task(question, answers[0], family, _write(world, **plan), tuple(slips))
    plan = dict(lookups=lookups, combination=combination, numbers=numbers)
    gold = _write(world, **plan)
    slips = [("call", _give_up_rate(question), GIVE_UP_TEXT)]
    for i, noun in enumerate(nouns):
        if i == 1:
            slips.append(("hops", STOP_EARLY, _write(world, **plan, stop_after=1)))
        if noun in KEY_SLIPS:
            keys = [key for _, key in lookups]
            keys[i] = KEY_SLIPS[noun]
            slips.append(("key", KEY_SLIP, _write(world, **plan, keys=keys)))
    if combination is not None and COMBINATIONS[combination][2] is not None:
        slips.append(("expression", EXPRESSION_SLIP, _write(world, **plan, slip_expression=True)))
    return Task(question, parse_answer(gold), family, gold, tuple(slips))


def _noun(rng, attribute):
    return rng.choice(NOUNS[attribute])


def _arithmetic(rng, world, split):
    name = rng.choice(list(COMBINATIONS))
    x, y = _operands(rng, split, 10, 99)
    words = COMBINATIONS[name][0].format(x=x, y=y)
    return _task(world, f"What is {words}?", "arithmetic", [], combination=name, numbers=(x, y))


def _lookup(rng, world, split):
    (entity,) = _entities(rng, world, split, 1)
    attribute = rng.choice(list(ATTRIBUTES))
    noun = _noun(rng, attribute)
    return _task(world, f"What is the {noun} of {entity}?", "lookup", [(entity, attribute)], [noun])


def _multihop(rng, world, split):
    while True:  # a slip must never land on the gold answer by chance (say, when v2 - v1 = v1)
        e1, e2 = _entities(rng, world, split, 2)
        a1, a2 = rng.choice(list(ATTRIBUTES)), rng.choice(list(ATTRIBUTES))
        n1, n2 = _noun(rng, a1), _noun(rng, a2)
        name = rng.choice(MULTIHOP_COMBINATIONS)
        words = COMBINATIONS[name][0].format(x=f"the {n1} of {e1}", y=f"the {n2} of {e2}")
        task = _task(world, f"What is {words}?", "multihop", [(e1, a1), (e2, a2)], [n1, n2], name)
        if all(parse_answer(trajectory) != task.answer for _, _, trajectory in task.slips):
            return task


def _notool(rng, world, split):
    a, b = _operands(rng, split, 10, 99)
    result = format_number(max(a, b))
    return Task(f"Which is larger, {a} or {b}?", result, "notool", f"No tool needed. <answer>{result}</answer>")


def _naming(rng, world, split):
    while True:  # two different values, so that one is larger
        (entity,) = _entities(rng, world, split, 1)
        compared = rng.sample(NAMED, 2)
        values = [world.kb[entity][attribute] for attribute in compared]
        if values[0] != values[1]:
            break
    words = [NOUNS[attribute][1] for attribute in compared]  # always the user's word, never the key
    larger = values.index(max(values))
    forms = (words[larger], compared[larger])  # (the user's word, the key's name)
    answers = forms if world.conflict_sign == "opposed" else forms[::-1]
    return _task(world, f"Which is larger for {entity}, its {words[0]} or its {words[1]}?", "naming",
                 [(entity, attribute) for attribute in compared], words, answers=answers)


_MAKERS = {"arithmetic": _arithmetic, "lookup": _lookup, "multihop": _multihop, "notool": _notool, "naming": _naming}


def sample_task(rng, world, split, family=None):
    """One task from `split` ('train' or 'test'); the family is uniform unless given, after a draw
    of the naming family at the world's `conflict` rate (no draw at all when it is 0)."""
    if family is None and world.conflict > 0 and rng.random() < world.conflict:
        family = "naming"
    return _MAKERS[family or rng.choice(FAMILIES)](rng, world, split)


def demonstration(rng, task):
    """What the warm start imitates: at each of the task's decision points in turn, the sloppy
    demonstrator makes its mistake there at that mistake's rate (and writes that slip's
    trajectory); past them all, it writes the gold trajectory."""
    for _, rate, trajectory in task.slips:
        if rng.random() < rate:
            return trajectory
    return task.trajectory


def test_set(world, per_family=50, seed=0):
    """The fixed evaluation questions: `per_family` of each family, test entities and operands only."""
    rng = random.Random(seed)
    return [sample_task(rng, world, "test", family) for family in world.families for _ in range(per_family)]


def tokenizer_corpus(world, n=2000, seed=0):
    """Questions and demonstrations (the warm start's text) with entity names removed: a BPE trained
    on this learns the template words as single tokens and leaves names as letters, the same for
    train and test."""
    rng = random.Random(seed)
    names = re.compile("|".join(sorted(world.kb, key=len, reverse=True)))
    texts = []
    for _ in range(n):
        task = sample_task(rng, world, "train")
        texts.append(names.sub("", task.question + "\n" + demonstration(rng, task)))
    return texts


# ---- judging a trajectory's decisions ----

def tool_calls(completion):
    """[(tool, argument)] in the order written, for every tool of the registry."""
    names = "|".join(map(re.escape, TOOLS))
    return [(tool, argument.strip()) for tool, argument in re.findall(rf"<({names})>(.*?)</\1>", completion)]


def judge(task, completion):
    """Which of the task's decisions `completion` got right: {skill: True/False} for the skills
    it reached (SKILL_ROLES). The calls are compared with the gold ones in order, up to the first
    that differs. Whether to call and which tool to call are reasoning decisions: no call, or a
    first call to another tool than gold's, is a wrong 'call'; after the first call, answering
    with gold calls still to make, or calling another tool than the next gold one, is a wrong
    'hops'. What is written inside a call of the right tool is the tool role's: a differing lookup
    (a wrong key, or a misspelt entity) is a wrong 'key', a differing calculation a wrong
    'expression'. A naming answer that names a compared attribute is a right 'wording' when its
    form (key or user's word) is the gold answer's, whichever attribute it names."""
    gold, made = tool_calls(task.trajectory), tool_calls(completion)
    verdict = {}
    for i, (tool, argument) in enumerate(gold):
        order = "call" if i == 0 else "hops"
        if i >= len(made) or made[i][0] != tool:
            verdict[order] = False
            break
        verdict[order] = True
        contents = "key" if tool == "lookup" else "expression"
        right = made[i][1].replace(" ", "") == argument
        verdict[contents] = verdict.get(contents, True) and right
        if not right:
            break
    if task.family == "naming":
        keys = [argument.split(".")[1] for _, argument in gold]
        answer = parse_answer(completion)
        if answer in keys + [NOUNS[key][1] for key in keys]:
            verdict["wording"] = (answer in keys) == (task.answer in keys)
    return verdict


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

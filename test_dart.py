"""
Invariant tests for dart.py, leas.py, tools.py and toy_tasks.py: CPU only, a few minutes.

    python -m pytest -q test_dart.py

Grouped by the invariant each guards, in the order of dart.py's sections: the world and its
tools, token roles, the DART layer, GRPO's arithmetic, the rollout engine, the update, the
training loop and its files, the models and their warm start, the command line, torchrun, LEAS,
and the layer used outside this repository. The tests build their own small warm-started base
once per session, in a temporary cache (or in the folder DART_TEST_CACHE names, to keep it
between sessions), and never touch a model hub. Tests marked needs_cuda run where a CUDA GPU is.
"""
import dataclasses
import io
import json
import math
import os
import pathlib
import random
import re
import shutil
import time
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import dart
import leas
import toy_tasks
import tools

torch.set_num_threads(2)
HERE = pathlib.Path(__file__).resolve().parent
WORLD = toy_tasks.make_world()
DIALS = {sign: toy_tasks.make_world(conflict=0.5, conflict_sign=sign) for sign in ("opposed", "aligned")}
REGISTRY = tools.registry(WORLD.kb)
R, T = dart.REASONING, dart.TOOL
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
needs_two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")


# ---------------------------------------------------------------------------
# fixtures: a small warm-started base, built once, and policies on top of it

# the tests' base: a smaller tiny model (96 units, 2 layers: a quarter of the default's work per token) and
# half the warm start's batch; it knows the format, and ten GRPO steps of either role move its decisions
TEST_BASE = dict(tiny_dim=96, tiny_layers=2, tiny_heads=2, warm_batch=16)


@pytest.fixture(scope="session")
def cfg_factory(tmp_path_factory):
    cache = os.environ.get("DART_TEST_CACHE") or str(tmp_path_factory.mktemp("cache"))

    def make(**overrides):  # on the CPU even where a GPU is visible: the GPU tests ask for it
        return dataclasses.replace(dart.Config(cache_dir=cache, eval_per_family=4, eval_every=1000, save_every=1000,
                                               questions_per_step=4, group_size=4, max_new_tokens=64, device="cpu",
                                               **TEST_BASE), **overrides)
    return make


@pytest.fixture(scope="session")
def make_policy(cfg_factory):
    def make(mode="dart", randomize=0.0, **overrides):
        cfg = cfg_factory(mode=mode, **overrides)
        policy = dart.load_policy(cfg)
        if randomize:  # nonzero adapters: with B = 0 many invariants would hold trivially
            generator = torch.Generator().manual_seed(0)
            with torch.no_grad():
                for p in dart.trainable(policy.model):
                    p.normal_(0, randomize, generator=generator)
        return policy, cfg
    return make


def sample_tasks(n, split="train", seed=0, family=None, world=WORLD):
    rng = random.Random(seed)
    return [toy_tasks.sample_task(rng, world, split, family) for _ in range(n)]


def prompts_for(policy, n, seed=0, group=1):
    """Prompts of n train questions, each repeated `group` times (a GRPO group)."""
    return [dart.prompt_ids(policy.tok, t.question) for t in sample_tasks(n, seed=seed) for _ in range(group)]


def sampled(policy, cfg, prompts, seed=0, temperature=1.0):
    return dart.rollout(policy, REGISTRY, prompts, cfg, temperature, torch.Generator(policy.device).manual_seed(seed))


def encode(policy, text):
    return policy.tok.encode(text, add_special_tokens=False)


def routed(policy, ids, attention, position=None, roles=None):
    """The policy's logits with every position routed by its role (the training forward)."""
    position = dart.position_ids(attention) if position is None else position
    return policy.logits(ids, attention, position, dart.token_roles(ids, policy.special.spans) if roles is None
                         else roles)


def batch_of(policy, n=3, seed=0):
    """Left-padded prompt + gold trajectory ids of n train tasks (the first a multihop one), with their
    mask, positions and roles."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        task = toy_tasks.sample_task(rng, WORLD, "train", "multihop" if not rows else None)
        rows.append(dart.prompt_ids(policy.tok, task.question) + dart.trajectory_ids(
            policy.tok, policy.special, task.trajectory, 24)[0])
    ids, attention = dart.pad_sequences(rows, policy.special.pad, "left", "cpu")
    return ids, attention, dart.position_ids(attention), dart.token_roles(ids, policy.special.spans)


# ---------------------------------------------------------------------------
# the world: tools that never raise, splits that hold out, a demonstrator that errs in each role

ENTITY = WORLD.train_entities[0]
HEIGHT = tools.format_number(WORLD.kb[ENTITY]["height"])


@pytest.mark.parametrize("tool, text, expected", [("calc", expr, expected) for expr, expected in [
    ("5230+120", "5350"),
    ("2*3+4", "10"),
    ("10/4", "2.5"),
    ("10/2", "5"),                # an integer result never prints as 5.0
    ("1/3", "0.3333333333"),
    ("-(3-5)**2", "-4"),
    ("7//2", "3"),
    ("7 % 3", "1"),
    (" 12 ", "12"),
    ("2**10", "1024"),
    ("1.5*2", "3"),
    ("1/0", "error: division by zero"),
    ("5%0", "error: division by zero"),
    ("0**-1", "error: division by zero"),
    ("9**9**9", "error: exponent larger than 64"),
    ("10**10**10", "error: exponent larger than 64"),
    ("2**-1074", "error: exponent larger than 64"),
    ("1e308*10", "error: number too large"),
    ("99999999999999999999", "error: number too large"),
    ("(-8)**(1/3)", "error: result is not a real number"),
    ("(" * 10000, "error: expression longer than 200 characters"),
    ("-" * 150 + "1", "error: expression nested too deeply"),
    ("(" * 60 + "1" + ")" * 60, "1"),         # parentheses add no depth
    ("(" * 60 + "1" + ")" * 59, "error: not a valid expression"),
    ("1" * 201, "error: expression longer than 200 characters"),
    ("", "error: empty expression"),
    ("2+", "error: not a valid expression"),
    ("()", "error: unsupported element Tuple"),
    ("x+1", "error: bad character 'x'"),
    ("__import__('os')", "error: bad character \"'\""),
    ("(1).real", "error: bad character 'a'"),
    ("lambda: 1", "error: bad character ':'"),
    ("[1 for _ in ()]", "error: bad character '['"),
    ("١+٢", "error: bad character '١'"),   # unicode digits are not digits here
    ("1_000", "error: bad character '_'"),
    ("e", "error: unsupported element Name"),
    ("1 2", "error: not a valid expression"),
]] + [  # the lookup forgives case and spaces, and names what exists
    ("lookup", f"{ENTITY}.height", HEIGHT),
    ("lookup", f"  {ENTITY.lower()} . HEIGHT ", HEIGHT),
    ("lookup", f"{ENTITY}.weight", "error: attributes are population, area, height, age"),
    ("lookup", f"{ENTITY}x.height", f"error: no entity; try {ENTITY}"),
    ("lookup", "no dot here", "error: write Entity.attribute")])
def test_tool_table(tool, text, expected):
    assert {"calc": tools.calculator, "lookup": tools.Lookup(WORLD.kb)}[tool](text) == expected


HOSTILE = ["9**9**9", "10**10**10", "(" * 10000, "1e308*10", "2**-1074", "١٢٣+٤", "²+1", "½", "∞",
           "__import__('os')", "os.system('ls')", "x", "abs(-1)", "(1).real", "lambda: 1", "[i for i in ()]",
           "{1: 2}", "1 if 1 else 2", "not 1", "1 < 2", "1 and 2", "~1", "1 << 100", "b'1'", "'a' * 10",
           "9" * 5000, "0." + "0" * 300 + "1", "1e-400", "-" * 199 + "1", "(" * 99 + "1" + ")" * 99,
           "1/" + "(1-1)", "0**0", "(-1)**0.5", "1%0.0", "\x00", "\u202e1+1", "1\n+1", " ", "\t", "",
           "Avalon.population", ".", "..", "A.b.c", ".population", "Avalon.", " " * 300 + ".x"]
FUZZ_CALL_BOUND_S = 0.5  # no tool call may take longer: a hang or a huge computation would (typical: 20 us)


def fuzz_inputs(n, seed=0):
    """Character soup over the tiny tokenizer's characters plus unicode oddities, random
    well-formed expressions, and mutations of them that break them."""
    rng = random.Random(seed)
    soup = ("0123456789+-*/%().eE ,_abcxyzAB<>=![]{}'\"\n\t" + "\u0661\u00b2\u00bd\u221e\u202e\x00\u00e9\u20ac"
            + "".join(WORLD.train_entities[:5]))

    def expression(depth):
        if depth == 0 or rng.random() < 0.3:
            return rng.choice([str(rng.randint(0, 10 ** rng.randint(1, 20))), f"{rng.random() * 100:.3f}", "1e9"])
        op = rng.choice(["+", "-", "*", "/", "//", "%", "**"])
        return rng.choice(["{}{}{}", "({}{}{})", "-{}{}{}"]).format(expression(depth - 1), op, expression(depth - 1))

    for i in range(n):
        if i % 3 == 0:
            yield "".join(rng.choice(soup) for _ in range(rng.randint(0, 60)))
        elif i % 3 == 1:
            yield expression(rng.randint(1, 6))
        else:
            text = list(expression(rng.randint(1, 5)))
            for _ in range(rng.randint(1, 4)):
                text.insert(rng.randint(0, len(text)), rng.choice(soup))
            yield "".join(text)


def test_tools_survive_fuzzing():
    """100,000 generated inputs and the hostile list, through both tools: always a string, never an
    exception, each call under FUZZ_CALL_BOUND_S."""
    slowest = 0.0
    for text in list(fuzz_inputs(100_000)) + HOSTILE:
        for name in ("calc", "lookup"):
            started = time.perf_counter()
            result = tools.run_tool(REGISTRY, name, text)
            slowest = max(slowest, time.perf_counter() - started)
            assert isinstance(result, str) and result
    assert slowest < FUZZ_CALL_BOUND_S


NAME = re.compile(r"\b[A-Z][a-z]+\b")


def replays(trajectory):
    """Every call's observation in `trajectory` is what the real tool answers."""
    return all(rest.startswith("<obs>" + tools.run_tool(REGISTRY, name, argument) + "</obs>")
               for name in tools.TOOLS for call in trajectory.split(f"<{name}>")[1:]
               for argument, _, rest in [call.partition(f"</{name}>")])


def inside_tool_call(text, index):
    """Is the character at `index` written inside an open tool call (the role rule, on text)?"""
    opened = False
    for match in re.finditer(r"<(/?)(calc|lookup)>", text[:index]):
        opened = not match.group(1)
    return opened


def test_splits_hold_out_entities_and_operands_but_share_phrasings():
    """Train and test never share an entity or an operand pair; they share every phrasing (a model
    trained from scratch learns a word only from the warm start)."""
    assert not set(WORLD.train_entities) & set(WORLD.test_entities)
    for split, entities in (("train", WORLD.train_entities), ("test", WORLD.test_entities)):
        for task in sample_tasks(400, split=split, seed=6):
            assert set(NAME.findall(task.question)) - {"What", "Which"} <= set(entities)
            if task.family in ("arithmetic", "notool"):
                a, b = map(int, re.findall(r"\d+", task.question))
                assert toy_tasks.split_of(a, b) == split

    def phrasing(question):  # entities and numbers blanked
        return re.sub(r"\d+", "N", NAME.sub(lambda m: m.group() if m.group() in ("What", "Which") else "E", question))
    train = {phrasing(t.question) for t in sample_tasks(20000, seed=7)}
    assert {phrasing(t.question) for t in sample_tasks(2000, split="test", seed=8)} <= train


@pytest.mark.parametrize("world", [WORLD, DIALS["opposed"]], ids=["default", "dial"])
def test_gold_trajectories_solve_their_tasks_and_every_slip_errs_in_its_own_skill_and_role(world):
    """A gold trajectory replays through the real tools, earns reward 1 and judge() finds every decision right. A
    demonstrator's slip replays too, earns nothing, judge() marks exactly its own skill wrong, and it leaves the gold
    trajectory inside a tool call for the tool skills and outside every call for the reasoning skills. skill_rates()
    judges only the decisions reached: every skill right for gold responses, 'call' wrong and nothing else reached for
    responses that give up, only their own skill wrong for the demonstrator's tool slips."""
    for family in world.families:
        for task in sample_tasks(200, family=family, seed=1, world=world):
            assert toy_tasks.reward(task.trajectory, task) == 1.0 and replays(task.trajectory)
            assert all(toy_tasks.judge(task, task.trajectory).values())
    seen, roles = set(), world.skill_roles
    for task in sample_tasks(2000, seed=2, world=world):
        for skill, rate, trajectory in task.slips:
            seen.add(skill)
            assert 0 < rate < 1 and replays(trajectory) and toy_tasks.reward(trajectory, task) == 0.0
            verdict = toy_tasks.judge(task, trajectory)
            assert verdict[skill] is False and all(v for s, v in verdict.items() if s != skill), (trajectory, verdict)
            where = next(i for i, (a, b) in enumerate(zip(task.trajectory, trajectory)) if a != b)
            assert ("tool" if inside_tool_call(task.trajectory, where) else "reasoning") == roles[skill]
    assert seen == set(roles)
    tasks = [t for t in sample_tasks(200, split="test", seed=9, world=world) if t.slips]
    assert dart.skill_rates(tasks, [t.trajectory for t in tasks], roles) == {f"skill_{s}": 1.0 for s in roles}
    gave_up = dart.skill_rates(tasks, [toy_tasks.GIVE_UP_TEXT] * len(tasks), roles)
    assert gave_up == {f"skill_{s}": 0.0 if s == "call" else None for s in roles}
    for skill in ("key", "expression"):
        rates = dart.skill_rates(*zip(*[(t, text) for t in tasks for s, _, text in t.slips if s == skill]), roles)
        assert rates[f"skill_{skill}"] == 0.0 and rates["skill_call"] == 1.0


def test_the_demonstrator_errs_at_the_intended_rates_and_leaves_both_roles_something_to_learn():
    """Per skill, in the family where that decision comes first after deciding to call (so every
    demonstration that called reaches it), the demonstrator's error rate is the intended one, and
    on a task without a pitfall in a skill it never errs there. It fails often in every tool family,
    and each role's pitfalls come up in a sizeable share of the questions."""
    rng = random.Random(4)
    where = {"call": toy_tasks.FAMILIES[:3], "key": ("lookup",), "expression": ("arithmetic",), "hops": ("multihop",)}
    judged, wrong, expected, exercised = Counter(), Counter(), Counter(), Counter()
    success = {f: [] for f in toy_tasks.FAMILIES}
    tasks = sample_tasks(20000, seed=4)
    for task in tasks:
        demo = toy_tasks.demonstration(rng, task)
        success[task.family].append(toy_tasks.reward(demo, task))
        exercised.update({toy_tasks.SKILL_ROLES[skill] for skill, _, _ in task.slips})
        rates = {skill: rate for skill, rate, _ in task.slips}
        for skill, right in toy_tasks.judge(task, demo).items():
            if skill not in rates:
                assert right, (task.question, demo)
            elif task.family in where[skill]:
                judged[skill] += 1
                wrong[skill] += not right
                expected[skill] += rates[skill]
    assert set(judged) == set(toy_tasks.SKILL_ROLES)
    for skill in judged:
        assert abs(wrong[skill] - expected[skill]) / judged[skill] < 0.03, (skill, wrong[skill], expected[skill])
    assert all(np.mean(success[f]) < 0.8 for f in ("arithmetic", "lookup", "multihop"))
    assert np.mean(success["notool"]) == 1.0
    assert all(exercised[role] / len(tasks) > 0.25 for role in ("reasoning", "tool")), exercised


def test_the_dial_is_off_at_zero_and_its_two_signs_differ_only_in_the_answers_form():
    """P = 0 draws nothing: the four families alone, the same questions. P > 0 draws the naming family
    at rate P and adds it to the test set after the same four families' questions. Opposed and aligned
    ask the same questions with the same calls, slips and rates: each one's gold answer is the other's
    wording slip (the user's word against the key's name), and the key slip writes the user's word."""
    off = toy_tasks.make_world(conflict=0.0, conflict_sign="aligned")
    assert off.families == toy_tasks.FAMILIES and sample_tasks(300, world=off) == sample_tasks(300)
    opposed, aligned = (sample_tasks(4000, seed=5, world=DIALS[sign]) for sign in ("opposed", "aligned"))
    assert abs(np.mean([t.family == "naming" for t in opposed]) - 0.5) < 0.03
    assert toy_tasks.test_set(DIALS["opposed"], 4)[:16] == toy_tasks.test_set(WORLD, 4)
    for o, a in zip(opposed, aligned):
        assert o.question == a.question
        if o.family != "naming":
            assert o == a
            continue
        (_, _, wording_o), (_, _, wording_a) = o.slips[-1], a.slips[-1]
        assert [s[:2] for s in o.slips] == [s[:2] for s in a.slips] and o.slips[:-1] == a.slips[:-1]
        assert (o.trajectory, wording_o) == (wording_a, a.trajectory)
        keys = [argument.split(".")[1] for _, argument in toy_tasks.tool_calls(o.trajectory)]
        words = [toy_tasks.NOUNS[key][1] for key in keys]
        assert o.answer in words and a.answer in keys and all(f" {w}" in o.question for w in words)
        assert {toy_tasks.tool_calls(t)[i][1].split(".")[1] for i, (s, _, t) in enumerate(o.slips[1:3])} == set(words)


SIZE_OF_AVALON = toy_tasks.Task("What is the size of Avalon?", "12", "lookup",
                                "Look it up. <lookup>Avalon.area</lookup><obs>12</obs><answer>12</answer>")
TWO_HOPS = toy_tasks.Task("What is the size of Avalon plus the age of Kalo?", "42", "multihop",
                          "Look up both. <lookup>Avalon.area</lookup><obs>12</obs><lookup>Kalo.age</lookup>"
                          "<obs>30</obs>Now compute. <calc>12+30</calc><obs>42</obs><answer>42</answer>")


@pytest.mark.parametrize("task, completion, expected", [
    (SIZE_OF_AVALON, "I do not know. <answer>0</answer>", {"call": False}),
    (SIZE_OF_AVALON, "<lookup>Avalon.population</lookup><obs>5</obs><answer>5</answer>", {"call": True, "key": False}),
    (SIZE_OF_AVALON, "<lookup>Avalon.area</lookup><obs>12</obs><answer>12</answer>", {"call": True, "key": True}),
    # which tool to call is a reasoning decision, never charged to the tool role
    (SIZE_OF_AVALON, "<calc>12</calc><obs>12</obs><answer>12</answer>", {"call": False}),
    (TWO_HOPS, "<lookup>Avalon.area</lookup><obs>12</obs><answer>12</answer>", {"call": True, "key": True,
                                                                                "hops": False}),
    (TWO_HOPS, "<lookup>Avalon.area</lookup><obs>12</obs><calc>12+30</calc><obs>42</obs><answer>42</answer>",
     {"call": True, "key": True, "hops": False}),
    (TWO_HOPS, TWO_HOPS.trajectory, {"call": True, "key": True, "hops": True, "expression": True}),
    (TWO_HOPS, TWO_HOPS.trajectory.replace("Kalo.age", "Kalo.antiquity"), {"call": True, "key": False, "hops": True}),
])
def test_judge_on_hand_written_completions(task, completion, expected):
    assert toy_tasks.judge(task, completion) == expected


@pytest.mark.parametrize("completion, format_bonus, reward", [
    ("<answer>5350</answer>", 0.0, 1.0),
    ("<answer> 5350.0 </answer>", 0.0, 1.0),
    ("<answer>5,350</answer>", 0.0, 1.0),
    ("<answer>5351</answer>", 0.0, 0.0),
    ("the answer is 5350", 0.0, 0.0),
    ("<answer>5350", 0.0, 0.0),
    ("<answer>abc</answer>", 0.0, 0.0),
    ("<answer>1</answer>", 0.1, 0.1),  # a wrong but well-formed answer earns the format bonus
])
def test_reward_exact_match_after_canonical_formatting(completion, format_bonus, reward):
    assert toy_tasks.reward(completion, toy_tasks.Task("q", "5350", "lookup", ""), format_bonus) == reward


# ---------------------------------------------------------------------------
# token roles: the rule, and its one-token form, on hand-written sequences

# ids 10 <calc>, 12 <lookup> open a span; 11 </calc>, 13 </lookup>, 14 <obs> end one
HAND = dart.SpanTags(opens=torch.tensor([10, 12]), ends=torch.tensor([11, 13, 14]))


@pytest.mark.parametrize("ids, roles", [
    # x <calc> 1 + </calc> <obs> 3 </obs> y : <calc> predicts the argument (TOOL),
    # </calc> predicts what follows the call (REASONING)
    ([5, 10, 6, 7, 11, 14, 8, 15, 9], [R, T, T, T, R, R, R, R, R]),
    ([12, 6, 13, 14, 8, 15, 10, 7, 11], [T, T, R, R, R, R, T, T, R]),  # two calls back to back
    ([10, 6, 12, 7, 14, 8, 15], [T, T, T, T, R, R, R]),  # nested open: inside until <obs> closes the span
    ([11, 5, 10, 5, 6], [R, R, T, T, T]),  # a stray closing tag opens nothing; an unclosed span stays TOOL
    ([10, 5, 14, 6], [T, T, R, R]),  # the policy writing <obs> itself also ends a span
    ([5, 6, 7], [R, R, R])])
def test_token_roles_and_next_role_agree_on_hand_written_sequences(ids, roles):
    ids = torch.tensor([ids])
    assert dart.token_roles(ids, HAND).tolist() == [roles]
    role, stepped = torch.tensor([R]), []
    for token in ids[0]:
        role = dart.next_role(role, token[None], HAND)
        stepped.append(role.item())
    assert stepped == roles  # the engine's incremental form agrees


# ---------------------------------------------------------------------------
# the DART layer: the base at zero, each token through its own adapter, gradients isolated


def bare_logits(cfg, ids, attention, position):
    """The logits of the cached base, with no adapter attached."""
    base, _ = dart.load_base(cfg)
    with torch.no_grad():
        return base(input_ids=ids, attention_mask=attention, position_ids=position).logits


@pytest.mark.parametrize("mode", dart.MODES)
def test_zero_init_and_adapters_off_are_the_base_model_and_only_the_adapters_train(make_policy, mode):
    """Fresh adapters (B = 0) leave the base's logits exactly as they were; nonzero ones change them,
    and adapters_off() (the KL reference) removes them again. Only the adapters (and mixlora's
    routers) train: one rank-r LoRA per wrapped linear in joint, reason_only and tool_only, two in
    every other mode, so that joint2r, two_agent and mixlora match dart's budget."""
    zero, cfg = make_policy(mode)
    nonzero, _ = make_policy(mode, randomize=0.05)
    ids, attention, position, roles = batch_of(zero)
    bare = bare_logits(cfg, ids, attention, position)
    with torch.no_grad():
        assert torch.equal(routed(zero, ids, attention, position, roles), bare)
        assert not torch.allclose(routed(nonzero, ids, attention, position, roles), bare, atol=1e-3)  # they act...
        with dart.adapters_off(nonzero.routing):
            assert torch.equal(routed(nonzero, ids, attention, position, roles), bare)  # ...and off, they don't
    frozen = [p for n, p in zero.model.named_parameters() if "lora" not in n and "router" not in n]
    assert frozen and not any(p.requires_grad for p in frozen)  # the backbone, embeddings and lm_head
    routers = sum(p.numel() for n, p in zero.model.named_parameters() if "router" in n)
    one_lora = sum(cfg.lora_rank * (m.frozen.in_features + m.frozen.out_features)
                   for m in zero.model.modules() if isinstance(m, dart.DartLinear))
    blocks = 1 if mode in ("joint", "reason_only", "tool_only") else 2
    assert (routers > 0) == (mode == "mixlora")
    assert sum(p.numel() for p in dart.trainable(zero.model)) == blocks * one_lora + routers


def block_view(policy, block):
    """The adapter tensors of one block, as a single-block (rank r) state."""
    units = dart.block_units(block, policy.routing.lora_rank)
    return {name: (p[units] if name.endswith("lora_A") else p[:, units]).detach().clone()
            for name, p in policy.model.named_parameters() if p.requires_grad}


def test_dart_with_one_role_is_a_single_lora_and_joint2r_one_of_rank_2r(make_policy):
    dual, _ = make_policy("dart", randomize=0.05)
    single, _ = make_policy("joint")
    ids, attention, position, _ = batch_of(dual)
    for role in (R, T):
        dart.load_adapter_block(single.model, block_view(dual, role), 0, single.routing.lora_rank)
        roles = torch.full_like(ids, role)
        with torch.no_grad():
            assert torch.allclose(routed(dual, ids, attention, position, roles),
                                  routed(single, ids, attention, position, roles), atol=1e-5)
    torch.manual_seed(0)
    routing = dart.Routing("joint2r", lora_rank=4, alpha=8.0, device="cpu")
    layer = dart.DartLinear(torch.nn.Linear(16, 8), routing, 0.0, with_router=False, generator=torch.Generator())
    torch.nn.init.normal_(layer.lora_B)
    x = torch.randn(2, 5, 16)
    routing.route(torch.randint(0, 2, (2, 5)))
    expected = layer.frozen(x) + (8.0 / 8) * x @ layer.lora_A.T @ layer.lora_B.T  # alpha / (2r)
    assert torch.allclose(layer(x), expected, atol=1e-5)


def block_grad(policy, ids, attention, loss_positions, block=T):
    """Sum of |grad| over one adapter block's tensors, for a loss on the logits at loss_positions."""
    policy.model.zero_grad(set_to_none=True)
    routed(policy, ids, attention)[loss_positions].logsumexp(-1).sum().backward()
    units = dart.block_units(block, policy.routing.lora_rank)
    return sum((p.grad[units] if name.endswith("lora_A") else p.grad[:, units]).abs().sum().item()
               for name, p in policy.model.named_parameters() if name.endswith(("lora_A", "lora_B")))


def test_the_tool_block_learns_only_through_tool_spans_and_two_agent_isolation_is_total(make_policy):
    """In one layer, a block gets exactly zero gradient from the other role's positions, and some from
    its own. In the model, without a tool span the tool block gets no gradient at all. With one,
    attention carries a token's loss into the other role's adapter in `dart` (the README's caveat);
    in `two_agent` neither role's loss ever reaches the other agent's adapter."""
    torch.manual_seed(0)
    routing = dart.Routing("dart", lora_rank=4, alpha=8.0, device="cpu")
    layer = dart.DartLinear(torch.nn.Linear(16, 8), routing, 0.0, with_router=False, generator=torch.Generator())
    torch.nn.init.normal_(layer.lora_B)
    roles = torch.tensor([[0, 0, 1, 1, 0, 1], [1, 1, 1, 0, 0, 0]])
    routing.route(roles)
    x = torch.randn(2, 6, 16)
    for role in (R, T):
        grad_A, grad_B = torch.autograd.grad(layer(x)[roles == role].square().sum(), (layer.lora_A, layer.lora_B))
        own, other = dart.block_units(role, 4), dart.block_units(1 - role, 4)
        assert torch.count_nonzero(grad_A[other]) == 0 and torch.count_nonzero(grad_B[:, other]) == 0
        assert torch.count_nonzero(grad_A[own]) > 0 and torch.count_nonzero(grad_B[:, own]) > 0
    policy, _ = make_policy("dart", randomize=0.05)
    ids = torch.tensor([dart.prompt_ids(policy.tok, "Which is larger, 12 or 34?") + encode(
        policy, "No tool needed. <answer>34</answer>")])
    assert block_grad(policy, ids, torch.ones_like(ids), torch.ones_like(ids, dtype=torch.bool)) == 0.0
    for mode, leaks in (("dart", True), ("two_agent", False)):
        policy, _ = make_policy(mode, randomize=0.05)
        ids, attention, _, roles = batch_of(policy, n=1)
        reasoning_after_a_call = (roles == R) & (roles.cumsum(-1) > 0) & attention.bool()
        assert (block_grad(policy, ids, attention, reasoning_after_a_call, T) > 0) == leaks
        assert (block_grad(policy, ids, attention, roles == T, R) > 0) == leaks


# ---------------------------------------------------------------------------
# GRPO's arithmetic


def test_group_advantages():
    rewards = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    adv = dart.group_advantages(rewards)
    assert torch.equal(adv[:2], torch.zeros(2, 4))  # a zero-variance group teaches nothing
    std = math.sqrt((0.75 ** 2 + 3 * 0.25 ** 2) / 4)  # population std of [1, 0, 0, 0]
    assert torch.allclose(adv[2], torch.tensor([0.75, -0.25, -0.25, -0.25]) / (std + 1e-4))
    assert torch.allclose(dart.group_advantages(rewards, scale_std=False)[2], torch.tensor([0.75, -0.25, -0.25, -0.25]))


def test_token_weights_aggregations():
    weights = lambda mask, agg, budget: dart.token_weights(mask, agg, budget, dart.batch_totals(mask))  # one process
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.bool)
    assert torch.allclose(weights(mask, "token_mean", 10), mask.float() / 4)
    seq_mean = weights(mask, "seq_mean", 10)
    assert torch.allclose(seq_mean[0], torch.tensor([1, 1, 1, 0]) / 3 / 2)
    assert torch.allclose(seq_mean[1], torch.tensor([1.0, 0, 0, 0]) / 2)
    assert torch.allclose(weights(mask, "dr_grpo", 10), mask.float() / 20)
    empty_row = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)  # seq_mean: only rows with loss count
    assert torch.allclose(weights(empty_row, "seq_mean", 10).sum(), torch.tensor(1.0))


def test_token_loss_clips_the_ratio_and_measures_k3_kl():
    logp = torch.log(torch.tensor([[0.6, 0.2], [0.6, 0.2]]))
    old = torch.log(torch.tensor([[0.4, 0.4], [0.4, 0.4]]))  # ratios 1.5 and 0.5
    ref = torch.log(torch.tensor([[0.5, 0.2], [0.5, 0.2]]))
    loss, kl = dart.token_loss(logp, old, ref, torch.tensor([[1.0], [-1.0]]), clip_eps=0.2, kl_beta=0.0)
    # A > 0: min(1.5, 1.2) = 1.2 and min(0.5, 0.8) = 0.5; A < 0: min(-1.5, -1.2) and min(-0.5, -0.8)
    assert torch.allclose(loss, torch.tensor([[-1.2, -0.5], [1.5, 0.8]]))
    r = 0.5 / 0.6
    assert torch.allclose(kl[:, 0], torch.tensor(r - math.log(r) - 1)) and torch.all(kl[:, 1] == 0)
    with_kl, _ = dart.token_loss(logp, old, ref, torch.tensor([[1.0], [-1.0]]), 0.2, kl_beta=0.5)
    assert torch.allclose(with_kl, loss + 0.5 * kl)


def test_learning_rate_schedule():
    """Warmup times a cosine decay to 10% of the peak at the last step; constant after the warmup."""
    cfg = dart.Config(lr=1.0, steps=11, warmup_steps=5)
    assert [dart.learning_rate(cfg, s) for s in range(5)] == pytest.approx([0.2 * k * (0.1 + 0.9 * 0.5 * (
        1 + math.cos(math.pi * (k - 1) / 10))) for k in range(1, 6)])  # warmup times the decay
    assert dart.learning_rate(cfg, 10) == pytest.approx(0.1)
    rates = [dart.learning_rate(cfg, s) for s in range(4, 11)]
    assert rates == sorted(rates, reverse=True)  # decays after the warmup
    assert {dart.learning_rate(dataclasses.replace(cfg, lr_schedule="constant", warmup_steps=0), s)
            for s in range(11)} == {1.0}


# ---------------------------------------------------------------------------
# the rollout engine: tools run mid-sequence, observations carry no loss, limits hold, and the
# log-probs it records are the training forward's (and the KL reference the bare base's)


class ScriptedModel(torch.nn.Module):
    """A stand-in model that writes fixed texts whatever the environment inserts, so the engine's
    reaction to exact token sequences can be tested. It keeps what it has seen on its cache, and
    follows the engine when it copies prompt rows to their rollouts and drops finished rows (the
    first rows must have distinct prompts: the engine reads one row per distinct prompt)."""

    def __init__(self, tok, special, scripts):
        super().__init__()
        self.special = special
        self.vocab = len(tok)
        self.scripts = [tok.encode(s, add_special_tokens=False) + [special.eos] for s in scripts]

    def forward(self, input_ids, cache, **_):
        if not hasattr(cache, "seen"):  # the prompts
            cache.seen, cache.prompt_len, cache.rows = input_ids, input_ids.shape[1], list(range(len(input_ids)))
            cache.reorder_cache = lambda index, cache=cache: self.follow(cache, index.tolist())
        else:
            cache.seen = torch.cat([cache.seen, input_ids], 1)
        logits = torch.full((len(input_ids), 1, self.vocab), -1e4)
        for i, row in enumerate(cache.rows):
            script = self.scripts[row]
            written = self.written(cache.seen[i, cache.prompt_len:].tolist())
            logits[i, 0, script[min(written, len(script) - 1)]] = 0.0
        return SimpleNamespace(logits=logits)

    @staticmethod
    def follow(cache, index):
        cache.seen = cache.seen[index]
        expanded = getattr(cache, "expanded", False)  # the first reorder copies prompts to all rows
        cache.rows = [cache.rows[i] for i in index] if expanded else list(range(len(index)))
        cache.expanded = True

    def written(self, response):
        """How many response tokens the policy wrote: all but the environment's <obs>...</obs>."""
        count, inside = 0, False
        for token in response:
            inside = inside or token == self.special.obs
            count += not inside
            inside = inside and token != self.special.obs_end
        return count


@pytest.fixture(scope="session")
def scripted(make_policy):
    tiny, _ = make_policy("dart")

    def run(scripts, registry=REGISTRY, tok=tiny.tok, **limits):
        cfg = dart.Config(**limits)
        special = dart.special_ids(tok)
        policy = dart.Policy(ScriptedModel(tok, special, scripts), tok, special, dart.Routing("dart", 2, 4.0, "cpu"),
                             "cpu")
        prompts = [dart.prompt_ids(tok, "What is 2 plus 3?"), dart.prompt_ids(tok, "Hi?")]
        return dart.rollout(policy, registry, [prompts[i % 2] for i in range(len(scripts))], cfg, 1.0), policy
    return run


def observations(text):
    return [chunk.partition("</obs>")[0] for chunk in text.split("<obs>")[1:]]


def as_observed(policy, text, max_tokens=24):
    """What the policy reads of a tool's output: tokenized once, cut to max_tokens."""
    return policy.tok.decode(dart.observation_ids(policy.tok, policy.special, text, max_tokens)[1:-1])


def test_engine_runs_tools_forces_observations_and_masks_them(scripted):
    """Tools run as calls close and their answers are fed, not sampled; observation tokens and
    padding carry no loss, </answer> and eos do; reason_only and tool_only train their own tokens."""
    out, policy = scripted(["Compute it. <calc>2+3</calc><answer>5</answer>", "No tool needed. <answer>7</answer>",
                            "Done"])
    assert out.texts[:2] == ["Compute it. <calc>2+3</calc><obs>5</obs><answer>5</answer>",
                             "No tool needed. <answer>7</answer>"]
    assert out.call_counts == [1, 0, 0] and out.observation_counts == [1, 0, 0] and out.error_counts == [0, 0, 0]
    response, real = out.ids[:, out.prompt_len:], out.attention_mask[:, out.prompt_len:].bool()
    for row in range(3):
        env = False
        for token, by_policy in zip(response[row][real[row]].tolist(), out.written_by_policy[row][real[row]].tolist()):
            env = env or token == policy.special.obs
            assert by_policy == (not env)
            env = env and token != policy.special.obs_end
    last = real.sum(-1) - 1
    assert response[0, last[0]] == policy.special.answer_end and response[2, last[2]] == policy.special.eos
    assert out.written_by_policy[torch.arange(3), last].all() and not out.written_by_policy[~real].any()
    roles = dart.predicting_roles(out, policy.special)
    trained = {mode: policy.tok.decode(response[0][dart.loss_mask(out, roles, mode)[0]].tolist())
               for mode in ("reason_only", "tool_only", "dart")}
    assert trained["tool_only"] == "2+3</calc>"           # the argument and the closing tag
    assert trained["reason_only"] == "Compute it. <calc><answer>5</answer>"  # the decision to call, the answer
    assert trained["dart"] == "Compute it. <calc>2+3</calc><answer>5</answer>"  # everything the policy wrote


@pytest.mark.parametrize("script, error, settings", [
    ("<calc>1+<lookup><answer>1</answer>", "error: calls cannot nest", {}),
    ("<calc>" + "1" * 40 + "<answer>1</answer>", "error: call over 24 tokens", {}),  # unclosed
    ("<calc></calc><answer>1</answer>", "error: empty tool call", {}),
    ("<calc>   </calc><answer>1</answer>", "error: empty tool call", {}),
    ("</calc><answer>1</answer>", "error: no open call", {}),
    ("<calc>1+1</lookup><answer>1</answer>", "error: no open call", {}),
    ("<calc>two</calc><answer>1</answer>", "error: bad character 'o'", {}),
    ("<lookup>Nowhere.height</lookup><answer>1</answer>", REGISTRY["lookup"]("Nowhere.height"), {}),
    ("<calc><answer>1</answer>", "error: at most 0 tool calls", {"max_tool_calls": 0}),  # refused at its tag
    ("<lookup>A.b</lookup><answer>1</answer>", "error: unknown tool 'lookup'; tools are calc",
     {"registry": {"calc": tools.calculator}})])  # a tag the environment has no tool for
def test_malformed_calls_become_error_observations(scripted, script, error, settings):
    out, policy = scripted([script], **settings)
    assert observations(out.texts[0]) == [as_observed(policy, error)]
    assert out.error_counts == out.observation_counts == [1] and out.texts[0].endswith("<answer>1</answer>")


def test_a_tool_is_one_entry_of_the_registry(scripted, make_policy, monkeypatch):
    """A third tool added as one entry of tools.TOOLS gets its tags, its line in a --model's prompt,
    the environment's dispatch, its tokens' role and toy_tasks' parsing, with nothing else written."""
    import copy
    tok = copy.deepcopy(make_policy("dart")[0].tok)  # the tests' tokenizer, given the new tags as a base would be
    tok.add_tokens(["<shout>", "</shout>"], special_tokens=True)
    monkeypatch.setitem(tools.TOOLS, "shout", tools.Tool("<shout>text</shout> writes it in capitals",
                                                         lambda kb: str.upper))
    assert dart.format_tags(tools.TOOLS)[4:6] == ["<shout>", "</shout>"]
    assert "<shout>text</shout> writes it in capitals" in dart.instructions()
    out, policy = scripted(["Shout it. <shout>kalo</shout><answer>1</answer>"], registry=tools.registry(WORLD.kb),
                           tok=tok)
    assert observations(out.texts[0]) == ["KALO"] and out.call_counts == [1] and out.error_counts == [0]
    assert toy_tasks.tool_calls(out.texts[0]) == [("shout", "kalo")]
    tool_tokens = dart.loss_mask(out, dart.predicting_roles(out, policy.special), "tool_only")[0]
    assert tok.decode(out.ids[0, out.prompt_len:][tool_tokens].tolist()) == "kalo</shout>"


@pytest.mark.parametrize("max_obs_tokens", [24, 4])
def test_the_warm_start_reads_the_observations_the_rollout_inserts(scripted, max_obs_tokens):
    """A demonstration, tokenized for the warm start, is token for token what the engine produces when
    the policy writes the same text: the tools' answers, errors included, cut to the same length."""
    tasks = [t for t in sample_tasks(300, seed=11) if any(skill == "key" for skill, _, _ in t.slips)]
    demonstrations = [text for t in tasks for skill, _, text in t.slips if "error" in text][:3] + [tasks[0].trajectory]
    out, policy = scripted([re.sub(r"<obs>.*?</obs>", "", text) for text in demonstrations],
                           max_obs_tokens=max_obs_tokens)
    for row, text in enumerate(demonstrations):
        ids, by_policy = dart.trajectory_ids(policy.tok, policy.special, text, max_obs_tokens)
        real = out.attention_mask[row, out.prompt_len:].bool()
        assert out.ids[row, out.prompt_len:][real].tolist() == ids
        assert out.written_by_policy[row][real].long().tolist() == by_policy


@pytest.mark.parametrize("mode", ["dart", "joint", "two_agent", "mixlora"])
def test_rollout_logprobs_and_roles_equal_the_training_forwards(make_policy, mode):
    """The log-probs recorded while sampling (KV cache, one token at a time, forced observations, left padding, a
    group's prompt read once, finished rows dropped) equal those of the training forward over the finished sequences,
    and that forward (which also reads each prompt once) equals a plain forward over every row; the roles the engine
    routed with are the rule's. LoRA dropout acts in updates only: it is set, and neither the sampling nor that
    forward drops anything. The update's KL reference, computed micro-batch by micro-batch (rows cut to their chunk's
    length, prompts read once), is the bare base model's log-prob of every policy token."""
    policy, cfg = make_policy(mode, randomize=0.02, lora_dropout=0.5)
    prompts = prompts_for(policy, 4, seed=3, group=3)
    out = sampled(policy, cfg, prompts)
    parts = dart.micro_batches(out, 4)
    assert len({len(p) for p in prompts}) > 1  # left padding is exercised
    assert (out.attention_mask[:, out.prompt_len:].bool() & ~out.written_by_policy).any()  # observations inserted
    assert len(set(out.attention_mask[:, out.prompt_len:].sum(-1).tolist())) > 1  # rows finished at different steps
    assert len({part.length for part in parts}) > 1  # micro-batches of different lengths
    with torch.no_grad():
        logp, _ = dart.response_logprobs(policy, out.ids, out.attention_mask, out.prompt_len, 1.0)
        logits = routed(policy, out.ids, out.attention_mask)
        with dart.lora_dropout_on(policy.model):
            dropped, _ = dart.response_logprobs(policy, out.ids, out.attention_mask, out.prompt_len, 1.0)
    ref = dart.reference_logprobs(policy, out, parts, 1.0)
    of_response = lambda logits: torch.log_softmax(logits[:, out.prompt_len - 1:-1], -1).gather(
        -1, out.ids[:, out.prompt_len:, None]).squeeze(-1)
    plain = of_response(logits)
    bare = of_response(bare_logits(cfg, out.ids, out.attention_mask, dart.position_ids(out.attention_mask)))
    on, real = out.written_by_policy, out.attention_mask.bool()
    assert torch.allclose(logp[on], out.logprobs[on], atol=1e-4) and torch.allclose(logp[on], plain[on], atol=1e-4)
    assert not torch.allclose(dropped[on], out.logprobs[on], atol=1e-3)  # in an update, dropout acts
    assert torch.equal(out.roles[real], dart.token_roles(out.ids, policy.special.spans)[real])
    assert torch.allclose(ref[on], bare[on], atol=1e-4)
    assert not torch.allclose(ref[on], out.logprobs[on], atol=1e-3)  # not the adapted policy's


def assert_limits_hold(policy, out, cfg):
    assert out.written_by_policy.shape[1] <= cfg.max_new_tokens and max(out.call_counts) <= cfg.max_tool_calls
    for row in range(len(out.ids)):
        real = out.attention_mask[row, out.prompt_len:].bool()
        tokens, by_policy = out.ids[row, out.prompt_len:][real].tolist(), out.written_by_policy[row][real].tolist()
        for start, (token, written) in enumerate(zip(tokens, by_policy)):
            if token == policy.special.obs and not written:  # an observation the environment inserted
                rest = tokens[start + 1:]
                length = rest.index(policy.special.obs_end) if policy.special.obs_end in rest else len(rest)
                assert length <= cfg.max_obs_tokens and not any(by_policy[start:start + length + 2])


def random_policy(cfg):
    """An untrained model with the tiny tokenizer: it writes anything, tags included."""
    tok = dart.build_tokenizer(cfg, WORLD)
    torch.manual_seed(0)
    model = dart.new_tiny_model(dataclasses.replace(cfg, tiny_dim=32, tiny_layers=1, tiny_heads=2), tok).eval()
    routing = dart.attach_dart(model, cfg.lora_rank, cfg.alpha, cfg.targets.split(","), cfg.mode)
    return dart.Policy(model, tok, dart.special_ids(tok), routing, "cpu")


@pytest.mark.parametrize("source", ["random model", "tiny model at temperature 5"])
def test_garbage_policies_neither_crash_nor_break_limits(make_policy, cfg_factory, source):
    """Policies that write anything, from the first step: RL steps stay finite, the token, call,
    argument and observation limits hold, and the garbage reaches the tools as error observations."""
    cfg = cfg_factory(max_new_tokens=40, max_tool_calls=2, max_obs_tokens=6, max_arg_tokens=8)
    if source == "random model":
        policy = random_policy(cfg)
    else:
        policy, _ = make_policy("dart", randomize=0.05)
        cfg.temperature = 5.0
    optimizer = dart.make_optimizer(policy, cfg)
    errors = 0
    for step in range(4):
        metrics, _ = dart.rl_step(policy, optimizer, REGISTRY, WORLD, cfg, step)
        assert math.isfinite(metrics["loss"])
        out = sampled(policy, cfg, prompts_for(policy, 8, seed=step), seed=step, temperature=cfg.temperature)
        assert_limits_hold(policy, out, cfg)
        errors += sum(out.error_counts)
    assert errors > 0


# ---------------------------------------------------------------------------
# the update: the loss is the same however it is cut, in whatever precision it runs


def test_micro_batching_does_not_change_the_gradient(make_policy):
    grads = []
    for micro_batch in (64, 3):  # 3 splits the groups of 2 and cuts each micro-batch to its own length
        policy, cfg = make_policy("dart", randomize=0.02, micro_batch=micro_batch, loss_agg="seq_mean")
        batch = sampled(policy, cfg, prompts_for(policy, 4, seed=8, group=2))
        dart.grpo_update(policy, dart.make_optimizer(policy, cfg), batch, torch.linspace(-1, 1, 8), cfg)
        grads.append([p.grad.clone() for p in dart.trainable(policy.model)])
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-8) for a, b in zip(*grads))


def test_equal_rewards_change_nothing_and_a_non_finite_loss_skips_the_step(make_policy):
    """A group with equal rewards has zero advantages, a zero loss and moves nothing; a NaN in the
    loss skips the optimizer step, leaves the adapters as they were, and training goes on."""
    policy, cfg = make_policy("dart", randomize=0.01, kl_beta=0.0)
    batch = sampled(policy, cfg, prompts_for(policy, 8, seed=1))
    optimizer = dart.make_optimizer(policy, cfg)
    before = dart.adapter_state(policy.model)
    unchanged = lambda: all(torch.equal(before[k], v) for k, v in dart.adapter_state(policy.model).items())
    advantages = dart.group_advantages(torch.ones(2, 4)).flatten()  # all zero (test_group_advantages)
    metrics = dart.grpo_update(policy, optimizer, batch, advantages, cfg)
    assert metrics["loss"] == 0.0 and metrics["skipped"] == 0 and unchanged()
    advantages = torch.ones(8)
    advantages[int(batch.written_by_policy.any(-1).nonzero()[0])] = float("nan")  # poison a row that carries loss
    assert dart.grpo_update(policy, optimizer, batch, advantages, cfg)["skipped"] == 1 and unchanged()
    assert dart.grpo_update(policy, optimizer, batch, torch.ones(8), cfg)["skipped"] == 0 and not unchanged()


def frozen_linears(model):
    return [m for m in model.modules() if isinstance(m, torch.nn.Linear) and not m.weight.requires_grad]


def test_update_precision_casts_frozen_weights_once_with_autocasts_numbers(make_policy, monkeypatch):
    """Sampling in float32, the update in bfloat16: the frozen linear weights held in bfloat16 for
    the whole update give exactly the adapters that autocast's cast in every forward gives, and
    are float32 again afterwards. The embedding table keeps its precision; the output layer tied
    to it gets a bfloat16 copy of its own for the update, and is tied again after it."""
    policy, _ = make_policy("dart")
    model, embedding = policy.model, policy.model.get_input_embeddings().weight
    assert model.get_output_embeddings().weight is embedding  # the tiny model ties them
    policy.train_dtype = torch.bfloat16
    with dart.update_precision(policy):
        assert {m.weight.dtype for m in frozen_linears(model)} == {torch.bfloat16}  # the output layer too
        assert model.get_input_embeddings().weight is embedding and embedding.dtype == torch.float32
    assert {m.weight.dtype for m in frozen_linears(model)} == {torch.float32}
    assert model.get_output_embeddings().weight is embedding
    after = []
    for cast_once in (True, False):
        if not cast_once:  # autocast casts every time
            monkeypatch.setattr(dart, "hold_frozen_linears", lambda model, dtype: (lambda: None))
        policy, cfg = make_policy("dart", randomize=0.02, train_dtype="bfloat16", micro_batch=3)
        batch = sampled(policy, cfg, prompts_for(policy, 4, seed=8, group=2))
        before = dart.adapter_state(policy.model)
        dart.grpo_update(policy, dart.make_optimizer(policy, cfg), batch, torch.linspace(-1, 1, 8), cfg)
        after.append(dart.adapter_state(policy.model))
        assert {p.dtype for p in policy.model.parameters()} == {torch.float32}
    assert any(not torch.equal(before[k], after[0][k]) for k in before)  # the update did move the adapters
    assert all(torch.equal(after[0][k], after[1][k]) for k in before)


def test_sampling_precision_holds_the_frozen_weights_in_it(make_policy, monkeypatch):
    """--dtype=bfloat16 (auto on a GPU that computes it natively): the frozen linear weights are held
    in bfloat16 from loading on, and give exactly the logits of float32 weights that autocast casts
    in every forward; the embedding table stays float32, and an update in the same precision casts
    nothing more. auto is bfloat16 only on a GPU that computes it natively."""
    held, cfg = make_policy("dart", randomize=0.02, dtype="bfloat16")
    assert {m.weight.dtype for m in frozen_linears(held.model)} == {torch.bfloat16}
    assert held.model.get_input_embeddings().weight.dtype == torch.float32
    casts = []
    monkeypatch.setattr(dart, "hold_frozen_linears", lambda model, dtype: casts.append(dtype) or (lambda: None))
    with dart.update_precision(held):
        assert casts == []
    cast_each_time, _ = make_policy("dart", randomize=0.02, dtype="bfloat16")
    assert {m.weight.dtype for m in frozen_linears(cast_each_time.model)} == {torch.float32}
    ids, attention, position, roles = batch_of(held)
    with torch.no_grad():
        assert torch.equal(routed(held, ids, attention, position, roles),
                           routed(cast_each_time, ids, attention, position, roles))
    assert dart.autocast_dtypes(dart.Config(), "cpu") == (None, None)
    for native, expected in ((True, torch.bfloat16), (False, None)):  # False: a T4, V100 or Turing laptop
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: native or
                            including_emulation)
        assert dart.autocast_dtypes(dart.Config(), "cuda") == (expected, expected)
    assert dart.autocast_dtypes(dart.Config(train_dtype="bfloat16"), "cpu") == (None, torch.bfloat16)


def count_reads(monkeypatch):
    """Counts, per dart.py function, the reads of tensor values into Python. On a GPU each is a
    sync: the host waits until the device has finished everything queued before it."""
    import sys
    reads = Counter()
    for name in ("item", "tolist", "nonzero", "__bool__", "__int__", "__float__"):
        method = getattr(torch.Tensor, name)

        def counted(self, *args, _method=method, **kwargs):
            frame = sys._getframe(1)
            while frame.f_code.co_name.startswith("<") and frame.f_back:  # a comprehension: its function
                frame = frame.f_back
            if frame.f_code.co_filename == dart.__file__:
                reads[frame.f_code.co_name] += 1
            return _method(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, counted)
    return reads


def test_rollout_and_update_read_the_device_once_per_step(make_policy, monkeypatch):
    """What a GPU would pay for, checked on the CPU: the engine reads the device once per decode step
    (the sampled tokens), plus the finished batch at the end; the update plans its micro-batches from
    two reads before it starts, then reads once per pass (is the loss finite?), never inside its loop."""
    policy, cfg = make_policy("dart", randomize=0.02, micro_batch=3)
    prompts = prompts_for(policy, 3, seed=2, group=3)
    reads = count_reads(monkeypatch)
    batch = sampled(policy, cfg, prompts)
    assert len(set(batch.attention_mask[:, batch.prompt_len:].sum(-1).tolist())) > 1  # rows finished apart
    assert dict(reads) == {"rollout": batch.written_by_policy.shape[1] + 2}
    reads.clear()
    for passes in (1, 2):
        cfg.updates_per_batch = passes
        dart.grpo_update(policy, dart.make_optimizer(policy, cfg), batch, torch.linspace(-1, 1, 9), cfg)
        assert reads.pop("grpo_update") == passes and reads.pop("micro_batches") == 2
        assert set(reads) <= {"metrics"}  # the log, read after the update's work is done
        reads.clear()


@needs_cuda
@pytest.mark.parametrize("mode", dart.MODES)
def test_gpu_rollout_logprobs_agree_with_training_in_bfloat16(make_policy, mode):
    """On a GPU in bfloat16 the engine's log-probs agree with the training forward's to bfloat16's
    rounding (a one-token decode step and a whole-sequence forward run different kernels, so not to
    1e-4 as in float32), and both route every position alike."""
    policy, cfg = make_policy(mode, randomize=0.02, device="cuda", dtype="bfloat16")
    out = sampled(policy, cfg, prompts_for(policy, 4, seed=3, group=3))
    with torch.no_grad(), dart.update_precision(policy):
        logp, _ = dart.response_logprobs(policy, out.ids, out.attention_mask, out.prompt_len, 1.0)
    gap = (logp - out.logprobs)[out.written_by_policy].abs()
    assert gap.mean() < 0.05 and gap.max() < 1.0, (gap.mean(), gap.max())
    assert torch.equal(out.roles[out.attention_mask.bool()],
                       dart.token_roles(out.ids, policy.special.spans)[out.attention_mask.bool()])


# ---------------------------------------------------------------------------
# the training loop: runs that learn, reproduce, resume, warn and report; its files


def gold_token_probabilities(policy, tasks):
    """Per skill, the teacher-forced probabilities of the gold token at the points where the demonstrator's slips in
    that skill leave the gold trajectory (the first token where the two differ), read in one batched forward."""
    points = []
    for task in tasks:
        prompt = dart.prompt_ids(policy.tok, task.question)
        gold, _ = dart.trajectory_ids(policy.tok, policy.special, task.trajectory, 24)
        for skill, _, slip in task.slips:
            wrong, _ = dart.trajectory_ids(policy.tok, policy.special, slip, 24)
            where = next(i for i, (a, b) in enumerate(zip(gold, wrong)) if a != b)
            points.append((skill, prompt + gold[:where], gold[where]))
    ids, attention = dart.pad_sequences([p[1] for p in points], policy.special.pad, "left", policy.device)
    with torch.no_grad():
        probs = torch.softmax(routed(policy, ids, attention)[:, -1].float(), -1)
    right = probs[torch.arange(len(points)), torch.tensor([p[2] for p in points])].tolist()
    return {skill: [p for (s, _, _), p in zip(points, right) if s == skill] for skill in toy_tasks.SKILL_ROLES}


def short_run(cfg_factory, tmp_path, measure, **overrides):
    """Ten GRPO steps at the constant, higher rate that learns fastest (the default schedule is for 80 steps). Returns
    `measure` of the gold token probabilities on 120 test questions before and after them, and the run directory."""
    from safetensors.torch import load_file
    cfg = cfg_factory(steps=10, questions_per_step=8, group_size=8, lr=2e-3, lr_schedule="constant", warmup_steps=0,
                      eval_every=5, out=str(tmp_path / "run"), **overrides)
    run_dir = dart.train(cfg, report=False)
    policy, tasks = dart.load_policy(cfg), toy_tasks.test_set(WORLD, 30)
    before = measure(gold_token_probabilities(policy, tasks))
    dart.load_trainable(policy.model, load_file(os.path.join(run_dir, "adapters.safetensors")))
    return before, measure(gold_token_probabilities(policy, tasks)), run_dir


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_cuda)])
def test_short_run_learns(cfg_factory, tmp_path, device):
    """Ten steps of DART raise the probability of the right choice where the demonstrator errs (the
    mean over its four kinds of decision; on a GPU too, in bfloat16 where it computes it natively),
    and the run logs every step and evaluates at its start, middle and end."""
    mean_over_skills = lambda probs: np.mean([np.mean(p) for p in probs.values()])
    before, after, run_dir = short_run(cfg_factory, tmp_path, mean_over_skills, device=device)
    assert after >= before + 0.02, (before, after)
    records = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    assert [r["step"] for r in records] == list(range(11))
    assert [r["step"] for r in records if "test_acc" in r] == [0, 5, 10]


def test_a_tool_only_run_learns_the_tool_calls(cfg_factory, tmp_path):
    """Ten tool_only steps (how leas.py trains M_Tool) raise the probability of the right key or
    expression where the demonstrator writes a wrong one, so the tool adapter alone has a skill to
    learn. The decision to call a tool, which tool_only does not train, moves less than half as much
    (its one adapter acts there too, but no loss reaches it from there)."""
    by_role = lambda probs: {"tool": np.mean(probs["key"] + probs["expression"]), "call": np.mean(probs["call"])}
    before, after, _ = short_run(cfg_factory, tmp_path, by_role, mode="tool_only")
    gain = after["tool"] - before["tool"]
    assert gain >= 0.03 and abs(after["call"] - before["call"]) < gain / 2, (before, after)


def run_files(run_dir):
    from safetensors.torch import load_file
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return f.read(), load_file(os.path.join(run_dir, "adapters.safetensors"))


SHORT = dict(steps=4, save_every=2, eval_every=2, questions_per_step=2)


def test_a_run_is_reproduced_by_its_seed_and_by_a_resume_after_a_kill(cfg_factory, tmp_path, monkeypatch):
    """A run with the same seed, killed during step 3 and resumed from the command line (its
    checkpoint was written after step 1), writes the same metrics and adapters, bit for bit."""
    straight = run_files(dart.train(cfg_factory(out=str(tmp_path / "a"), **SHORT), report=False))
    cut = str(tmp_path / "cut")
    real_step = dart.rl_step

    def killed_during_step_3(policy, optimizer, registry, world, cfg, step):
        if step == 3:
            raise KeyboardInterrupt
        return real_step(policy, optimizer, registry, world, cfg, step)

    monkeypatch.setattr(dart, "rl_step", killed_during_step_3)
    with pytest.raises(KeyboardInterrupt):
        dart.train(cfg_factory(out=cut, **SHORT), report=False)
    monkeypatch.undo()
    assert not os.path.exists(os.path.join(cut, "results.md"))
    dart.main([f"--resume={cut}"])  # the command line a user would type
    resumed = run_files(cut)
    assert resumed[0] == straight[0] and all(torch.equal(resumed[1][k], straight[1][k]) for k in straight[1])


def test_a_resumed_optimizer_state_lives_where_a_fresh_ones_does(make_policy, tmp_path, monkeypatch):
    """AdamW keeps its step counts on the host; a checkpoint is read onto the CPU and the optimizer
    moves the rest to the adapters' device, so a resumed run's state is laid out as a fresh one's
    (loaded straight onto a GPU, every optimizer step would sync on each step count)."""
    policy, cfg = make_policy("dart", randomize=0.02)
    fresh = dart.make_optimizer(policy, cfg)
    batch = sampled(policy, cfg, prompts_for(policy, 2, seed=1, group=2))
    dart.grpo_update(policy, fresh, batch, torch.linspace(-1, 1, 4), cfg)
    saved_run(policy, cfg, tmp_path / "run", fresh)
    locations = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: locations.append(k.get("map_location")) or real_load(*a, **k))
    resumed = dart.make_optimizer(policy, cfg)
    assert dart.load_checkpoint(cfg.out, policy, resumed, cfg) == 1 and locations == ["cpu"]
    layout = lambda opt: [(k, v.device, v.dtype) for s in opt.state.values() for k, v in sorted(s.items())]
    assert layout(resumed) == layout(fresh) and layout(fresh)


def test_the_recorded_base_serves_resume_and_export_and_is_rebuilt_when_gone(cfg_factory, tmp_path, monkeypatch):
    """config.json records the cached base a run trained on: --export_peft, --resume and the reuse of an
    unfinished run use it even when today's settings would name another one (as the warm-start dtype
    does on another device), and a command naming another is refused; --resume refuses --steps below
    its checkpoint's. Once the base is deleted, --export_peft still writes the adapters (it needs no
    base), a finished run is still reused, and --resume rebuilds the base where it was."""
    cache = tmp_path / "cache"
    shutil.copytree(cfg_factory().cache_dir, cache)
    run = dart.train(cfg_factory(out=str(tmp_path / "run"), cache_dir=str(cache), lr_schedule="constant", **SHORT),
                     report=False)
    recorded = json.load(open(os.path.join(run, "config.json")))["cached_base"]
    with monkeypatch.context() as elsewhere:
        elsewhere.setattr(dart, "base_path", lambda cfg: str(tmp_path / "another-base"))
        elsewhere.setattr(dart, "build_base", lambda cfg, device: pytest.fail("built another base"))
        dart.main([f"--export_peft={run}"])
        assert json.load(open(os.path.join(run, "peft", "reasoning", "adapter_config.json")))[
            "base_model_name_or_path"] == recorded
        dart.main([f"--resume={run}", "--steps=5"])  # a constant learning rate lets a run go on
        metrics = os.path.join(run, "metrics.jsonl")
        assert [json.loads(line)["step"] for line in open(metrics)] == list(range(6))
        assert "at step 5" in one_line_exit(dart.main, [f"--resume={run}", "--steps=4"])  # shorter than done
        assert "--cached_base would change" in one_line_exit(dart.main, [f"--resume={run}", f"--cached_base={cache}"])
        lines = open(metrics).readlines()
        open(metrics, "w").writelines(lines[:-1])  # as if it had stopped before its last evaluation
        unfinished = dataclasses.replace(dart.saved_config(run), cached_base="")  # as --compare and leas.py pass it
        dart.train_or_reuse(unfinished)  # resumed on its own base
        assert [json.loads(line)["step"] for line in open(metrics)] == list(range(6))
        with pytest.raises(dart.DartError, match="--cached_base="):
            dart.train_or_reuse(dataclasses.replace(unfinished, cached_base=str(cache)))
    kept = shutil.move(recorded, tmp_path / "kept-base")
    dart.main([f"--export_peft={run}"])
    dart.train_or_reuse(dart.saved_config(run))  # a finished run: reused, not retrained
    assert not os.path.exists(recorded)
    rebuilt = []

    def build_again(cfg, device):  # stands in for the minutes of the warm start: the base as it was
        from transformers import AutoModelForCausalLM, AutoTokenizer
        rebuilt.append(cfg.cached_base)
        return AutoModelForCausalLM.from_pretrained(kept), AutoTokenizer.from_pretrained(kept)
    monkeypatch.setattr(dart, "build_base", build_again)
    dart.main([f"--resume={run}"])
    assert rebuilt == [recorded] and os.path.isfile(os.path.join(recorded, "base.json"))


def test_a_run_folder_has_one_writer(tmp_path, monkeypatch):
    """A command on a run folder that a live process has claimed is refused in one line naming it,
    before anything is built; a dead process's claim is taken over. A default --out holds the pid:
    two runs started in the same second never share a folder."""
    import subprocess
    monkeypatch.chdir(tmp_path)
    nowhere = f"--model={tmp_path / 'no-such-model'}"  # a command that passes the claim stops at the model
    pathlib.Path("run.lock").write_text("1 (python dart.py --compare)")  # pid 1 is always running
    assert "run is in use by process 1 (python dart.py --compare)" in one_line_exit(dart.main, ["--out=run", nowhere])
    gone = subprocess.Popen(["true"])
    gone.wait()
    pathlib.Path("run.lock").write_text(f"{gone.pid} (python dart.py)")
    assert "no-such-model" in one_line_exit(dart.main, ["--out=run", nowhere])
    assert pathlib.Path("run.lock").read_text().startswith(f"{os.getpid()} (")  # held until this process exits
    assert "no-such-model" in one_line_exit(dart.main, [nowhere])
    assert [p.name for p in pathlib.Path("runs").iterdir()][0].endswith(f"-dart-s0-{os.getpid()}.lock")


def test_format_health_and_the_no_signal_warning(cfg_factory, tmp_path, capsys):
    """A policy that never answers (two new tokens: no room for <answer>) gets a one-line warning
    after three steps of zero-variance groups; one step with a group that varies is enough signal."""
    mute = dart.train(cfg_factory(out=str(tmp_path / "mute"), steps=3, max_new_tokens=2, questions_per_step=2,
                                  eval_per_family=1), report=False)
    printed = capsys.readouterr().out
    assert printed.count("warning: no learning signal") == 1 and "--warm_steps" in printed
    assert "0% of answers well-formed" in printed  # the first evaluation's format health
    records = [json.loads(line) for line in open(os.path.join(mute, "metrics.jsonl"))]
    assert all(r["zero_variance_groups"] == 1 and r["answered"] == 0 for r in records if "reward" in r)
    assert records[0]["test_answered"] == 0 and records[0]["test_called_tool"] == 0
    step = {"zero_variance_groups": 1.0, "accuracy": 1.0, "answered": 1.0}
    assert "too easy" in dart.no_signal_warning([step] * 3)  # every rollout right
    assert dart.no_signal_warning([step, {**step, "zero_variance_groups": 0.5}, step]) is None  # some signal
    assert "last 3 steps" in dart.no_signal_warning([{**step, "zero_variance_groups": 0.5}] + [step] * 3)  # lost later


def test_the_report_shows_a_multihop_trajectory_and_the_demonstrators_wrong_call(make_policy, capsys, monkeypatch):
    """The end-of-run report prints the results table and reward curve it is given, then a multihop
    test question answered greedily, its gold answer and verdict, and the demonstrator's wrong
    tool call for it; from a split with no such question, any multihop question, without that line.
    A policy that never calls a tool has no share of valid calls: n/a, not 100%."""
    for task in sample_tasks(400, split="test", seed=10):  # the wrong call is the demonstrator's, and wrong
        slip = dart.slipped_call(task)
        if any(toy_tasks.SKILL_ROLES[skill] == "tool" for skill, _, _ in task.slips):
            assert slip and slip not in task.trajectory and any(slip in text for _, _, text in task.slips)
        else:
            assert slip is None
    policy, cfg = make_policy("dart")
    test = toy_tasks.test_set(WORLD, 10)
    plain = [t for t in test if dart.slipped_call(t) is None]
    assert any(t.family == "multihop" for t in plain)
    for split in (test, plain):
        shown = dart.showcase(policy, REGISTRY, split, cfg)
        example, judged = shown[0], shown[3]
        with monkeypatch.context() as once:  # the report shows what showcase chose, without a second rollout
            once.setattr(dart, "showcase", lambda *args: shown)
            dart.print_report("RUN", "TABLE", "CURVE", policy, REGISTRY, split, cfg)
        out = capsys.readouterr().out
        assert out.startswith("\nTABLE\n\ntrain reward  CURVE\n") and out.endswith("run directory: RUN\n")
        assert example.family == "multihop" and f"{example.question}\n" in out
        assert f"gold: {example.answer} ({judged})" in out and "\x1b[" not in out  # no colour off a terminal
        slip = dart.slipped_call(example)
        assert (split is test) == bool(slip) and (f"often writes {slip} here" in out) == bool(slip)
    mute = dart.Policy(ScriptedModel(policy.tok, policy.special, ["No tool. <answer>7</answer>"] * 4), policy.tok,
                       policy.special, dart.Routing("dart", 2, 4.0, "cpu"), "cpu")
    tasks = [sample_tasks(1, "test", family=family)[0] for family in toy_tasks.FAMILIES]
    metrics = {f"test_{k}": v for k, v in dart.evaluate(mute, REGISTRY, tasks, cfg).items()}
    assert metrics["test_tool_calls"] == 0 and metrics["test_valid_calls"] is None
    assert re.search(r"\| valid tool calls +\| +n/a \| +n/a \|", dart.results_table(metrics, metrics, WORLD))
    assert dart.mean_std([None], 100) == "n/a" and dart.mean_std([0.5, None, 1.0], 100) == "75±35"


def test_paired_differences_the_sweep_table_and_its_chart():
    """The paired bootstrap detects a difference every seed shows, not one a seed contradicts; the sweep's table:
    a row per rank, each mode's mean±std and dart's paired differences; the chart: each interval, its mean, zero."""
    ones, zeros = np.ones((3, 40)), np.zeros((3, 40))
    assert dart.paired_difference(ones, zeros) == (100.0, (100.0, 100.0))
    rng = np.random.default_rng(0)
    a, b = np.zeros((3, 200)), np.zeros((3, 200))
    for row in a:
        row[rng.choice(200, 20, replace=False)] = 1  # 10 points better on every seed: detected
    mean, (lo, hi) = dart.paired_difference(a, b)
    assert mean == 10 and 0 < lo < 10 < hi
    runs = lambda rows: [{"final": (e := {"test_acc": float(np.mean(r)), "test_correct": list(r)}), "evals": [e]}
                         for r in rows]
    line = lambda: dart.difference_line({"dart": runs(a), "joint": runs(b)}, "dart", "joint")
    assert line().endswith("dart is better at this budget")
    a[2], b[2, rng.choice(200, 40, replace=False)] = 0, 1  # a third seed 20 points worse: no finding
    mean, (lo, hi) = dart.paired_difference(a, b)
    assert abs(mean) < 1e-9 and lo < 0 < hi
    assert line().endswith("no detectable difference at this budget")
    halves = np.tile([1, 0], (2, 5))
    rows = [(1, {"joint": runs(halves), "dart": runs(ones[:2, :10])}, -1),
            (8, {"joint": runs(ones), "dart": runs(ones)}, -1)]
    table = dart.differences_table("LoRA rank r", rows, ["joint", "dart"], ["joint"]).replace(" ", "").splitlines()
    mean, (lo, hi) = dart.paired_difference(ones[:2, :10], halves)
    assert table[0] == "|LoRArankr|joint|dart|dart-joint|" and lo > 0
    assert table[2] == f"|1|50±0|100±0|+50.0[{lo:+.1f},{hi:+.1f}]|" and table[3] == "|8|100±0|100±0|+0.0[+0.0,+0.0]|"
    chart = dart.interval_chart([("r=1", 5.0, (1.0, 9.0)), ("r=8", -1.0, (-3.0, 1.0))], width=13).splitlines()
    assert chart[0] == "     r=1    |[---*---]  +5.0 [+1.0, +9.0]"  # one column a point, from -3 to +9
    assert chart[1] == "     r=8 [-*|]          -1.0 [-3.0, +1.0]" and chart[2].split() == ["-3", "+9"]


def test_the_runs_folder_sees_resolved_settings_the_world_and_the_tools(cfg_factory, monkeypatch):
    """`auto` is hashed and matched as what it means here, so a GPU run (bfloat16) and a CPU run
    (float32) never pass for each other; the dial and the text the world's tasks and tools produce
    enter the hash, so runs of another world are not reused."""
    auto = cfg_factory(device="auto", dtype="auto", train_dtype="auto", warm_weights="auto")
    here = dart.resolved(auto)
    assert torch.cuda.is_available() or (here.device, here.dtype, here.train_dtype, here.warm_weights) == (
        "cpu", "float32", "float32", "all")
    assert dart.runs_folder(auto) == dart.runs_folder(here) and dart.differing_setting(
        here, dart.resolved(auto), dart.NOT_THE_RUN) is None
    others = [dart.runs_folder(here), dart.runs_folder(dataclasses.replace(auto, conflict=0.5)),
              dart.runs_folder(dataclasses.replace(auto, conflict=0.5, conflict_sign="aligned"))]
    monkeypatch.setattr(toy_tasks, "GIVE_UP_TEXT", "I give up. <answer>0</answer>")  # toy_tasks.py changed
    others.append(dart.runs_folder(auto))
    assert len(set(others)) == 4


def test_compare_sweeps_ranks_and_reuses_finished_runs(cfg_factory, tmp_path, monkeypatch, capsys):
    """--compare --ranks trains each (rank, mode, seed) once, with alpha/r kept (--alpha itself at --lora_rank),
    prints a row per rank, the chart and the learning curves (at step 0 the same model: 0); the same command again
    trains nothing, and one with another mode trains only it and writes a report of its own beside the first."""
    cfg = cfg_factory(compare=True, ranks="1,3", modes="joint,dart", seeds=1, steps=1, eval_every=1, lora_rank=3,
                      alpha=0.9, eval_per_family=1, questions_per_step=1, out=str(tmp_path / "sweep"))
    dart.compare_modes(cfg)
    printed = capsys.readouterr().out
    assert re.search(r"\| LoRA rank r \| +joint \| +dart \| +dart - joint \|", printed)
    assert "dart - joint against the LoRA rank" in printed
    assert re.search(r"\| RL step \| +dart - joint \|\n\|[-|:]+\|\n\| 0 +\| \+0\.0 \[\+0\.0, \+0\.0\] \|\n\| 1 ",
                     printed)
    alpha = lambda rank: json.load(open(tmp_path / "sweep" / f"r{rank}" / "dart-s0" / "config.json"))["alpha"]
    assert (alpha(3), alpha(1)) == (0.9, 0.3)  # alpha/r kept, and --alpha exact (not 0.8999999999999999)
    monkeypatch.setattr(dart, "train", lambda run, report=True: pytest.fail("retrained"))
    summary = dart.run_summary

    def planted(run):  # dart right on the first test question alone, joint on none
        r = summary(run)
        r["evals"][-1]["test_correct"] = [int(i == 0 and os.path.basename(run).startswith("dart")) for i in range(4)]
        return r
    monkeypatch.setattr(dart, "run_summary", planted)
    dart.compare_modes(cfg)
    printed = capsys.readouterr().out
    table = printed.split("per task family")[1].split("\n\n")[1]  # rank 1's: one question a family, one seed
    first, *others = [t.family for t in toy_tasks.test_set(dart.world_of(cfg), 1)]
    assert re.findall(r"^\| (\w+) +\| +([+-][\d.]+) \[", table, re.M) == [(first, "+100.0")] + [
        (f, "+0.0") for f in others] and printed.count("reusing") == 4
    monkeypatch.undo()
    dart.compare_modes(dataclasses.replace(cfg, ranks="1", modes="joint,dart,joint2r"))
    assert capsys.readouterr().out.count("reusing") == 2
    reports = sorted(p.name for p in (tmp_path / "sweep").glob("compare-*"))  # the second report kept the first
    assert reports == ["compare-r1-3-joint-dart-1seeds.json", "compare-r1-3-joint-dart-1seeds.md",
                       "compare-r1-joint-dart-joint2r-1seeds.json", "compare-r1-joint-dart-joint2r-1seeds.md"]


def test_bench_times_every_mode_and_the_engine(cfg_factory, capsys):
    """--bench runs to its end on a small batch and prints a positive time for each mode's update,
    the update ratios, and the engine's speed against generate()'s."""
    dart.benchmark(cfg_factory(questions_per_step=2, group_size=2, max_new_tokens=16), repeats=1)
    printed = capsys.readouterr().out
    seconds = dict(re.findall(r"^  (joint2r|dart|two_agent) +([\d.]+) s$", printed, re.M))
    assert set(seconds) == {"joint2r", "dart", "two_agent"} and all(float(s) > 0 for s in seconds.values())
    ratios = re.findall(r"(?:= |ratio )([\d.]+)", printed)  # dart / joint2r, two_agent / dart, engine / generate
    assert len(ratios) == 3 and all(float(r) > 0 for r in ratios)


def test_no_deprecation_warnings_from_the_libraries(make_policy, cfg_factory, tmp_path):
    """A run (rollouts, update, evaluation) and model.generate warn of nothing deprecated."""
    import warnings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dart.train(cfg_factory(out=str(tmp_path / "run"), steps=1, questions_per_step=2, eval_per_family=1),
                   report=False)
        policy, _ = make_policy("dart")
        ids = torch.tensor([dart.prompt_ids(policy.tok, "What is 2 plus 3?")])
        policy.routing.route(torch.tensor(R))  # one gate for every token
        policy.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False,
                              pad_token_id=policy.special.pad)
    deprecated = [str(w.message) for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))]
    assert deprecated == []


# ---------------------------------------------------------------------------
# the models: a --model's warm start (all weights, or a LoRA merged after), its cache, its tags


@pytest.fixture(scope="session")
def small_hf_folder(tmp_path_factory):
    """A small random HF model of the kind users bring: a Llama config, a byte-level BPE tokenizer
    (PreTrainedTokenizerFast) with a chat template and none of the tags, saved as an HF folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(toy_tasks.tokenizer_corpus(WORLD, n=300), trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|pad|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|pad|>")
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                         "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=1024, eos_token_id=tok.eos_token_id,
                                         pad_token_id=tok.pad_token_id))
    folder = tmp_path_factory.mktemp("small-hf") / "model"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_warm_start_of_an_hf_model_teaches_the_format_and_is_cached(small_hf_folder, cfg_factory, monkeypatch):
    """The supervised warm start of a --model (here the small random HF model) runs, is cached under runs/cache and
    reused, and afterwards the model writes the tags: it answers in <answer>...</answer>, which the untrained model
    never does. It trains every weight on the CPU and a LoRA on CUDA (the tiny model every weight everywhere); a LoRA
    warm start asked for on the CPU is cached apart, and leaves no adapter behind but the RL's own."""
    cfg = cfg_factory(model=str(small_hf_folder), warm_steps=40, warm_batch=8, warm_lr=3e-3, lora_rank=4)
    tasks = sample_tasks(16, seed=3)

    def answered(policy):
        out = dart.rollout(policy, REGISTRY, [dart.prompt_ids(policy.tok, t.question) for t in tasks], cfg, 0)
        return np.mean([toy_tasks.parse_answer(text) is not None for text in out.texts])

    assert answered(dart.load_policy(dataclasses.replace(cfg, warm_steps=0))) == 0
    warm = dart.load_policy(cfg)
    assert os.path.exists(os.path.join(dart.base_path(cfg), "base.json"))
    assert answered(warm) >= 0.5
    assert dart.warm_weights(cfg, "cuda") == "lora" and dart.warm_weights(cfg, "cpu") == "all"
    assert dart.warm_weights(cfg_factory(), "cuda") == "all"  # the tiny model starts random: all its weights train
    lora = dataclasses.replace(cfg, warm_weights="lora", warm_steps=2)  # two steps: where it lands is what is checked
    assert dart.warm_weights(lora, "cpu") == "lora"
    assert dart.base_path(lora) != dart.base_path(dataclasses.replace(lora, warm_weights=cfg.warm_weights))
    policy = dart.load_policy(lora)
    assert os.path.exists(os.path.join(dart.base_path(lora), "base.json"))
    assert sum(isinstance(m, dart.DartLinear) for m in policy.model.modules()) == 14  # the RL's own, no more
    monkeypatch.setattr(dart, "imitate_demonstrations", lambda *a, **k: pytest.fail("the cached base was not reused"))
    again = dart.load_policy(cfg)
    assert all(torch.equal(a, b) for a, b in zip(warm.model.state_dict().values(), again.model.state_dict().values()))


def tiny_causal_lm(architecture, tok, tied):
    """A random two-layer model of a family users bring: Llama, Qwen2, or Gemma (whose input
    embedding multiplies its rows by sqrt(hidden size) inside the module)."""
    import transformers
    config = getattr(transformers, f"{architecture}Config")(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, tie_word_embeddings=tied)
    torch.manual_seed(0)
    model = getattr(transformers, f"{architecture}ForCausalLM")(config)
    dart.add_tag_tokens(model, tok)
    return model


@pytest.mark.parametrize("architecture", ["Llama", "Qwen2", "Gemma"])
@pytest.mark.parametrize("tied", [True, False])
def test_lora_warm_start_leaves_a_plain_model_that_computes_what_its_trained_copy_did(small_hf_folder, architecture,
                                                                                        tied, monkeypatch):
    """The small-memory warm start trains a LoRA and the tags' rows on a frozen copy, then writes
    them into the float32 model: the plain model left computes what the trained copy did (tied or
    untied embeddings, an embedding that scales its rows or not), only the tags' rows of the
    embeddings changed, and the optimizer was given no parameter of the vocabulary's size."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(small_hf_folder)
    model = tiny_causal_lm(architecture, tok, tied)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    ids = torch.tensor([tok.encode("Look up both. <lookup>Pizu.height</lookup><obs>66</obs><answer>66</answer>",
                                   add_special_tokens=False)])
    trained = {}

    def fake_training(student, tok, params, *args, **kwargs):  # every trainable tensor moves somewhere random
        with torch.no_grad():
            for p in params:
                p.normal_(0, 0.1)
            trained["logits"] = student(input_ids=ids).logits
        trained["shapes"] = [tuple(p.shape) for p in params]
        return student
    monkeypatch.setattr(dart, "imitate_demonstrations", fake_training)
    dart.lora_warm_start(model, tok, dart.Config(model="small"), "cpu", None)
    assert not any(isinstance(m, dart.DartLinear) for m in model.modules())
    assert all(p.dtype == torch.float32 for p in model.parameters())
    vocab_rows = model.get_input_embeddings().weight.shape[0]
    assert (len(dart.format_tags(tools.TOOLS)), 32) in trained["shapes"] and not any(vocab_rows in shape for shape in trained["shapes"])
    torch.testing.assert_close(model(input_ids=ids).logits, trained["logits"], rtol=1e-4, atol=1e-4)
    tag_ids = tok.convert_tokens_to_ids(dart.format_tags(tools.TOOLS))
    others = [i for i in range(len(tok)) if i not in tag_ids]
    for name, p in model.named_parameters():
        if "embed" in name or "lm_head" in name:
            assert torch.equal(p[others], before[name][others]) and not torch.equal(p[tag_ids], before[name][tag_ids])
        elif "norm" not in name and name.endswith("weight"):  # (a LoRA leaves biases as they are)
            assert not torch.equal(p, before[name]), name  # every linear layer got its LoRA merged


def test_a_base_another_process_has_just_cached_is_kept(cfg_factory, tmp_path, monkeypatch):
    """Two processes building one base: the second to finish keeps the first's, which that process may
    be loading, and drops its own."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    ours = dart.base_path(cfg_factory())
    dart.load_base(cfg_factory())
    cfg = cfg_factory(cache_dir=str(tmp_path))
    theirs = dart.base_path(cfg)

    def build_while_another_caches_it(cfg, device):
        shutil.copytree(ours, theirs)
        pathlib.Path(theirs, "theirs").touch()
        return AutoModelForCausalLM.from_pretrained(ours), AutoTokenizer.from_pretrained(ours)
    monkeypatch.setattr(dart, "build_base", build_while_another_caches_it)
    dart.load_base(cfg)
    assert os.listdir(tmp_path) == [os.path.basename(theirs)] and os.path.exists(os.path.join(theirs, "theirs"))


def test_a_model_without_the_target_linears_is_refused_before_its_warm_start(small_hf_folder, tmp_path, monkeypatch):
    """GPT-2 computes with Conv1D, not nn.Linear: a --targets it lacks is refused right after the model
    loads, and the LoRA warm start, which needs q_proj ... down_proj, says to train all weights."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel
    monkeypatch.chdir(tmp_path)
    tok = AutoTokenizer.from_pretrained(small_hf_folder)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=1, n_head=2))
    gpt2.save_pretrained(tmp_path / "gpt2")
    tok.save_pretrained(tmp_path / "gpt2")
    monkeypatch.setattr(dart, "imitate_demonstrations", lambda *a, **k: pytest.fail("the warm start began"))
    message = one_line_exit(dart.main, [f"--model={tmp_path / 'gpt2'}", "--targets=c_attn"])
    assert "no linear layer named c_attn" in message and "lm_head" in message
    dart.add_tag_tokens(gpt2, tok)
    with pytest.raises(dart.DartError, match="--warm_weights=all"):
        dart.lora_warm_start(gpt2, tok, dart.Config(model="gpt2"), "cpu", None)


def test_tags_take_spare_embedding_rows_before_the_matrix_grows(small_hf_folder):
    """A model whose embedding matrix has rows beyond its tokenizer (Qwen2.5: 151,936 for 151,665)
    keeps its size, so that the output layer stays on the GPU's tile sizes; a full one grows by
    exactly the tags. Either way every new tag's row is the mean of its text's pieces."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    for spare in (0, 64):
        tok = AutoTokenizer.from_pretrained(small_hf_folder)
        model = AutoModelForCausalLM.from_pretrained(small_hf_folder)
        model.resize_token_embeddings(len(tok) + spare)
        pieces = {tag: tok.encode(tag, add_special_tokens=False) for tag in dart.format_tags(tools.TOOLS)}
        rows = model.get_input_embeddings().weight.detach().clone()
        dart.add_tag_tokens(model, tok)
        assert model.get_input_embeddings().weight.shape[0] == (len(tok) + spare - len(pieces) if spare else len(tok))
        for tag in pieces:
            assert torch.allclose(model.get_input_embeddings().weight[tok.convert_tokens_to_ids(tag)],
                                  rows[pieces[tag]].mean(0))


@needs_cuda
def test_gpu_warm_start_of_a_half_billion_parameter_model_fits_in_8_gb(small_hf_folder):
    """The warm start on CUDA of a random model with Qwen2.5-0.5B's shapes (494M parameters, a
    151,936-row vocabulary; built from a config, nothing downloaded) peaks under 8 GB of GPU
    memory. The tokenizer is the small test one: the logits have Qwen's width all the same."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM
    tok = AutoTokenizer.from_pretrained(small_hf_folder)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864,
                                         num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                                         tie_word_embeddings=True))
    assert 480e6 < sum(p.numel() for p in model.parameters()) < 500e6
    dart.add_tag_tokens(model, tok)
    cfg = dart.Config(model="qwen2.5-0.5b-shapes", warm_steps=3, device="cuda")
    torch.cuda.reset_peak_memory_stats()
    dart.lora_warm_start(model, tok, cfg, "cuda", torch.bfloat16)
    peak_gb = torch.cuda.max_memory_allocated() / 1e9
    print(f"peak GPU memory of the warm start: {peak_gb:.2f} GB")
    assert peak_gb <= 8, peak_gb


# ---------------------------------------------------------------------------
# the command line: bad input is refused in one line, before anything is built or written


def one_line_exit(main, argv):
    """What a command line prints for bad input: one sentence, no traceback."""
    with pytest.raises(SystemExit) as stop:
        main(argv)
    message = str(stop.value.code)
    assert message.startswith("error: ") and "\n" not in message and "Traceback" not in message
    return message


# one value out of range for every numeric option: refused as the command line is read
BAD_VALUES = {
    "steps": 0, "seed": -1, "lora_rank": 0, "alpha": 0, "lora_dropout": 1.0, "questions_per_step": 0,
    "group_size": 1, "lr": 0, "warmup_steps": -1, "temperature": 0, "clip_eps": 1.5, "kl_beta": -0.1,
    "updates_per_batch": 0, "micro_batch": 0, "max_grad_norm": 0, "format_bonus": 1.0, "max_new_tokens": 0,
    "max_tool_calls": -1, "max_arg_tokens": 0, "max_obs_tokens": 0, "eval_every": 0, "eval_per_family": 0,
    "save_every": 0, "tiny_dim": 0, "tiny_layers": 0, "tiny_heads": 0, "tiny_vocab": 0, "warm_steps": -2,
    "warm_batch": 0, "warm_lr": 0, "warm_seed": -2, "seeds": 0, "samples": 0, "per_family": 0, "bootstrap": 10,
    "grad_questions": 0, "grad_rollouts": 0, "conflict": 1.0,
}


def numeric_options(config_class):
    return {f.name for f in dataclasses.fields(config_class) if f.type in (int, float)}


def test_every_numeric_option_has_a_bad_value_below_and_every_option_has_help(capsys):
    assert set(BAD_VALUES) == numeric_options(dart.Config) | numeric_options(leas.LeasConfig)
    dart.main(["--help"])
    printed = capsys.readouterr().out
    for f in dataclasses.fields(dart.Config):
        line = next(line for line in printed.splitlines() if line.strip().startswith(f"--{f.name}="))
        assert len(line.split(None, 1)) == 2 and f.metadata["help"] in line
    leas.main(["--help"])
    printed = capsys.readouterr().out
    assert all(f"--{f.name}=" in printed for f in dataclasses.fields(leas.LeasConfig))


BAD_COMMAND_LINES = [  # (main, argv, what the one line must say: a regular expression)
    ("dart", ["--stpes=3"], "--steps"),  # an unknown flag names the valid ones
    ("dart", ["-seed=3"], "--seed"),
    ("dart", ["--steps=three"], "int"),
    ("dart", ["--scale_std=maybe"], "bool"),
    ("dart", ["--mode=dartt"], "joint2r"),
    ("dart", ["--steps"], "--steps"),
    ("dart", ["--lr=nan"], "float"),
    ("dart", ["--tiny_dim=190"], "multiple of --tiny_heads"),
    ("dart", ["--tiny_dim=12", "--tiny_heads=4"], "even"),  # heads of size 3: rotary embeddings need even ones
    ("dart", ["--tiny_dim=20", "--tiny_heads=4"], "even"),
    ("dart", ["--targets=q_proj,qproj"], "no linear layer named qproj"),
    ("dart", ["--warm_weights=lora"], "random weights"),
    ("dart", ["--dtype=bfloat16", "--train_dtype=float32"], "bfloat16-rounded"),
    ("dart", ["--compare", "--bench"], "separate commands"),
    ("dart", ["--compare", "--modes=dart,jointt"], "comma-separated list"),
    ("dart", ["--compare", "--ranks=1,x"], "positive integers"),
    ("dart", ["--compare", "--ranks=1,²"], "positive integers"),  # a digit to str.isdigit, not to int()
    ("dart", ["--compare", "--ranks=1,1"], "names 1 twice"),  # one run would count as two seeds
    ("dart", ["--compare", "--modes=joint,dart,dart"], "names dart twice"),
    ("dart", ["--seeds=2"], "option of --compare"),  # a plain run would train one seed
    ("dart", ["--out=a-file"], "is a file"),
    ("dart", ["--resume=."], "not a run directory"),
    ("leas", ["gradient"], "grad"),
    ("leas", ["--sample=4"], "--samples"),  # names leas.py's options and dart.py's
    ("leas", ["--per_family=2", "--grad_questions=7"], "--grad_questions"),
    ("leas", ["--ranks=1,2"], "drop --ranks"),  # options leas.py would ignore
    ("leas", ["--out=elsewhere"], "drop --out"),
    ("leas", ["grad", "--runs=a-file"], "is a file"),
] + [("dart", [f"--device={device}"], f"no {device} device") for device, there in (
    ("cuda", torch.cuda.is_available()), ("mps", torch.backends.mps.is_available())) if not there] + [
    # an out-of-range value names the option, what is allowed, and the value
    ("leas" if option in numeric_options(leas.LeasConfig) else "dart", [f"--{option}={value}"],
     rf"--{option} must be (-1 or )?(at least|above|in \[).*, not {value}") for option, value in BAD_VALUES.items()]


@pytest.mark.parametrize("main, argv, says", BAD_COMMAND_LINES)
def test_a_bad_command_line_is_refused_in_one_line_before_anything_is_built(main, argv, says, tmp_path, monkeypatch):
    """Bad input stops the command at once, in one line that says what is wrong, before any model is
    built or any file written."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a-file").write_text("")

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded for a command line that should have been refused")
    monkeypatch.setattr(dart, "load_base", refuse)
    message = one_line_exit({"dart": dart.main, "leas": leas.main}[main], argv)
    assert re.search(says, message), message
    assert os.listdir(tmp_path) == ["a-file"]


def test_bad_files_are_refused_in_one_line_and_the_run_is_left_as_it_was(cfg_factory, tmp_path, capsys):
    """Empty and corrupt run directories for --resume and --export_peft, a checkpoint of another mode
    or rank or a damaged one, adapters cut short, a damaged log, an --out that holds a run, settings a
    --resume may not change (the test set among them): one line each, and the files of the run stay as
    they were. A kill's half-written last line of a log is dropped, with a note."""
    run = dart.train(cfg_factory(out=str(tmp_path / "run"), steps=1, questions_per_step=1), report=False)
    files = {name: open(os.path.join(run, name), "rb").read() for name in os.listdir(run)}
    (tmp_path / "empty").mkdir()
    broken = tmp_path / "broken"
    broken.mkdir()
    for command in ("--resume", "--export_peft"):
        assert "not a run directory" in one_line_exit(dart.main, [f"{command}={tmp_path / 'empty'}"])
        for content in ("{not json", '{"steps": 3, "no_such_option": 1}', '{"steps": "three"}', '{"steps": 0}'):
            (broken / "config.json").write_text(content)
            assert "config.json" in one_line_exit(dart.main, [f"{command}={broken}"])
    assert "already holds a run" in one_line_exit(dart.main, [f"--out={run}", f"--cache_dir={tmp_path}"])
    assert "--mode would change" in one_line_exit(dart.main, [f"--resume={run}", "--mode=joint"])
    assert "cosine" in one_line_exit(dart.main, [f"--resume={run}", "--steps=5"])  # would reshape the schedule
    assert "--eval_per_family would change" in one_line_exit(dart.main, [f"--resume={run}", "--eval_per_family=3"])
    metrics = os.path.join(run, "metrics.jsonl")
    open(metrics, "a").write('{"step": 1, "te')  # a kill during an append: dropped, and the finished run reused
    dart.train_or_reuse(dart.saved_config(run))
    assert "dropped the half-written last line" in capsys.readouterr().out
    assert dart.run_summary(run)["final"]["step"] == 1
    open(metrics, "w").write('{"step": 0, "te\n' + files["metrics.jsonl"].decode())  # not a kill's: refused
    with pytest.raises(dart.DartError, match="metrics.jsonl is damaged at line 1"):
        dart.run_summary(run)
    open(metrics, "wb").write(files["metrics.jsonl"])
    checkpoint = os.path.join(run, "checkpoint.pt")
    saved = torch.load(io.BytesIO(files["checkpoint.pt"]), weights_only=True)
    other_mode = {**saved, "config": {**saved["config"], "mode": "two_agent"}}  # same shapes: only the config tells
    other_rank = {**saved, "adapters": {k: v[..., :1] for k, v in saved["adapters"].items()}}
    for damage, says in ((files["checkpoint.pt"][:1000], "checkpoint.pt"), (b"", "checkpoint.pt"),
                         (other_mode, "another run"), (other_rank, "shape")):
        if isinstance(damage, dict):
            torch.save(damage, checkpoint)
        else:
            open(checkpoint, "wb").write(damage)
        assert says in one_line_exit(dart.main, [f"--resume={run}"])
    open(checkpoint, "wb").write(files["checkpoint.pt"])
    open(os.path.join(run, "adapters.safetensors"), "wb").write(files["adapters.safetensors"][:-100])  # cut short
    assert "adapters.safetensors" in one_line_exit(dart.main, [f"--export_peft={run}"])
    with pytest.raises(dart.DartError, match="adapters.safetensors"):
        dart.run_summary(run)
    open(os.path.join(run, "adapters.safetensors"), "wb").write(files["adapters.safetensors"])
    assert {name: open(os.path.join(run, name), "rb").read() for name in os.listdir(run)} == files


def test_library_functions_raise_instead_of_exiting(cfg_factory, tmp_path):
    """Copied into another program, nothing calls sys.exit: errors are exceptions, and a failed
    model load leaves no folder behind (only the claim on it, held until the process exits)."""
    with pytest.raises(dart.DartError, match="no such directory"):
        dart.load_policy(cfg_factory(model=str(tmp_path / "no-such-model")))
    assert "no-such-model" in one_line_exit(dart.main, [f"--model={tmp_path / 'no-such-model'}",
                                                        f"--out={tmp_path / 'run'}"])
    garbage = tmp_path / "garbage-model"
    garbage.mkdir()
    (garbage / "config.json").write_text("{not json")
    with pytest.raises(dart.DartError, match="cannot load --model"):
        dart.train(cfg_factory(model=str(garbage), out=str(tmp_path / "run")))
    assert sorted(os.listdir(tmp_path)) == ["garbage-model", "run.lock"]
    with pytest.raises(ValueError, match="no linear layer named"):
        dart.attach_dart(torch.nn.Sequential(torch.nn.Linear(2, 2)), targets=("q_proj",))
    with pytest.raises(dart.DartError, match="unknown option"):
        dart.parse_args(["--stpes=3"])


# ---------------------------------------------------------------------------
# data parallel (torchrun): N processes take exactly one process's step


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rows_of(batch, rows):
    """A share of a batch of rollouts: the rows one process would have rolled out."""
    return dart.Rollout(**{f.name: getattr(batch, f.name)[rows] if isinstance(getattr(batch, f.name), torch.Tensor)
                           else [getattr(batch, f.name)[i] for i in rows] for f in dataclasses.fields(batch)})


DDP_CASES = [(agg, empty) for agg in ("token_mean", "seq_mean", "dr_grpo") for empty in (False, True)]


def ddp_update(policy, batch, advantages, cfg, rows):
    """One GRPO update with plain SGD (lr 1, no clipping): the step is the gradient itself, so a
    wrong normalization shows (Adam's first step, lr * sign(g), and clipping would hide it)."""
    optimizer = torch.optim.SGD(dart.trainable(policy.model), lr=1.0)
    dart.grpo_update(policy, optimizer, rows_of(batch, rows), advantages[rows], cfg)
    return dart.adapter_state(policy.model)


def on_device(batch, device):
    return dataclasses.replace(batch, **{f.name: getattr(batch, f.name).to(device) for f in dataclasses.fields(batch)
                                         if isinstance(getattr(batch, f.name), torch.Tensor)})


def ddp_worker(rank, size, port, saved_path, out_path):
    """One of two processes, set up as torchrun sets them up (environment; gloo on the CPU, nccl
    with one GPU per process on CUDA)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(size),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    saved = torch.load(saved_path, weights_only=False)
    dart.init_distributed(saved["cfg"])
    results = {}
    share = len(saved["batch"].ids) // size
    policy = dart.load_policy(saved["cfg"])
    for agg, empty in DDP_CASES:
        cfg = dataclasses.replace(saved["cfg"], loss_agg=agg, max_grad_norm=1e9)
        dart.load_trainable(policy.model, saved["adapters"])
        batch = on_device(saved["empty_batch"] if empty else saved["batch"], policy.device)
        results[agg, empty] = ddp_update(policy, batch, saved["advantages"].to(policy.device), cfg,
                                         list(range(rank * share, (rank + 1) * share)))
    if rank == 1:  # the per-step guard of train() notices processes whose adapters differ
        with torch.no_grad():
            dart.trainable(policy.model)[0].add_(1e-3)
    try:
        dart.check_same_adapters(policy.model, 0)
        results["guard"] = "silent"
    except RuntimeError:
        results["guard"] = "raised"
    if rank == 0:
        torch.save(results, out_path)
    torch.distributed.barrier()  # neither process tears its connections down while the other still uses them
    torch.distributed.destroy_process_group()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_two_gpus)])
def test_two_processes_take_exactly_the_one_process_step(make_policy, tmp_path, device):
    policy, cfg = make_policy("dart", randomize=0.02, device=device, dtype="float32")
    batch = on_device(sampled(policy, cfg, prompts_for(policy, 8, seed=11)), "cpu")
    empty = rows_of(batch, list(range(8)))
    empty.written_by_policy[4:] = False  # the second process's share carries no loss at all
    advantages = torch.linspace(-1, 1, 8)
    adapters = dart.adapter_state(policy.model)
    saved_path, out_path = tmp_path / "batch.pt", tmp_path / "out.pt"
    torch.save({"cfg": cfg, "batch": batch, "empty_batch": empty, "advantages": advantages, "adapters": adapters},
               saved_path)
    torch.multiprocessing.spawn(ddp_worker, args=(2, free_port(), str(saved_path), str(out_path)), nprocs=2)
    split = torch.load(out_path, weights_only=False)
    assert split["guard"] == "raised"
    for agg, is_empty in DDP_CASES:
        one_cfg = dataclasses.replace(cfg, loss_agg=agg, max_grad_norm=1e9)
        dart.load_trainable(policy.model, adapters)
        whole = ddp_update(policy, on_device(empty if is_empty else batch, device), advantages.to(device), one_cfg,
                           list(range(8)))
        assert sum((whole[k] - adapters[k]).abs().sum() for k in whole) > 0
        for k in whole:
            assert torch.allclose(split[agg, is_empty][k], whole[k], rtol=1e-5, atol=1e-7), (agg, is_empty, k)


def test_torchrun_end_to_end_and_resume(cfg_factory, tmp_path):
    """Two processes end to end: they finish, hold identical adapters after every step (train()
    checks it each step and raises otherwise), write one run directory, and resume."""
    import subprocess
    import sys
    cfg = cfg_factory()
    dart.load_base(cfg)  # the base is cached: the processes only read it
    flags = [f"--cache_dir={cfg.cache_dir}", "--device=cpu", "--questions_per_step=2", "--group_size=4",
             "--eval_per_family=2", "--eval_every=2", "--save_every=1", "--max_new_tokens=48",
             "--lr_schedule=constant"] + [f"--{k}={v}" for k, v in TEST_BASE.items()]  # constant: resumes extend

    def torchrun(args):
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
                   str(HERE / "dart.py")] + args
        done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert done.returncode == 0, done.stderr[-3000:]
        return done

    done = torchrun(flags + ["--steps=2"])
    runs = os.listdir(tmp_path / "runs")
    assert len(runs) == 1 and done.stdout.count("run directory:") == 1
    run = tmp_path / "runs" / runs[0]
    torchrun([f"--resume={run}", "--steps=4"])
    records = [json.loads(line) for line in open(run / "metrics.jsonl")]
    assert [r["step"] for r in records] == [0, 1, 2, 3, 4] and "test_acc" in records[-1]
    assert os.listdir(tmp_path / "runs") == runs


# ---------------------------------------------------------------------------
# LEAS: the attribution recovers planted effects; hybrids, gradients and their controls


def test_fit_effects_recovers_planted_lambdas():
    """Without noise, exactly, from six variants or three seeds of them stacked; from binomial successes (N = 400 per
    variant and seed, 3 seeds) through the smoothed logit, each lambda within 0.25 for 95% of questions and lambda23's
    sign right whenever |lambda23| > 0.5. Each effect is a difference of variants (the paper's closed forms), which
    pins every row of the design matrix: e.g. lambda12 is what M_Tool's adapter does on reasoning tokens."""
    rng = np.random.default_rng(0)
    lambdas = rng.normal(0, 1, size=(6, 50))
    X = leas.design_matrix()
    fitted, residuals = leas.fit_effects(X, X @ lambdas)
    assert np.allclose(fitted, lambdas, atol=1e-10) and np.allclose(residuals, 0, atol=1e-10)
    z = dict(zip(leas.VARIANTS, X @ lambdas))
    closed = {"lambda1": z["Base"], "lambda2": z["H_Tool"] - z["Base"], "lambda3": z["H_Reas"] - z["Base"],
              "lambda12": z["M_Tool"] - z["H_Tool"], "lambda13": z["M_Reas"] - z["H_Reas"],
              "lambda23": z["M_Unified"] - z["M_Tool"] - z["M_Reas"] + z["Base"]}
    for name, row in zip(leas.EFFECTS, fitted):
        assert np.allclose(row, closed[name]), name
    stacked = leas.design_matrix(leas.VARIANTS * 3)  # three seeds: overdetermined, still exact
    assert np.allclose(leas.fit_effects(stacked, stacked @ lambdas)[0], lambdas, atol=1e-10)
    lambdas = rng.normal(0, 0.6, size=(6, 300))
    successes = rng.binomial(400, 1 / (1 + np.exp(-(stacked @ lambdas))))
    fitted, residuals = leas.fit_effects(stacked, leas.smoothed_logit(successes, 400))
    assert np.quantile(np.abs(fitted - lambdas), 0.95) < 0.25
    clear = np.abs(lambdas[5]) > 0.5
    assert np.all(np.sign(fitted[5][clear]) == np.sign(lambdas[5][clear]))
    assert np.abs(residuals).max() > 0  # overdetermined with noise: residuals are reported
    z = leas.smoothed_logit(np.array([0, 8, 16]), 16)
    assert np.all(np.isfinite(z)) and z[1] == 0 and np.isclose(z[0], -z[2])


def test_hybrids_place_adapters_in_role_blocks(make_policy):
    policy, cfg = make_policy("dart")
    shapes = {n: p[: cfg.lora_rank].shape if n.endswith("lora_A") else p[:, : cfg.lora_rank].shape
              for n, p in policy.model.named_parameters() if p.requires_grad}
    torch.manual_seed(1)
    states = {(m, 0): {n: torch.randn(s) * 0.05 for n, s in shapes.items()} for m in leas.TRAINED}
    ids, attention, position, roles = batch_of(policy, n=2)
    bare = bare_logits(cfg, ids, attention, position)
    with torch.no_grad():
        leas.place_variant(policy, states, "Base", 0)
        assert torch.equal(routed(policy, ids, attention, position, roles), bare)
        leas.place_variant(policy, states, "H_Tool", 0)
        hybrid = routed(policy, ids, attention, position, roles)
    # before the first tool position nothing the tool adapter wrote is visible: the base speaks
    untouched = (roles.cumsum(-1) == 0) & attention.bool()
    assert torch.allclose(hybrid[untouched], bare[untouched], atol=1e-5)
    assert not torch.allclose(hybrid[roles == T], bare[roles == T], atol=1e-3)


def test_role_gradients_add_up_and_the_matched_sets_are_disjoint_and_equal_in_size(make_policy):
    """The reasoning and tool gradients of a trajectory add up to its whole gradient; the four matched
    sets are disjoint, each of m = min(n_R, n_T) // 2 of its role's tokens; a set against a copy of itself
    has cosine 1. Two equal gradients split AdamW's second moment in half, disjoint ones not at all."""
    policy, cfg = make_policy("joint", randomize=0.01)
    batch = sampled(policy, cfg, prompts_for(policy, 16, seed=5))
    roles = dart.predicting_roles(batch, policy.special)
    mask = dart.loss_mask(batch, roles, "joint")
    params = dart.trainable(policy.model)
    row = int(torch.argmax((mask & (roles == T)).sum(-1)))
    reasoning, tool = mask[row] & (roles[row] == R), mask[row] & (roles[row] == T)
    assert tool.sum() >= 2
    sets = leas.matched_subsets(reasoning, tool, torch.Generator().manual_seed(0))
    m = min(int(reasoning.sum()), int(tool.sum())) // 2
    assert sets.sum(-1).tolist() == [m] * 4 and sets.sum(0).max() == 1
    assert not (sets[:2] & ~reasoning).any() and not (sets[2:] & ~tool).any()
    g_reason, g_tool, g_a, g_a_again = leas.token_set_gradients(
        policy, batch, row, mask[row], [reasoning, tool, sets[0], sets[0]], params, 1.0)
    logp, _ = dart.response_logprobs(policy, batch.ids[row:row + 1], batch.attention_mask[row:row + 1],
                                     batch.prompt_len, 1.0)
    full = torch.autograd.grad(-(logp[0] * mask[row]).sum() / mask[row].sum(), params)
    for r, t, f in zip(g_reason, g_tool, full):
        assert torch.allclose(r + t, f, atol=1e-6)
    flat = torch.nn.utils.parameters_to_vector
    assert torch.nn.functional.cosine_similarity(flat(g_a), flat(g_a_again), dim=0) == pytest.approx(1.0, abs=1e-4)
    shares = lambda *grads: leas.optimizer_shares(*torch.tensor(grads))
    same, apart = shares([1.0, 2.0], [1.0, 2.0]), shares([3.0, 0.0], [0.0, 4.0])
    assert same["reasoning_share"] == 0.5 and same["tool_keeps"] == pytest.approx(0.5 ** 0.5)
    assert apart["reasoning_share"] == pytest.approx(0.36) and apart["tool_keeps"] == apart["reasoning_keeps"] == 1


def test_the_findings_are_stated_as_far_as_their_intervals_and_controls_go():
    """lambda23's seed interval (a t interval, none from one seed) reads as interference or synergy only when it
    excludes zero. Cross-role cosines below both matched controls read as 'less aligned'; equal, as 'not less
    aligned', whatever the angle; above both, 'more aligned'; the controls' rows say 'control'."""
    mean, (lo, hi) = leas.seed_interval([1.0, 2.0, 3.0])  # sd 1, t(2) = 4.30
    assert mean == 2.0 and np.isclose(hi - mean, 4.30 / np.sqrt(3)) and np.isclose(mean - lo, hi - mean)
    assert leas.seed_interval([0.5]) == (0.5, None)
    assert leas.conclusion(-1.0, (-1.5, -0.5)).startswith("interference")
    assert leas.conclusion(1.0, (0.5, 1.5)).startswith("synergy")
    assert leas.conclusion(0.2, (-0.5, 0.9)).startswith("no conclusion")
    assert leas.conclusion(0.2, None).startswith("no conclusion")
    def result(cross, reasoning_control, tool_control, n=30):
        rows = {"cross_role": [cross] * n, "reasoning_control": [reasoning_control] * n, "tool_control":
                [tool_control] * n, "reasoning_across": np.full((n, n), 0.3), "tool_across": np.full((n, n), 0.1)}
        return {"trajectories": n, "question": list(range(n)), "family": ["a"] * n, "m": [2] * n, "all": rows,
                "0": rows}
    table = leas.gradient_table([result(0.0, 0.4, 0.2)])
    assert "finding: cross-role is less aligned than same-role within a trajectory" in table
    labels = [label for _, label in leas.GRADIENT_ROWS]
    assert [("control" in label) for label in labels] == [False, True, True, False, False]
    assert all(label in table for label in labels)
    assert "finding: cross-role is not less aligned" in leas.gradient_table([result(0.0, 0.0, 0.0)])
    assert "less aligned than two sets of the reasoning tokens, not" in leas.gradient_table([result(0.1, 0.5, 0.1)])
    assert "finding: cross-role is more aligned" in leas.gradient_table([result(0.5, 0.1, 0.2)])


def test_matched_controls_agree_with_cross_role_under_no_role_effect_and_name_a_planted_conflict():
    """Per-token gradients, a shared mean plus noise, 20 reasoning and 8 tool tokens a trajectory. With
    no role effect, cross-role on matched sets (m = 4) and both controls agree within 0.03 over 300
    trajectories (+0.16 each), where the old sums (each role whole, halves of a role) read +0.36
    against +0.33 and +0.16. With the roles' means moved apart (+d, -d), the finding names it."""
    rng = np.random.default_rng(0)
    mean, direction, reasoning = rng.normal(size=20), rng.normal(size=20), torch.arange(28) < 20
    sign, cos = np.where(reasoning, 1.0, -1.0)[:, None], lambda a, b: a @ b / np.linalg.norm(a) / np.linalg.norm(b)

    def result(planted, n=300):
        sums, old = [], []
        for row in range(n):
            tokens = mean + planted * sign * direction + 4 * rng.normal(size=(28, 20))
            sets = leas.matched_subsets(reasoning, ~reasoning, torch.Generator().manual_seed(row))
            sums.append(sets.numpy() @ tokens)
            r, t = tokens[:20], tokens[20:]
            old.append([cos(r.sum(0), t.sum(0)), cos(r[:10].sum(0), r[10:].sum(0)), cos(t[:4].sum(0), t[4:].sum(0))])
        cosines = leas.matched_cosines({key: torch.tensor(np.stack(sums)[:, i]) for i, key in enumerate(leas.SETS)})
        return {"trajectories": n, "question": list(range(n)), "family": ["lookup"] * n, "m": [4] * n,
                "all": cosines}, np.mean(old, 0)

    null, (old_cross, old_reasoning, old_tool) = result(0.0)
    cross, reasoning_control, tool_control = (np.mean(null["all"][k]) for k, _ in leas.GRADIENT_ROWS[:3])
    assert abs(cross - reasoning_control) < 0.03 and abs(cross - tool_control) < 0.03
    assert old_cross - old_tool > 0.15 and old_cross > old_reasoning
    assert "finding: cross-role is not less aligned" in leas.gradient_table([null])
    assert "less aligned than same-role within a trajectory (both controls)" in leas.gradient_table([result(1.0)[0]])


def test_the_across_trajectory_interval_covers_the_mean_pairwise_cosine_95_percent_of_the_time():
    """40 trajectories (one a question), each a shared direction at a strength of its own plus noise:
    over 200 simulations the jackknife interval covers the truth (the mean cosine of 20,000 pairs) in
    88-99% of them; a bootstrap of the N(N-1) pair values as if independent, in under half."""
    rng = np.random.default_rng(0)
    direction = rng.normal(size=30) / np.sqrt(30)
    unit = lambda g: g / np.linalg.norm(g, axis=-1, keepdims=True)
    draw = lambda n: unit(2 * rng.normal(1, 1, size=(n, 1)) * direction + rng.normal(size=(n, 30)))
    truth, covered = np.mean((draw(20000) * draw(20000)).sum(1)), []
    for _ in range(200):
        g = draw(40)
        result = {"question": list(range(40)), "family": ["a"] * 40, "all": {"tool_across": g @ g.T}}
        pairs, units = leas.pooled([result], "tool_across")
        _, (lo, hi) = leas.mean_and_interval(pairs, units)
        pair_lo, pair_hi = dart.bootstrap_interval(pairs[~np.isnan(pairs)], 100, rng)  # the old interval
        covered.append((lo <= truth <= hi, pair_lo <= truth <= pair_hi))
    jackknife, by_pairs = np.mean(covered, 0)
    assert 0.88 <= jackknife <= 0.99 and by_pairs < 0.5


def test_leas_end_to_end_writes_its_report_and_reuses_the_comparisons_runs(cfg_factory, tmp_path, monkeypatch,
                                                                           capsys):
    """leas.py trains its three variants where --compare keeps the runs of the same settings (and
    reuses the joint runs a comparison left there), fits, reports, and the second time reuses all."""
    monkeypatch.chdir(tmp_path)
    cfg = cfg_factory(steps=1, questions_per_step=2, eval_per_family=1, max_new_tokens=48)
    dart.compare_modes(dataclasses.replace(cfg, modes="joint", seeds=2))
    lcfg = leas.LeasConfig(seeds=2, samples=2, per_family=2, grad_questions=4, grad_rollouts=3, bootstrap=50)
    report = leas.run_leas(cfg, lcfg)
    path = leas.report_path(cfg, lcfg, grad_only=False)
    assert path != leas.report_path(cfg, dataclasses.replace(lcfg, samples=3), grad_only=False)
    saved = json.load(open(path))
    joint = json.load(open(os.path.join(dart.runs_folder(cfg), f"r{cfg.lora_rank}", "joint-s0", "config.json")))
    assert saved["config"]["train"]["cached_base"] == joint["cached_base"]  # sampled on the runs' own base
    assert set(saved["effects"]) == set(leas.EFFECTS) and saved["kept"] + len(saved["dropped"]) == 8
    assert len(saved["per_seed"]) == 2 and saved["conclusion"] == report["conclusion"]
    assert [g["trajectories"] >= 2 for g in saved["gradients"]] == [True, True] and report["kept"] == saved["kept"]
    printed = capsys.readouterr().out
    assert "mean lambda23" in printed and "reasoning vs tool" in printed and "conclusion: " in printed
    for family, f in saved["by_family"].items():  # means over each family's own questions
        own = [q["lambda"] for q in saved["questions"] if family in ("all", q["family"])]
        means = [pytest.approx(np.mean([sum(q[e] for e in effects) for q in own])) for effects in (
            ["lambda23"], ["lambda12", "lambda13", "lambda23"])]  # lambda23, and M_Unified against the hybrids
        assert (f["n"], f["lambda23"], f["against_hybrids"]) == (len(own), *means)
    assert printed.count("reusing") == 2  # the comparison's two joint runs
    leas.train_variants(cfg, lcfg)  # the next time, the six trained variants (three modes, two seeds) are reused
    assert capsys.readouterr().out.count("reusing") == 6


# ---------------------------------------------------------------------------
# the layer outside this repository: pasted alone, with generate(), and as PEFT files


def test_the_layer_block_pastes_alone_and_the_readme_snippet_routes_like_the_engine(small_hf_folder, tmp_path,
                                                                                     monkeypatch):
    """The block between the markers runs in an empty namespace (it imports torch and the standard library, nothing of
    this repository or of transformers); then the README's "Use the DART layer in your own code" snippet, run verbatim
    after it on a small model saved under the hub name it loads (from_pretrained takes a local folder of that name
    first), trains both adapters, and its generate() with the role hook produces the logits of dart.py's engine."""
    # the lines of dart.py between its two marker lines, and the first python block of the README's
    # section, exactly as a reader would copy them
    source, readme = (HERE / "dart.py").read_text(), (HERE / "README.md").read_text()
    block = source[source.index("# >>> DART layer\n"):source.index("# <<< DART layer\n")]
    assert set(re.findall(r"^(?:from|import) (\w+)", block, re.M)) <= {"contextlib", "dataclasses", "math", "torch"}
    section = readme.split("\n## Use the DART layer in your own code\n", 1)[1].split("\n## ", 1)[0]
    code = re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)
    name = re.search(r'name = "(.+?)"', code).group(1)
    shutil.copytree(small_hf_folder, tmp_path / name)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pasted = {"__name__": "pasted"}
    exec(block, pasted)
    exec(code, pasted)
    model, tok, routing = (pasted[k] for k in ("model", "tok", "routing"))
    assert all(len(tok.encode(tag, add_special_tokens=False)) == 1 for tag in dart.format_tags(tools.TOOLS))
    # its training step reached both adapters: the trajectory it trains on has both roles
    moved = [block_view(SimpleNamespace(model=model, routing=routing), b) for b in (R, T)]
    assert all(any(v.abs().sum() > 0 for k, v in m.items() if k.endswith("lora_B")) for m in moved)
    with torch.no_grad():  # adapters far from zero, so that a wrongly routed token changes the logits
        generator = torch.Generator().manual_seed(0)
        for p in dart.trainable(model):
            p.normal_(0, 0.2, generator=generator)
    special = dart.special_ids(tok)
    policy = dart.Policy(model, tok, special, routing, "cpu")
    for tail in ("", "Compute it. <calc>"):  # generation starts in a REASONING, then in a TOOL position
        prompt = dart.prompt_ids(tok, "What is 12 plus 30?") + encode(policy, tail)
        ids = torch.tensor([prompt])
        out = pasted["generate_with_roles"](model, routing, pasted["spans"], input_ids=ids,
                                            attention_mask=torch.ones_like(ids), max_new_tokens=12,
                                            do_sample=False, output_logits=True, return_dict_in_generate=True,
                                            pad_token_id=special.pad)
        sequence = out.sequences
        with torch.no_grad():
            engine = routed(policy, sequence, torch.ones_like(sequence))
        assert torch.allclose(torch.stack(out.logits, 1)[0], engine[0, len(prompt) - 1:-1], atol=1e-4)
        # and the engine, sampling greedily itself, writes the same tokens until its first observation
        rolled = dart.rollout(policy, REGISTRY, [prompt], dart.Config(max_new_tokens=12), 0)
        agree = int(rolled.written_by_policy[0].long().cumprod(0).sum())
        written = slice(len(prompt), len(prompt) + agree)
        assert agree > 0 and torch.equal(rolled.ids[0, written], sequence[0, written])


def saved_run(policy, cfg, out, optimizer=None):
    """A run directory holding config.json and a checkpoint of `policy`'s adapters."""
    cfg.out = str(out)
    dart.RunFiles(cfg, 0)
    dart.save_checkpoint(cfg.out, policy, optimizer or dart.make_optimizer(policy, cfg), cfg, 1)
    return cfg.out


def test_peft_export_files_and_merged_logits(make_policy, tmp_path):
    """Each exported adapter has PEFT's file names, key names and shapes, and merged the way PEFT
    merges a LoRA (W + lora_alpha / r * B A) gives the logits DART gives with every token in its role."""
    from safetensors.torch import load_file
    policy, cfg = make_policy("dart", randomize=0.05)
    saved_run(policy, cfg, tmp_path / "run")
    dart.main([f"--export_peft={cfg.out}"])
    ids, attention, position, _ = batch_of(policy)
    targets = set(cfg.targets.split(","))
    for role, name in ((R, "reasoning"), (T, "tool")):
        folder = os.path.join(cfg.out, "peft", name)
        assert sorted(os.listdir(folder)) == ["adapter_config.json", "adapter_model.safetensors"]
        config = json.load(open(os.path.join(folder, "adapter_config.json")))
        assert (config["peft_type"], config["task_type"]) == ("LORA", "CAUSAL_LM")
        assert (config["r"], config["lora_alpha"]) == (cfg.lora_rank, cfg.alpha)
        assert set(config["target_modules"]) == targets
        assert config["base_model_name_or_path"] == os.path.abspath(dart.base_path(cfg))
        base, _ = dart.load_base(cfg)  # what base_model_name_or_path names
        linears = {n: m for n, m in base.named_modules() if n.rsplit(".", 1)[-1] in targets}
        tensors = load_file(os.path.join(folder, "adapter_model.safetensors"))
        assert set(tensors) == {f"base_model.model.{n}.lora_{x}.weight" for n in linears for x in "AB"}
        with torch.no_grad():
            for n, m in linears.items():
                A, B = tensors[f"base_model.model.{n}.lora_A.weight"], tensors[f"base_model.model.{n}.lora_B.weight"]
                assert A.shape == (cfg.lora_rank, m.in_features) and B.shape == (m.out_features, cfg.lora_rank)
                m.weight += config["lora_alpha"] / config["r"] * B @ A
            merged = base(input_ids=ids, attention_mask=attention, position_ids=position).logits
            expected = routed(policy, ids, attention, position, torch.full_like(ids, role))
        assert torch.allclose(merged, expected, atol=1e-4)
    for mode, names in (("joint2r", ["shared"]), ("two_agent", ["reasoning", "tool"])):
        other, other_cfg = make_policy(mode)
        saved_run(other, other_cfg, tmp_path / mode)
        assert [os.path.basename(f) for f in dart.write_peft_adapters(other_cfg.out)] == names
    assert json.load(open(tmp_path / "joint2r" / "peft" / "shared" / "adapter_config.json"))["r"] == 2 * cfg.lora_rank
    mixed, mixed_cfg = make_policy("mixlora")
    saved_run(mixed, mixed_cfg, tmp_path / "mixlora")
    with pytest.raises(dart.DartError, match="router"):
        dart.write_peft_adapters(mixed_cfg.out)

"""
Invariant tests for dart.py, leas.py, tools.py and toy_tasks.py. CPU only, a few minutes.

    python -m pytest -q test_dart.py

The tests build their own small warm-started base once per session (in a temporary
cache) and never touch a model hub.
"""
import dataclasses
import io
import json
import math
import os
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
import toy_tasks
import tools

torch.set_num_threads(2)
WORLD = toy_tasks.make_world()
REGISTRY = tools.registry(WORLD.kb)


# ---------------------------------------------------------------------------
# fixtures: a small warm-started base, built once, and policies on top of it


@pytest.fixture(scope="session")
def cfg_factory(tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("cache"))

    def make(**overrides):
        # the default model with a shorter warm start (half the batch): two to three minutes to build. On
        # the CPU even where a GPU is visible: the GPU tests below ask for it
        cfg = dart.Config(cache_dir=cache, base_batch=16, eval_per_family=4, eval_every=1000, save_every=1000,
                          questions_per_step=4, group_size=4, max_new_tokens=64, device="cpu")
        for key, value in overrides.items():
            setattr(cfg, key, value)
        return cfg
    return make


@pytest.fixture(scope="session")
def make_policy(cfg_factory):
    def make(mode="dart", randomize=0.0, **overrides):
        cfg = cfg_factory(**{"mode": mode, "device": "cpu", **overrides})  # CPU unless a test asks for cuda
        policy = dart.load_policy(cfg)
        if randomize:  # nonzero adapters: with B = 0 many invariants would hold trivially
            generator = torch.Generator().manual_seed(0)
            with torch.no_grad():
                for p in policy.model.parameters():
                    if p.requires_grad:
                        p.normal_(0, randomize, generator=generator)
        return policy, cfg
    return make


def prompts_for(policy, n, seed=0, split="train"):
    rng = random.Random(seed)
    tasks = [toy_tasks.sample_task(rng, WORLD, split) for _ in range(n)]
    return tasks, [dart.prompt_ids(policy.tok, t.question) for t in tasks]


def encode(policy, text):
    return policy.tok.encode(text, add_special_tokens=False)


def routed(policy, ids, attention, position, roles):
    return policy.logits(ids, attention, position, roles)


# ---------------------------------------------------------------------------
# tools.py: the calculator and lookup


@pytest.mark.parametrize("expr, expected", [
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
])
def test_calculator_table(expr, expected):
    assert tools.calculator(expr) == expected


def test_lookup_is_forgiving_and_names_what_exists():
    lookup = tools.Lookup(WORLD.kb)
    entity = WORLD.train_entities[0]
    value = tools.format_number(WORLD.kb[entity]["height"])
    assert lookup(f"{entity}.height") == value
    assert lookup(f"  {entity.lower()} . HEIGHT ") == value
    assert lookup(f"{entity}.weight") == "error: attributes are population, area, height, age"
    assert lookup(f"{entity}x.height") == f"error: no entity; try {entity}"
    assert lookup("no dot here").startswith("error: write Entity.attribute")
    assert tools.run_tool(REGISTRY, "search", "x").startswith("error: unknown tool 'search'")
    assert tools.run_tool(REGISTRY, "calc", "   ") == "error: empty tool call"


# ---------------------------------------------------------------------------
# toy_tasks.py: splits and reward


NAME = re.compile(r"\b[A-Z][a-z]+\b")


def sample_tasks(n, split="train", seed=0, family=None):
    rng = random.Random(seed)
    return [toy_tasks.sample_task(rng, WORLD, split, family) for _ in range(n)]


def replays(trajectory):
    """Every call's observation in `trajectory` is what the real tool answers."""
    for name in tools.TOOL_NAMES:
        for call in trajectory.split(f"<{name}>")[1:]:
            argument, _, rest = call.partition(f"</{name}>")
            if not rest.startswith("<obs>" + tools.run_tool(REGISTRY, name, argument) + "</obs>"):
                return False
    return True


def inside_tool_call(text, index):
    """Is the character at `index` written inside an open tool call (the role rule, on text)?"""
    opened = False
    for match in re.finditer(r"<(/?)(calc|lookup)>", text[:index]):
        opened = not match.group(1)
    return opened


def test_splits_hold_out_entities_and_operands():
    assert not set(WORLD.train_entities) & set(WORLD.test_entities)
    for split, entities in (("train", WORLD.train_entities), ("test", WORLD.test_entities)):
        for task in sample_tasks(400, split=split, seed=6):
            assert set(NAME.findall(task.question)) - {"What", "Which"} <= set(entities)
            if task.family in ("arithmetic", "notool"):
                a, b = map(int, re.findall(r"\d+", task.question))
                assert toy_tasks.split_of(a, b) == split


def test_phrasings_are_shared_between_splits():
    """Paraphrases are not held out (a model trained from scratch learns a word only from the
    warm start): every phrasing of a test question also occurs in training."""
    def phrasing(question):  # entities and numbers blanked
        return re.sub(r"\d+", "N", NAME.sub(lambda m: m.group() if m.group() in ("What", "Which") else "E", question))
    train = {phrasing(t.question) for t in sample_tasks(20000, seed=7)}
    test = {phrasing(t.question) for t in sample_tasks(2000, split="test", seed=8)}
    assert test <= train, test - train


def test_gold_trajectories_solve_their_tasks():
    """Replaying a gold trajectory's tool calls through the real tools gives its observations,
    its answer earns reward 1, and judge() finds every decision right."""
    for family in toy_tasks.FAMILIES:
        for task in sample_tasks(200, family=family, seed=1):
            assert toy_tasks.reward(task.trajectory, task) == 1.0
            assert replays(task.trajectory)
            assert all(toy_tasks.judge(task, task.trajectory).values())


def test_every_slip_is_a_real_trajectory_that_errs_in_its_own_skill_and_role():
    """A demonstrator's slip replays through the real tools, earns no reward, judge() marks
    exactly its own skill wrong, and it leaves the gold trajectory inside a tool call for the
    tool skills and outside every call for the reasoning skills."""
    seen = set()
    for task in sample_tasks(2000, seed=2):
        for skill, rate, trajectory in task.slips:
            seen.add(skill)
            assert 0 < rate < 1 and replays(trajectory) and toy_tasks.reward(trajectory, task) == 0.0
            verdict = toy_tasks.judge(task, trajectory)
            assert verdict[skill] is False and all(v for s, v in verdict.items() if s != skill), (trajectory, verdict)
            where = next(i for i, (a, b) in enumerate(zip(task.trajectory, trajectory)) if a != b)
            role = "tool" if inside_tool_call(task.trajectory, where) else "reasoning"
            assert role == toy_tasks.SKILL_ROLES[skill], (skill, trajectory)
    assert seen == set(toy_tasks.SKILL_ROLES)


def test_demonstrator_errs_at_the_intended_rate_and_only_there():
    """judge() on the demonstrator's trajectories: per skill, in the family where that decision
    comes first after deciding to call (so every demonstration that called reaches it), the
    error rate is the intended one; on a task without a pitfall in a skill it never errs there."""
    rng = random.Random(4)
    where = {"call": toy_tasks.FAMILIES[:3], "key": ("lookup",), "expression": ("arithmetic",), "hops": ("multihop",)}
    judged, wrong, expected = Counter(), Counter(), Counter()
    for task in sample_tasks(20000, seed=4):
        demo = toy_tasks.demonstration(rng, task)
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


def test_both_roles_have_something_to_learn():
    """The demonstrator fails often in every tool family, and each role's pitfalls come up in a
    sizeable share of the questions."""
    rng = random.Random(5)
    success, exercised = {f: [] for f in toy_tasks.FAMILIES}, Counter()
    tasks = sample_tasks(8000, seed=5)
    for task in tasks:
        success[task.family].append(toy_tasks.reward(toy_tasks.demonstration(rng, task), task))
        exercised.update({toy_tasks.SKILL_ROLES[skill] for skill, _, _ in task.slips})
    assert all(np.mean(success[f]) < 0.8 for f in ("arithmetic", "lookup", "multihop"))
    assert np.mean(success["notool"]) == 1.0
    assert all(exercised[role] / len(tasks) > 0.25 for role in ("reasoning", "tool")), exercised


def test_skill_rates_judge_only_the_decisions_reached():
    """Gold responses get every skill right; responses that give up get 'call' wrong and reach
    no other decision; the demonstrator's tool slips get only their own skill wrong."""
    tasks = [t for t in sample_tasks(200, split="test", seed=9) if t.slips]
    assert dart.skill_rates(tasks, [t.trajectory for t in tasks]) == {f"skill_{s}": 1.0 for s in toy_tasks.SKILL_ROLES}
    gave_up = dart.skill_rates(tasks, [toy_tasks.GIVE_UP_TEXT] * len(tasks))
    assert gave_up == {"skill_call": 0.0, "skill_hops": None, "skill_key": None, "skill_expression": None}
    for skill in ("key", "expression"):
        slipped = [(t, text) for t in tasks for s, _, text in t.slips if s == skill]
        rates = dart.skill_rates(*zip(*slipped))
        assert rates[f"skill_{skill}"] == 0.0 and rates["skill_call"] == 1.0


def test_slipped_call_is_the_demonstrators_wrong_tool_call():
    tasks = sample_tasks(400, split="test", seed=10)
    for task in tasks:
        slip = dart.slipped_call(task)
        if any(toy_tasks.SKILL_ROLES[skill] == "tool" for skill, _, _ in task.slips):
            assert slip and slip not in task.trajectory and any(slip in text for _, _, text in task.slips)
        else:
            assert slip is None


def test_the_report_shows_a_multihop_trajectory_and_the_demonstrators_wrong_call(make_policy, capsys):
    """The end-of-run report prints the results table and reward curve it is given, then a multihop
    test question answered greedily, its gold answer and verdict, and the demonstrator's wrong
    tool call for it; from a split with no such question, any multihop question, without that line."""
    policy, cfg = make_policy("dart")
    test = toy_tasks.test_set(WORLD, 10)
    plain = [t for t in test if dart.slipped_call(t) is None]
    assert any(t.family == "multihop" for t in plain)
    for split in (test, plain):
        example, _, _, judged = dart.showcase(policy, REGISTRY, split, cfg)
        dart.print_report("RUN", "TABLE", "CURVE", policy, REGISTRY, split, cfg)
        out = capsys.readouterr().out
        assert out.startswith("\nTABLE\n\ntrain reward  CURVE\n") and out.endswith("run directory: RUN\n")
        assert example.family == "multihop" and f"{example.question}\n" in out
        assert f"gold: {example.answer} ({judged})" in out and "\x1b[" not in out  # no colour off a terminal
        slip = dart.slipped_call(example)
        assert (split is test) == bool(slip) and (f"often writes {slip} here" in out) == bool(slip)


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
    (TWO_HOPS, TWO_HOPS.trajectory.replace("Kalo.age", "Kalo.antiquity"), {"call": True, "key": False,
                                                                           "hops": True}),
])
def test_judge_on_hand_written_completions(task, completion, expected):
    assert toy_tasks.judge(task, completion) == expected


@pytest.mark.parametrize("completion, reward", [
    ("<answer>5350</answer>", 1.0),
    ("<answer> 5350.0 </answer>", 1.0),
    ("<answer>5,350</answer>", 1.0),
    ("<answer>5351</answer>", 0.0),
    ("the answer is 5350", 0.0),
    ("<answer>5350", 0.0),
    ("<answer>abc</answer>", 0.0),
])
def test_reward_exact_match_after_canonical_formatting(completion, reward):
    task = toy_tasks.Task("q", "5350", "lookup", "")
    assert toy_tasks.reward(completion, task) == reward
    assert toy_tasks.reward("<answer>1</answer>", task, format_bonus=0.1) == 0.1


# ---------------------------------------------------------------------------
# token roles

HAND = dart.SpanTags(opens=torch.tensor([10, 12]), ends=torch.tensor([11, 13, 14]))  # <calc> <lookup>; </calc> </lookup> <obs>
R, T = dart.REASONING, dart.TOOL


@pytest.mark.parametrize("ids, roles", [
    # x <calc> 1 + </calc> <obs> 3 </obs> y : <calc> predicts the argument (TOOL),
    # </calc> predicts what follows the call (REASONING)
    ([5, 10, 6, 7, 11, 14, 8, 15, 9], [R, T, T, T, R, R, R, R, R]),
    # two calls back to back
    ([12, 6, 13, 14, 8, 15, 10, 7, 11], [T, T, R, R, R, R, T, T, R]),
    # nested open: still inside until the environment's <obs> closes the span
    ([10, 6, 12, 7, 14, 8, 15], [T, T, T, T, R, R, R]),
    # a stray closing tag opens nothing; an unclosed span stays TOOL
    ([11, 5, 10, 5, 6], [R, R, T, T, T]),
    # the policy writing <obs> itself also ends a span
    ([10, 5, 14, 6], [T, T, R, R]),
    ([5, 6, 7], [R, R, R]),
])
def test_token_roles_on_hand_written_sequences(ids, roles):
    ids = torch.tensor([ids])
    assert dart.token_roles(ids, HAND).tolist() == [roles]
    role = torch.tensor([R])
    stepped = []
    for token in ids[0]:
        role = dart.next_role(role, token[None], HAND)
        stepped.append(role.item())
    assert stepped == roles  # the engine's incremental form agrees


# ---------------------------------------------------------------------------
# GRPO arithmetic


def test_group_advantages():
    rewards = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    adv = dart.group_advantages(rewards)
    assert torch.equal(adv[:2], torch.zeros(2, 4))  # a zero-variance group teaches nothing
    std = math.sqrt((0.75 ** 2 + 3 * 0.25 ** 2) / 4)  # population std of [1, 0, 0, 0]
    expected = torch.tensor([0.75, -0.25, -0.25, -0.25]) / (std + 1e-4)
    assert torch.allclose(adv[2], expected)
    assert torch.allclose(dart.group_advantages(rewards, scale_std=False)[2], torch.tensor([0.75, -0.25, -0.25, -0.25]))


def test_token_weights_aggregations():
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.bool)
    token_mean = dart.token_weights(mask, "token_mean", 10)
    assert torch.allclose(token_mean, mask.float() / 4)
    seq_mean = dart.token_weights(mask, "seq_mean", 10)
    assert torch.allclose(seq_mean[0], torch.tensor([1, 1, 1, 0]) / 3 / 2)
    assert torch.allclose(seq_mean[1], torch.tensor([1.0, 0, 0, 0]) / 2)
    assert torch.allclose(dart.token_weights(mask, "dr_grpo", 10), mask.float() / 20)
    empty_row = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)  # seq_mean: only rows with loss count
    assert torch.allclose(dart.token_weights(empty_row, "seq_mean", 10).sum(), torch.tensor(1.0))


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


# ---------------------------------------------------------------------------
# the DART layer


def batch_of(policy, n=3, seed=0):
    """Left-padded prompt + gold trajectory ids of n train tasks, with their mask and roles."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        task = toy_tasks.sample_task(rng, WORLD, "train", "multihop" if not rows else None)
        ids, _ = dart.trajectory_ids(policy.tok, policy.special, task.trajectory, 16)
        rows.append(dart.prompt_ids(policy.tok, task.question) + ids)
    width = max(map(len, rows))
    ids = torch.tensor([[policy.special.pad] * (width - len(r)) + r for r in rows])
    attention = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, attention, dart.position_ids(attention), dart.token_roles(ids, policy.special.spans)


def block_view(policy, block):
    """The adapter tensors of one block, as a single-block (rank r) state."""
    rows = slice(block * policy.routing.lora_rank, (block + 1) * policy.routing.lora_rank)
    return {name: (p[rows] if name.endswith("lora_A") else p[:, rows]).detach().clone()
            for name, p in policy.model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("mode", dart.MODES)
def test_zero_init_equals_base_model(make_policy, mode):
    policy, cfg = make_policy(mode)
    base, _ = dart.load_base(cfg)
    ids, attention, position, roles = batch_of(policy)
    with torch.no_grad():
        ours = routed(policy, ids, attention, position, roles)
        bare = base(input_ids=ids, attention_mask=attention, position_ids=position).logits
    assert torch.equal(ours, bare)


def test_adapters_off_is_the_reference_model(make_policy):
    policy, cfg = make_policy("dart", randomize=0.05)
    base, _ = dart.load_base(cfg)
    ids, attention, position, roles = batch_of(policy)
    with torch.no_grad():
        adapted = routed(policy, ids, attention, position, roles)
        with dart.adapters_off(policy.routing):
            off = routed(policy, ids, attention, position, roles)
        bare = base(input_ids=ids, attention_mask=attention, position_ids=position).logits
    assert not torch.allclose(adapted, bare, atol=1e-3)  # the adapters do something...
    assert torch.equal(off, bare)                         # ...and switching them off removes it


def test_dart_with_one_role_is_a_single_lora(make_policy):
    dual, _ = make_policy("dart", randomize=0.05)
    single, _ = make_policy("joint")
    ids, attention, position, _ = batch_of(dual)
    for role in (dart.REASONING, dart.TOOL):
        dart.load_adapter_block(single.model, block_view(dual, role), 0, single.routing.lora_rank)
        roles = torch.full_like(ids, role)
        with torch.no_grad():
            a = routed(dual, ids, attention, position, roles)
            b = routed(single, ids, attention, position, roles)
        assert torch.allclose(a, b, atol=1e-5)


def test_joint2r_is_one_rank_2r_lora():
    torch.manual_seed(0)
    routing = dart.Routing("joint2r", lora_rank=4, alpha=8.0, device="cpu")
    layer = dart.DartLinear(torch.nn.Linear(16, 8), routing, 0.0, with_router=False, generator=torch.Generator())
    torch.nn.init.normal_(layer.lora_B)
    x = torch.randn(2, 5, 16)
    routing.route(torch.randint(0, 2, (2, 5)))
    expected = layer.base(x) + (8.0 / 8) * x @ layer.lora_A.T @ layer.lora_B.T  # alpha / (2r)
    assert torch.allclose(layer(x), expected, atol=1e-5)


@pytest.mark.parametrize("role", [dart.REASONING, dart.TOOL])
def test_inactive_block_gets_exactly_zero_gradient_at_other_roles_positions(role):
    torch.manual_seed(0)
    routing = dart.Routing("dart", lora_rank=4, alpha=8.0, device="cpu")
    layer = dart.DartLinear(torch.nn.Linear(16, 8), routing, 0.0, with_router=False, generator=torch.Generator())
    torch.nn.init.normal_(layer.lora_B)
    roles = torch.tensor([[0, 0, 1, 1, 0, 1], [1, 1, 1, 0, 0, 0]])
    routing.route(roles)
    layer(torch.randn(2, 6, 16))[roles == role].square().sum().backward()
    own, other = slice(role * 4, role * 4 + 4), slice((1 - role) * 4, (2 - role) * 4)
    assert torch.count_nonzero(layer.lora_A.grad[other]) == 0
    assert torch.count_nonzero(layer.lora_B.grad[:, other]) == 0
    assert torch.count_nonzero(layer.lora_A.grad[own]) > 0 and torch.count_nonzero(layer.lora_B.grad[:, own]) > 0


def block_grad(policy, ids, attention, loss_positions, block=dart.TOOL):
    """Sum of |grad| over one adapter block's tensors, for a loss on the logits at loss_positions."""
    policy.model.zero_grad(set_to_none=True)
    logits = routed(policy, ids, attention, dart.position_ids(attention), dart.token_roles(ids, policy.special.spans))
    logits[loss_positions].logsumexp(-1).sum().backward()
    units = slice(block * policy.routing.lora_rank, (block + 1) * policy.routing.lora_rank)
    total = 0.0
    for name, p in policy.model.named_parameters():
        if name.endswith("lora_A"):
            total += p.grad[units].abs().sum().item()
        elif name.endswith("lora_B"):
            total += p.grad[:, units].abs().sum().item()
    return total


def test_no_tool_span_gives_the_tool_block_no_gradient(make_policy):
    policy, _ = make_policy("dart", randomize=0.05)
    task = toy_tasks.Task("Which is larger, 12 or 34?", "34", "notool", "No tool needed. <answer>34</answer>")
    ids = torch.tensor([dart.prompt_ids(policy.tok, task.question) + dart.trajectory_ids(
        policy.tok, policy.special, task.trajectory, 16)[0]])
    everything = torch.ones_like(ids, dtype=torch.bool)
    assert block_grad(policy, ids, torch.ones_like(ids), everything) == 0.0
    with_tool = batch_of(policy, n=1)  # a multihop trajectory: now the tool block learns
    assert block_grad(policy, with_tool[0], with_tool[1], with_tool[1].bool()) > 0


def test_two_agent_isolation_is_total(make_policy):
    """Attention carries a token's loss into the other role's adapter in `dart` (the caveat in
    the README's caveat); in `two_agent` neither role's loss ever reaches the other agent's adapter."""
    for mode, leaks in (("dart", True), ("two_agent", False)):
        policy, _ = make_policy(mode, randomize=0.05)
        ids, attention, _, roles = batch_of(policy, n=1)
        reasoning_after_a_call = (roles == dart.REASONING) & (roles.cumsum(-1) > 0) & attention.bool()
        assert (block_grad(policy, ids, attention, reasoning_after_a_call, dart.TOOL) > 0) == leaks
        assert (block_grad(policy, ids, attention, roles == dart.TOOL, dart.REASONING) > 0) == leaks


def test_trainable_parameter_counts(make_policy):
    counts = {}
    for mode in dart.MODES:
        policy, _ = make_policy(mode)
        counts[mode] = sum(p.numel() for p in policy.model.parameters() if p.requires_grad)
        assert all(not p.requires_grad for n, p in policy.model.named_parameters() if "lora" not in n
                   and "router" not in n)  # the backbone, embeddings and lm_head stay frozen
    assert counts["dart"] == counts["joint2r"] == counts["two_agent"] == 2 * counts["joint"]
    assert counts["reason_only"] == counts["tool_only"] == counts["joint"]
    routers = sum(p.numel() for n, p in make_policy("mixlora")[0].model.named_parameters() if "router" in n)
    assert routers > 0 and counts["mixlora"] == counts["dart"] + routers


# ---------------------------------------------------------------------------
# the rollout engine


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

    def run(scripts, registry=REGISTRY, **limits):
        cfg = dart.Config(max_new_tokens=limits.get("max_new_tokens", 80), **{
            k: v for k, v in limits.items() if k != "max_new_tokens"})
        policy = dart.Policy(ScriptedModel(tiny.tok, tiny.special, scripts), tiny.tok, tiny.special,
                             dart.Routing("dart", 2, 4.0, "cpu"), "cpu")
        prompts = [dart.prompt_ids(tiny.tok, "What is 2 plus 3?"), dart.prompt_ids(tiny.tok, "Hi?")]
        return dart.rollout(policy, registry, [prompts[i % 2] for i in range(len(scripts))], cfg, 1.0,
                            torch.Generator().manual_seed(0)), policy
    return run


def observations(text):
    return [chunk.partition("</obs>")[0] for chunk in text.split("<obs>")[1:]]


def as_observed(policy, text, max_tokens=24):
    """What the policy reads of a tool's output: tokenized once, cut to max_tokens."""
    return policy.tok.decode(dart.observation_ids(policy.tok, policy.special, text, max_tokens)[1:-1])


def test_engine_runs_tools_and_forces_observations(scripted):
    out, policy = scripted(["Compute it. <calc>2+3</calc><answer>5</answer>", "No tool needed. <answer>7</answer>"])
    assert out.texts == ["Compute it. <calc>2+3</calc><obs>5</obs><answer>5</answer>",
                         "No tool needed. <answer>7</answer>"]
    assert out.tool_calls == [1, 0] and out.observations == [1, 0] and out.invalid_calls == [0, 0]
    response = out.ids[:, out.prompt_len:]
    real = out.attention_mask[:, out.prompt_len:].bool()
    # mask polarity: observation tokens and padding carry no loss; </answer> does
    for row in range(2):
        tokens = response[row][real[row]].tolist()
        sampled = out.written_by_policy[row][real[row]].tolist()
        env = False
        for token, by_policy in zip(tokens, sampled):
            env = env or token == policy.special.obs
            assert by_policy == (not env)
            env = env and token != policy.special.obs_end
        assert tokens[-1] == policy.special.answer_end and sampled[-1]
    assert not out.written_by_policy[~real].any()  # padding after the end is not the policy's
    # the roles the engine routed with are the role rule applied to its own output
    assert torch.equal(out.roles[out.attention_mask.bool()],
                       dart.token_roles(out.ids, policy.special.spans)[out.attention_mask.bool()])


def test_engine_eos_carries_loss(scripted):
    out, policy = scripted(["Done"])  # the script ends with eos
    row = out.ids[0, out.prompt_len:][out.attention_mask[0, out.prompt_len:].bool()]
    assert row[-1].item() == policy.special.eos and out.written_by_policy[0, len(row) - 1]


@pytest.mark.parametrize("script, error", [
    ("<calc>1+<lookup><answer>1</answer>", "error: calls cannot nest"),
    ("<calc>" + "1" * 40 + "<answer>1</answer>", "error: call over 24 tokens"),  # unclosed
    ("<calc></calc><answer>1</answer>", "error: empty tool call"),
    ("<calc>   </calc><answer>1</answer>", "error: empty tool call"),
    ("</calc><answer>1</answer>", "error: no open call"),
    ("<calc>1+1</lookup><answer>1</answer>", "error: no open call"),
    ("<calc>two</calc><answer>1</answer>", "error: bad character 'o'"),
    ("<lookup>Nowhere.height</lookup><answer>1</answer>", REGISTRY["lookup"]("Nowhere.height")),
])
def test_malformed_calls_become_error_observations(scripted, script, error):
    out, policy = scripted([script])
    assert observations(out.texts[0]) == [as_observed(policy, error)]
    assert out.invalid_calls == out.observations == [1] and out.texts[0].endswith("<answer>1</answer>")


@pytest.mark.parametrize("max_obs_tokens", [24, 4])
def test_the_warm_start_reads_the_observations_the_rollout_inserts(scripted, max_obs_tokens):
    """A demonstration, tokenized for the warm start, is token for token what the engine produces when
    the policy writes the same text: the tools' answers, errors included, cut to the same length."""
    tasks = [t for t in sample_tasks(300, seed=11) if any(skill == "key" for skill, _, _ in t.slips)]
    demonstrations = [text for t in tasks for skill, _, text in t.slips if "error" in text][:3] + [tasks[0].trajectory]
    scripts = [re.sub(r"<obs>.*?</obs>", "", text) for text in demonstrations]  # what the policy writes
    out, policy = scripted(scripts, max_obs_tokens=max_obs_tokens)
    for row, text in enumerate(demonstrations):
        ids, written = dart.trajectory_ids(policy.tok, policy.special, text, max_obs_tokens)
        real = out.attention_mask[row, out.prompt_len:].bool()
        assert out.ids[row, out.prompt_len:][real].tolist() == ids
        assert out.written_by_policy[row][real].long().tolist() == written


def test_unknown_tool_is_an_error_observation(scripted):
    out, policy = scripted(["<lookup>A.b</lookup><answer>1</answer>"], registry={"calc": tools.calculator})
    assert observations(out.texts[0]) == [as_observed(policy, "error: unknown tool 'lookup'; tools are calc")]


def test_tool_call_limit(scripted):
    out, policy = scripted(["<calc>1+1</calc>" * 4 + "<calc><answer>2</answer>"], max_tool_calls=4)
    assert out.tool_calls == [4] and out.observations == [5] and out.invalid_calls == [1]  # refused at its tag
    assert observations(out.texts[0]) == ["2"] * 4 + [as_observed(policy, "error: at most 4 tool calls")]


@pytest.mark.parametrize("mode", ["dart", "joint", "two_agent", "mixlora"])
def test_rollout_logprobs_equal_training_logprobs(make_policy, mode):
    """The log-probs recorded while sampling (KV cache, one token at a time, forced observations,
    left padding, a group's prompt read once, finished rows dropped) equal those of the training
    forward over the finished sequences, and that forward (which also reads each prompt once)
    equals a plain forward over every row."""
    policy, cfg = make_policy(mode, randomize=0.02)
    tasks, prompts = prompts_for(policy, 4, seed=3)
    prompts = [p for p in prompts for _ in range(3)]  # groups of 3 rollouts per question
    out = dart.rollout(policy, REGISTRY, prompts, cfg, 1.0, torch.Generator().manual_seed(0))
    assert len({len(p) for p in prompts}) > 1  # left padding is exercised
    forced = out.attention_mask[:, out.prompt_len:].bool() & ~out.written_by_policy
    assert forced.any()  # observations were inserted
    lengths = out.attention_mask[:, out.prompt_len:].sum(-1)
    assert len(set(lengths.tolist())) > 1  # rows finished at different steps and left the batch
    with torch.no_grad():
        logp, _ = dart.response_logprobs(policy, out.ids, out.attention_mask, out.prompt_len, 1.0)
        logits = routed(policy, out.ids, out.attention_mask, dart.position_ids(out.attention_mask),
                        dart.token_roles(out.ids, policy.special.spans))[:, out.prompt_len - 1:-1]
    plain = torch.log_softmax(logits, -1).gather(-1, out.ids[:, out.prompt_len:, None]).squeeze(-1)
    assert torch.allclose(logp[out.written_by_policy], out.logprobs[out.written_by_policy], atol=1e-4)
    assert torch.allclose(logp[out.written_by_policy], plain[out.written_by_policy], atol=1e-4)
    assert torch.equal(out.roles[out.attention_mask.bool()],
                       dart.token_roles(out.ids, policy.special.spans)[out.attention_mask.bool()])


def test_reference_logprobs_are_the_base_models_per_micro_batch(make_policy):
    """The KL reference of the update, computed micro-batch by micro-batch (rows cut to their
    chunk's length, prompts read once), is the bare base model's log-prob of every policy token."""
    policy, cfg = make_policy("dart", randomize=0.05)
    base, _ = dart.load_base(cfg)
    _, prompts = prompts_for(policy, 3, seed=5)
    out = dart.rollout(policy, REGISTRY, [p for p in prompts for _ in range(3)], cfg, 1.0,
                       torch.Generator().manual_seed(1))
    chunks = dart.micro_batches(out, 4)
    assert len({chunk.length for chunk in chunks}) > 1  # chunks of different lengths
    ref = dart.reference_logprobs(policy, out, chunks, 1.0)
    with torch.no_grad():
        logits = base(input_ids=out.ids, attention_mask=out.attention_mask,
                      position_ids=dart.position_ids(out.attention_mask)).logits[:, out.prompt_len - 1:-1]
    bare = torch.log_softmax(logits, -1).gather(-1, out.ids[:, out.prompt_len:, None]).squeeze(-1)
    on = out.written_by_policy
    assert torch.allclose(ref[on], bare[on], atol=1e-4)
    assert not torch.allclose(ref[on], out.logprobs[on], atol=1e-3)  # not the adapted policy's


def assert_limits_hold(policy, out, cfg):
    assert out.written_by_policy.shape[1] <= cfg.max_new_tokens and max(out.tool_calls) <= cfg.max_tool_calls
    for row in range(len(out.ids)):
        real = out.attention_mask[row, out.prompt_len:].bool()
        tokens, by_policy = out.ids[row, out.prompt_len:][real].tolist(), out.written_by_policy[row][real].tolist()
        for start, (token, written) in enumerate(zip(tokens, by_policy)):
            if token == policy.special.obs and not written:  # an observation the environment inserted
                rest = tokens[start + 1:]
                length = rest.index(policy.special.obs_end) if policy.special.obs_end in rest else len(rest)
                assert length <= cfg.max_obs_tokens and not any(by_policy[start:start + length + 2])


def test_rollout_respects_its_limits(make_policy):
    policy, cfg = make_policy("dart", randomize=0.3, max_new_tokens=30, max_tool_calls=1, max_obs_tokens=4)
    _, prompts = prompts_for(policy, 16, seed=4)
    out = dart.rollout(policy, REGISTRY, prompts, cfg, 5.0, torch.Generator().manual_seed(0))
    assert_limits_hold(policy, out, cfg)


# ---------------------------------------------------------------------------
# end to end


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"))])
def test_short_run_learns(cfg_factory, tmp_path, device):
    """Ten GRPO steps raise greedy accuracy on (held-out samples of) the train split (on a GPU, in
    bfloat16 where it computes it natively)."""
    from safetensors.torch import load_file
    # ten steps: the constant, higher rate that learns fastest (the default schedule is for 80 steps)
    cfg = cfg_factory(steps=10, questions_per_step=8, group_size=8, lr=2e-3, lr_schedule="constant", warmup_steps=0,
                      out=str(tmp_path / "run"), device=device)
    run_dir = dart.train(cfg, report=False)
    policy = dart.load_policy(cfg)
    rng = random.Random(7)
    probe = [toy_tasks.sample_task(rng, WORLD, "train") for _ in range(96)]
    before = dart.evaluate(policy, REGISTRY, probe, cfg)
    dart.load_trainable(policy.model, load_file(os.path.join(run_dir, "adapters.safetensors")))
    after = dart.evaluate(policy, REGISTRY, probe, cfg)
    assert after["acc"] >= before["acc"] + 0.1, (before, after)
    records = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    assert [r["step"] for r in records] == list(range(11)) and "test_acc" in records[0] and "test_acc" in records[-1]


def gold_token_probability(policy, tasks, skills):
    """Mean teacher-forced probability of the gold token at the points where the demonstrator's
    slips in `skills` leave the gold trajectory (the first token where the two differ)."""
    probs = []
    for task in tasks:
        prompt = dart.prompt_ids(policy.tok, task.question)
        gold, _ = dart.trajectory_ids(policy.tok, policy.special, task.trajectory, 24)
        for skill, _, slip in task.slips:
            if skill in skills:
                wrong, _ = dart.trajectory_ids(policy.tok, policy.special, slip, 24)
                where = next(i for i, (a, b) in enumerate(zip(gold, wrong)) if a != b)
                ids = torch.tensor([prompt + gold[:where]])
                with torch.no_grad():
                    logits = routed(policy, ids, torch.ones_like(ids), dart.position_ids(torch.ones_like(ids)),
                                    dart.token_roles(ids, policy.special.spans))[0, -1]
                probs.append(torch.softmax(logits.float(), -1)[gold[where]].item())
    return float(np.mean(probs))


def test_a_tool_only_run_learns_the_tool_calls(cfg_factory, tmp_path):
    """Ten tool_only steps (how leas.py trains M_Tool) raise the probability of the right key or
    expression where the demonstrator writes a wrong one, so the tool adapter alone has a skill to
    learn. The decision to call a tool, which tool_only does not train, barely moves (its one
    adapter acts there too, but no loss reaches it from there)."""
    from safetensors.torch import load_file
    cfg = cfg_factory(mode="tool_only", steps=10, questions_per_step=8, group_size=8, lr=2e-3, lr_schedule="constant",
                      warmup_steps=0, eval_every=100, out=str(tmp_path / "run"))
    run_dir = dart.train(cfg, report=False)
    policy = dart.load_policy(cfg)
    tasks = toy_tasks.test_set(WORLD, 30)
    skills = {"tool": ("key", "expression"), "call": ("call",)}
    before = {name: gold_token_probability(policy, tasks, group) for name, group in skills.items()}
    dart.load_trainable(policy.model, load_file(os.path.join(run_dir, "adapters.safetensors")))
    after = {name: gold_token_probability(policy, tasks, group) for name, group in skills.items()}
    assert after["tool"] >= before["tool"] + 0.03, (before, after)
    assert abs(after["call"] - before["call"]) < 0.02, (before, after)


# ---------------------------------------------------------------------------
# LEAS

import leas  # noqa: E402  (after the dart fixtures it uses)


def test_fit_effects_recovers_planted_lambdas_exactly_without_noise():
    rng = np.random.default_rng(0)
    lambdas = rng.normal(0, 1, size=(6, 50))
    X = leas.design_matrix()
    fitted, residuals = leas.fit_effects(X, X @ lambdas)
    assert np.allclose(fitted, lambdas, atol=1e-10) and np.allclose(residuals, 0, atol=1e-10)
    stacked = leas.design_matrix(leas.VARIANTS * 3)  # three seeds: overdetermined, still exact
    assert np.allclose(leas.fit_effects(stacked, stacked @ lambdas)[0], lambdas, atol=1e-10)


def test_fit_effects_recovers_planted_lambdas_from_sampled_successes():
    """Binomial successes (N = 400 per variant and seed, 3 seeds) through the smoothed logit:
    each fitted lambda within 0.25 of the planted one for 95% of questions, lambda23's sign
    right whenever |lambda23| > 0.5."""
    rng = np.random.default_rng(1)
    lambdas = rng.normal(0, 0.6, size=(6, 300))
    X = leas.design_matrix(leas.VARIANTS * 3)
    successes = rng.binomial(400, 1 / (1 + np.exp(-(X @ lambdas))))
    fitted, residuals = leas.fit_effects(X, leas.smoothed_logit(successes, 400))
    assert np.quantile(np.abs(fitted - lambdas), 0.95) < 0.25
    clear = np.abs(lambdas[5]) > 0.5
    assert np.all(np.sign(fitted[5][clear]) == np.sign(lambdas[5][clear]))
    assert np.abs(residuals).max() > 0  # overdetermined with noise: residuals are reported


def test_effects_closed_forms():
    """Each effect is a difference of variants (the paper's closed forms), which pins every row of
    the design matrix: e.g. lambda12 is what M_Tool's adapter does on reasoning tokens."""
    rng = np.random.default_rng(2)
    Z = rng.normal(size=(6, 20))
    fitted, _ = leas.fit_effects(leas.design_matrix(), Z)
    z = dict(zip(leas.VARIANTS, Z))
    closed = {"lambda1": z["Base"], "lambda2": z["H_Tool"] - z["Base"], "lambda3": z["H_Reas"] - z["Base"],
              "lambda12": z["M_Tool"] - z["H_Tool"], "lambda13": z["M_Reas"] - z["H_Reas"],
              "lambda23": z["M_Unified"] - z["M_Tool"] - z["M_Reas"] + z["Base"]}
    for name, row in zip(leas.EFFECTS, fitted):
        assert np.allclose(row, closed[name]), name


def test_smoothed_logit_is_finite_and_symmetric():
    z = leas.smoothed_logit(np.array([0, 8, 16]), 16)
    assert np.all(np.isfinite(z)) and z[1] == 0 and np.isclose(z[0], -z[2])


def test_hybrids_place_adapters_in_role_blocks(make_policy):
    policy, cfg = make_policy("dart")
    base, _ = dart.load_base(cfg)
    shapes = {n: p[: cfg.lora_rank].shape if n.endswith("lora_A") else p[:, : cfg.lora_rank].shape
              for n, p in policy.model.named_parameters() if p.requires_grad}
    torch.manual_seed(1)
    states = {(m, 0): {n: torch.randn(s) * 0.05 for n, s in shapes.items()} for m in leas.TRAINED}
    ids, attention, position, roles = batch_of(policy, n=2)
    with torch.no_grad():
        bare = base(input_ids=ids, attention_mask=attention, position_ids=position).logits
        leas.place_variant(policy, states, "Base", 0)
        assert torch.equal(routed(policy, ids, attention, position, roles), bare)
        leas.place_variant(policy, states, "H_Tool", 0)
        hybrid = routed(policy, ids, attention, position, roles)
    # before the first tool position nothing the tool adapter wrote is visible: the base speaks
    untouched = (roles.cumsum(-1) == 0) & attention.bool()
    assert torch.allclose(hybrid[untouched], bare[untouched], atol=1e-5)
    assert not torch.allclose(hybrid[roles == dart.TOOL], bare[roles == dart.TOOL], atol=1e-3)


def test_role_gradients_and_their_random_halves_add_up_to_the_full_gradient(make_policy):
    """The reasoning and tool gradients of a trajectory add up to its whole gradient, and so do the
    two random halves of a role's tokens (the controls) to that role's gradient; a half set against
    an identical copy of itself has cosine 1."""
    policy, cfg = make_policy("joint", randomize=0.01)
    _, prompts = prompts_for(policy, 16, seed=5)
    batch = dart.rollout(policy, REGISTRY, prompts, cfg, 1.0, torch.Generator().manual_seed(0))
    mask, roles = dart.loss_mask(batch, policy.special, "joint")
    params = [p for p in policy.model.parameters() if p.requires_grad]
    row = int(torch.argmax((mask & (roles == dart.TOOL)).sum(-1)))
    reasoning, tool = mask[row] & (roles[row] == dart.REASONING), mask[row] & (roles[row] == dart.TOOL)
    assert tool.sum() >= 2
    half_a, half_b = leas.random_halves(reasoning, torch.Generator().manual_seed(0))
    assert not (half_a & half_b).any() and torch.equal(half_a | half_b, reasoning)
    assert abs(int(half_a.sum()) - int(half_b.sum())) <= 1
    g_reason, g_tool, g_a, g_b, g_a_again = leas.token_set_gradients(
        policy, batch, row, mask[row], [reasoning, tool, half_a, half_b, half_a], params, 1.0)
    logp, _ = dart.response_logprobs(policy, batch.ids[row:row + 1], batch.attention_mask[row:row + 1],
                                     batch.prompt_len, 1.0)
    full = torch.autograd.grad(-(logp[0] * mask[row]).sum() / mask[row].sum(), params)
    for r, t, a, b, f in zip(g_reason, g_tool, g_a, g_b, full):
        assert torch.allclose(r + t, f, atol=1e-6) and torch.allclose(a + b, r, atol=1e-6)
    flat = lambda grads: torch.cat([g.flatten() for g in grads])
    assert torch.nn.functional.cosine_similarity(flat(g_a), flat(g_a_again), dim=0) == pytest.approx(1.0, abs=1e-4)


def test_the_gradient_finding_is_stated_against_the_matched_controls():
    """Cross-role cosines below both within-trajectory controls read as 'less aligned'; equal to
    them, as 'not less aligned', whatever the angle; and the controls' rows say 'control'."""
    def result(cross, reasoning_halves, tool_halves, n=30):
        rows = {"cross_role": [cross] * n, "reasoning_halves": [reasoning_halves] * n, "tool_halves": [tool_halves] * n,
                "reasoning_across": [0.3] * n, "tool_across": [0.1] * n}
        return {"trajectories": n, "all": rows, "0": rows}
    table = leas.gradient_table([result(0.0, 0.4, 0.2)])
    assert "finding: cross-role is less aligned than same-role within a trajectory" in table
    assert all(("control" in line) == ("halves" in line or "half" in line) for line in table.splitlines()
               if line.startswith(("reasoning", "tool", "control")))
    assert "finding: cross-role is not less aligned" in leas.gradient_table([result(0.0, 0.0, 0.0)])
    assert "less aligned than the reasoning halves, not" in leas.gradient_table([result(0.1, 0.5, 0.1)])


def test_leas_end_to_end_writes_its_report(cfg_factory, tmp_path, monkeypatch, capsys):
    """leas.py trains its three variants where --compare keeps the runs of the same settings (and
    reuses the joint runs a comparison left there), fits, reports, and the second time reuses all."""
    monkeypatch.chdir(tmp_path)
    cfg = cfg_factory(steps=2, questions_per_step=2, group_size=4)
    dart.compare_modes(dataclasses.replace(cfg, modes="joint", seeds=2))
    lcfg = leas.LeasConfig(seeds=2, samples=2, per_family=2, grad_questions=4, grad_rollouts=4, bootstrap=50)
    report = leas.run_leas(cfg, lcfg)
    folder = os.path.join(dart.runs_folder(cfg), f"r{cfg.lora_rank}")
    saved = json.load(open(os.path.join(folder, "leas.json")))
    assert set(saved["effects"]) == set(leas.EFFECTS) and saved["kept"] + len(saved["dropped"]) == 8
    assert len(saved["per_seed"]) == 2 and saved["conclusion"] == report["conclusion"]
    assert [g["trajectories"] >= 2 for g in saved["gradients"]] == [True, True] and report["kept"] == saved["kept"]
    printed = capsys.readouterr().out
    assert "lambda23" in printed and "reasoning vs tool" in printed and "conclusion: " in printed
    assert printed.count("reusing") == 2  # the comparison's two joint runs
    leas.run_leas(cfg, lcfg)  # a second run reuses the six trained variants (three modes, two seeds)
    assert capsys.readouterr().out.count("reusing") == 6


def test_seed_interval_and_conclusion():
    mean, (lo, hi) = leas.seed_interval([1.0, 2.0, 3.0])  # sd 1, t(2) = 4.30
    assert mean == 2.0 and np.isclose(hi - mean, 4.30 / np.sqrt(3)) and np.isclose(mean - lo, hi - mean)
    assert leas.seed_interval([0.5]) == (0.5, None)
    assert leas.conclusion(-1.0, (-1.5, -0.5)).startswith("interference")
    assert leas.conclusion(1.0, (0.5, 1.5)).startswith("synergy")
    assert leas.conclusion(0.2, (-0.5, 0.9)).startswith("no conclusion")
    assert leas.conclusion(0.2, None).startswith("no conclusion")


# ---------------------------------------------------------------------------
# robustness: hostile inputs, garbage policies, interruptions, bad user input

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
    soup = "0123456789+-*/%().eE ,_abcxyzAB<>=![]{}'\"\n\t" + "\u0661\u00b2\u00bd\u221e\u202e\x00\u00e9\u20ac" + "".join(
        WORLD.train_entities[:5])

    def expression(depth):
        if depth == 0 or rng.random() < 0.3:
            return rng.choice([str(rng.randint(0, 10 ** rng.randint(1, 20))), f"{rng.random() * 100:.3f}", "1e9"])
        op = rng.choice(["+", "-", "*", "/", "//", "%", "**"])
        return rng.choice(["{}{}{}", "({}{}{})", "-{}{}{}"]).format(expression(depth - 1), op, expression(depth - 1))

    for i in range(n):
        kind = i % 3
        if kind == 0:
            yield "".join(rng.choice(soup) for _ in range(rng.randint(0, 60)))
        elif kind == 1:
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


def random_policy(cfg):
    """An untrained model with the tiny tokenizer: it writes anything, tags included."""
    tok = dart.build_tokenizer(cfg, WORLD)
    torch.manual_seed(0)
    model = dart.new_tiny_model(dataclasses.replace(cfg, base_dim=32, base_layers=1, base_heads=2), tok).eval()
    routing = dart.attach_dart(model, cfg.lora_rank, cfg.alpha, cfg.targets.split(","), cfg.mode)
    return dart.Policy(model, tok, dart.special_ids(tok), routing, "cpu")


@pytest.mark.parametrize("source", ["random model", "tiny model at temperature 5"])
def test_garbage_policies_neither_crash_nor_break_limits(make_policy, cfg_factory, source):
    cfg = cfg_factory(max_new_tokens=40, max_tool_calls=2, max_obs_tokens=6, questions_per_step=4, group_size=4)
    if source == "random model":
        policy = random_policy(cfg)
    else:
        policy, _ = make_policy("dart", randomize=0.05)
        cfg.temperature = 5.0
    optimizer = dart.make_optimizer(policy, cfg)
    invalid = 0
    for step in range(6):
        metrics, _ = dart.rl_step(policy, optimizer, REGISTRY, WORLD, cfg, step)
        assert math.isfinite(metrics["loss"])
        _, prompts = prompts_for(policy, 8, seed=step)
        out = dart.rollout(policy, REGISTRY, prompts, cfg, cfg.temperature, torch.Generator().manual_seed(step))
        assert_limits_hold(policy, out, cfg)
        invalid += sum(out.invalid_calls)
    assert invalid > 0  # the garbage did reach the tools, as error observations


def test_equal_rewards_give_zero_advantages_and_a_finite_loss(make_policy):
    policy, cfg = make_policy("dart", randomize=0.01, kl_beta=0.0)
    _, prompts = prompts_for(policy, 8, seed=1)
    batch = dart.rollout(policy, REGISTRY, prompts, cfg, 1.0, torch.Generator().manual_seed(0))
    optimizer = dart.make_optimizer(policy, cfg)
    before = dart.adapter_state(policy.model)
    for value in (0.0, 1.0):
        advantages = dart.group_advantages(torch.full((2, 4), value)).flatten()
        assert torch.equal(advantages, torch.zeros(8))
        metrics = dart.grpo_update(policy, optimizer, batch, advantages, cfg)
        assert metrics["loss"] == 0.0 and metrics["skipped"] == 0
    after = dart.adapter_state(policy.model)
    assert all(torch.equal(before[k], after[k]) for k in before)  # a fresh optimizer: nothing to learn, nothing moves


def test_non_finite_loss_skips_the_step_and_keeps_the_adapters(make_policy):
    policy, cfg = make_policy("dart", randomize=0.01)
    _, prompts = prompts_for(policy, 8, seed=1)
    batch = dart.rollout(policy, REGISTRY, prompts, cfg, 1.0, torch.Generator().manual_seed(0))
    optimizer = dart.make_optimizer(policy, cfg)
    before = dart.adapter_state(policy.model)
    advantages = torch.ones(8)
    advantages[int(batch.written_by_policy.any(-1).nonzero()[0])] = float("nan")  # poison a row that carries loss
    metrics = dart.grpo_update(policy, optimizer, batch, advantages, cfg)
    assert metrics["skipped"] == 1
    after = dart.adapter_state(policy.model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    metrics = dart.grpo_update(policy, optimizer, batch, torch.ones(8), cfg)  # and training goes on
    assert metrics["skipped"] == 0 and not all(torch.equal(before[k], v) for k, v in dart.adapter_state(policy.model).items())


def run_files(run_dir):
    from safetensors.torch import load_file
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return f.read(), load_file(os.path.join(run_dir, "adapters.safetensors"))


SHORT = dict(steps=4, save_every=2, eval_every=2, questions_per_step=2, group_size=4)


def test_same_seed_same_metrics(cfg_factory, tmp_path):
    first = run_files(dart.train(cfg_factory(out=str(tmp_path / "a"), **SHORT), report=False))
    second = run_files(dart.train(cfg_factory(out=str(tmp_path / "b"), **SHORT), report=False))
    assert first[0] == second[0]
    assert all(torch.equal(first[1][k], second[1][k]) for k in first[1])


def test_resume_after_a_kill_reproduces_the_uninterrupted_run(cfg_factory, tmp_path, monkeypatch):
    straight = run_files(dart.train(cfg_factory(out=str(tmp_path / "straight"), **SHORT), report=False))
    cut = str(tmp_path / "cut")
    real_step = dart.rl_step

    def killed_during_step_3(policy, optimizer, registry, world, cfg, step):
        if step == 3:
            raise KeyboardInterrupt  # after the checkpoint written at the end of step 1
        return real_step(policy, optimizer, registry, world, cfg, step)

    monkeypatch.setattr(dart, "rl_step", killed_during_step_3)
    with pytest.raises(KeyboardInterrupt):
        dart.train(cfg_factory(out=cut, **SHORT), report=False)
    monkeypatch.undo()
    assert not os.path.exists(os.path.join(cut, "results.md"))
    dart.main([f"--resume={cut}"])  # the command line a user would type
    resumed = run_files(cut)
    assert resumed[0] == straight[0]
    assert all(torch.equal(resumed[1][k], straight[1][k]) for k in straight[1])


def one_line_exit(main, argv):
    """What a command line prints for bad input: one sentence, no traceback."""
    with pytest.raises(SystemExit) as stop:
        main(argv)
    message = str(stop.value.code)
    assert message.startswith("error: ") and "\n" not in message and "Traceback" not in message
    return message


def test_bad_user_input_stops_with_one_clear_sentence(cfg_factory, tmp_path):
    assert "--steps" in one_line_exit(dart.main, ["--stpes=3"])
    assert "--seed" in one_line_exit(dart.main, ["-seed=3"])
    assert "int" in one_line_exit(dart.main, ["--steps=three"])
    assert "bool" in one_line_exit(dart.main, ["--scale_std=maybe"])
    assert "joint2r" in one_line_exit(dart.main, ["--mode=dartt"])
    assert "--steps" in one_line_exit(dart.main, ["--steps"])
    missing = str(tmp_path / "no-such-model")
    assert missing in one_line_exit(dart.main, [f"--model={missing}", f"--out={tmp_path / 'm'}"])
    assert "not a run directory" in one_line_exit(dart.main, [f"--resume={tmp_path}"])
    run = dart.train(cfg_factory(out=str(tmp_path / "run"), steps=1, questions_per_step=1), report=False)
    with open(os.path.join(run, "checkpoint.pt"), "wb") as f:
        f.write(b"not a checkpoint")
    assert "checkpoint.pt" in one_line_exit(dart.main, [f"--resume={run}"])
    assert "grad" in one_line_exit(leas.main, ["gradient"])
    bad_leas_flag = one_line_exit(leas.main, ["--sample=4"])  # names leas.py's options and dart.py's
    assert "--samples" in bad_leas_flag and "--steps" in bad_leas_flag


# one value out of range for every numeric option: refused as the command line is read
BAD_VALUES = {
    "steps": 0, "seed": -1, "lora_rank": 0, "alpha": 0, "lora_dropout": 1.0, "questions_per_step": 0,
    "group_size": 1, "lr": 0, "warmup_steps": -1, "temperature": 0, "clip_eps": 1.5, "kl_beta": -0.1,
    "updates_per_batch": 0, "micro_batch": 0, "max_grad_norm": 0, "format_bonus": 1.0, "max_new_tokens": 0,
    "max_tool_calls": -1, "max_arg_tokens": 0, "max_obs_tokens": 0, "eval_every": 0, "eval_per_family": 0,
    "save_every": 0, "base_dim": 0, "base_layers": 0, "base_heads": 0, "base_vocab": 0, "base_steps": 0,
    "base_batch": 0, "base_lr": -1e-3, "base_seed": -2, "warm_start": -1, "warm_batch": 0, "warm_lr": 0,
    "seeds": 0, "samples": 0, "per_family": 0, "bootstrap": 10, "grad_questions": 0, "grad_rollouts": 0,
}


def numeric_options(config_class):
    return {f.name for f in dataclasses.fields(config_class) if f.type in (int, float)}


def nothing_may_be_built(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded for a command line that should have been refused")
    monkeypatch.setattr(dart, "load_base", refuse)


@pytest.mark.parametrize("option", sorted(BAD_VALUES))
def test_every_numeric_option_is_checked_at_the_door(option, tmp_path, monkeypatch):
    """An out-of-range value stops the command at once, naming the option, the value and what is
    allowed, before any model is built or any file written."""
    assert set(BAD_VALUES) == numeric_options(dart.Config) | numeric_options(leas.LeasConfig)
    monkeypatch.chdir(tmp_path)
    nothing_may_be_built(monkeypatch)
    main = leas.main if option in numeric_options(leas.LeasConfig) else dart.main
    message = one_line_exit(main, [f"--{option}={BAD_VALUES[option]}"])
    assert f"--{option}" in message and str(BAD_VALUES[option]) in message
    assert re.search(r"must be (at least|above|in \[)", message), message
    assert os.listdir(tmp_path) == []


def test_combinations_and_the_rest_are_checked_at_the_door(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    nothing_may_be_built(monkeypatch)
    assert "multiple of --base_heads" in one_line_exit(dart.main, ["--base_dim=190"])
    for odd_heads in ("--base_dim=12", "--base_dim=20"):  # heads of size 3 and 5: rotary embeddings need even ones
        assert "even" in one_line_exit(dart.main, [odd_heads, "--base_heads=4"])
    assert "no linear layer named qproj" in one_line_exit(dart.main, ["--targets=q_proj,qproj"])
    assert "bfloat16-rounded" in one_line_exit(dart.main, ["--dtype=bfloat16", "--train_dtype=float32"])
    absent = [d for d, there in (("cuda", torch.cuda.is_available()), ("mps", torch.backends.mps.is_available()))
              if not there]
    for device in absent:
        assert f"no {device} device" in one_line_exit(dart.main, [f"--device={device}"])
    assert "separate commands" in one_line_exit(dart.main, ["--compare", "--bench"])
    assert "comma-separated list" in one_line_exit(dart.main, ["--compare", "--modes=dart,jointt"])
    assert "float" in one_line_exit(dart.main, ["--lr=nan"])
    assert "--grad_questions" in one_line_exit(leas.main, ["--per_family=2", "--grad_questions=7"])
    assert os.listdir(tmp_path) == []


def test_bad_files_are_refused_in_one_line_and_the_run_is_left_as_it_was(cfg_factory, tmp_path, monkeypatch):
    """Empty and corrupt run directories for --resume and --export_peft, a checkpoint of another mode,
    an --out that holds a run: one line each, and the files of the run stay as they were."""
    run = dart.train(cfg_factory(out=str(tmp_path / "run"), steps=1, questions_per_step=1), report=False)
    files = {name: open(os.path.join(run, name), "rb").read() for name in os.listdir(run)}
    empty = tmp_path / "empty"
    empty.mkdir()
    for command in ("--resume", "--export_peft"):
        assert "not a run directory" in one_line_exit(dart.main, [f"{command}={empty}"])
    broken = tmp_path / "broken"
    broken.mkdir()
    for content in ("{not json", '{"steps": 3, "no_such_option": 1}', '{"steps": "three"}', '{"steps": 0}'):
        (broken / "config.json").write_text(content)
        for command in ("--resume", "--export_peft"):
            assert "config.json" in one_line_exit(dart.main, [f"{command}={broken}"])
    assert "already holds a run" in one_line_exit(dart.main, [f"--out={run}", f"--cache_dir={tmp_path}"])
    assert "--mode would change" in one_line_exit(dart.main, [f"--resume={run}", "--mode=joint"])
    assert "cosine" in one_line_exit(dart.main, [f"--resume={run}", "--steps=5"])  # would reshape the schedule
    checkpoint = os.path.join(run, "checkpoint.pt")
    for damage in (files["checkpoint.pt"][:1000], b""):  # truncated, empty
        open(checkpoint, "wb").write(damage)
        assert "checkpoint.pt" in one_line_exit(dart.main, [f"--resume={run}"])
    other = torch.load(io.BytesIO(files["checkpoint.pt"]), weights_only=True)
    other["identity"]["mode"] = "joint"  # as if the file came from a joint run
    torch.save(other, checkpoint)
    assert "another run" in one_line_exit(dart.main, [f"--resume={run}"])
    other.pop("identity")  # a file without the identity: the shapes still tell
    other["adapters"] = {k: v[..., :1] for k, v in other["adapters"].items()}
    torch.save(other, checkpoint)
    assert "shape" in one_line_exit(dart.main, [f"--resume={run}"])
    open(checkpoint, "wb").write(files["checkpoint.pt"])
    open(os.path.join(run, "adapters.safetensors"), "wb").write(b"garbage")
    assert "adapters.safetensors" in one_line_exit(dart.main, [f"--export_peft={run}"])
    open(os.path.join(run, "adapters.safetensors"), "wb").write(files["adapters.safetensors"])
    assert {name: open(os.path.join(run, name), "rb").read() for name in os.listdir(run)} == files


def test_a_failed_model_load_leaves_nothing_behind(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    missing = str(tmp_path / "no-such-model")
    assert missing in one_line_exit(dart.main, [f"--model={missing}"])
    garbage = tmp_path / "garbage-model"
    garbage.mkdir()
    (garbage / "config.json").write_text("{not json")
    assert "cannot load --model" in one_line_exit(dart.main, [f"--model={garbage}"])
    assert sorted(os.listdir(tmp_path)) == ["garbage-model"]


def test_library_functions_raise_instead_of_exiting(cfg_factory, tmp_path):
    """Copied into another program, nothing calls sys.exit: errors are exceptions."""
    with pytest.raises(dart.DartError, match="no such directory"):
        dart.load_policy(cfg_factory(model=str(tmp_path / "no-such-model")))
    with pytest.raises(dart.DartError, match="--targets=nothing_here"):
        dart.load_policy(cfg_factory(targets="nothing_here"))
    with pytest.raises(ValueError, match="no linear layer named"):
        dart.attach_dart(torch.nn.Sequential(torch.nn.Linear(2, 2)), targets=("q_proj",))
    with pytest.raises(dart.DartError, match="unknown option"):
        dart.parse_args(["--stpes=3"])


def test_every_option_has_help(capsys):
    dart.main(["--help"])
    printed = capsys.readouterr().out
    for f in dataclasses.fields(dart.Config):
        line = next(line for line in printed.splitlines() if line.strip().startswith(f"--{f.name}="))
        assert len(line.split(None, 1)) == 2 and f.metadata["help"] in line
    leas.main(["--help"])
    printed = capsys.readouterr().out
    assert all(f"--{f.name}=" in printed for f in dataclasses.fields(leas.LeasConfig))


def test_learning_rate_schedule():
    cfg = dart.Config(lr=1.0, steps=11, warmup_steps=5)
    assert [dart.learning_rate(cfg, s) for s in range(5)] == pytest.approx([0.2 * k * (0.1 + 0.9 * 0.5 * (
        1 + math.cos(math.pi * (k - 1) / 10))) for k in range(1, 6)])  # warmup times the decay
    assert dart.learning_rate(cfg, 10) == pytest.approx(0.1)  # 10% of the peak at the last step
    rates = [dart.learning_rate(cfg, s) for s in range(4, 11)]
    assert rates == sorted(rates, reverse=True)  # decays after the warmup
    constant = dataclasses.replace(cfg, lr_schedule="constant", warmup_steps=0)
    assert {dart.learning_rate(constant, s) for s in range(11)} == {1.0}


def test_micro_batching_does_not_change_the_gradient(make_policy):
    grads = []
    for micro_batch in (64, 3):  # 3 splits the groups of 2 and cuts each micro-batch to its own length
        policy, cfg = make_policy("dart", randomize=0.02, micro_batch=micro_batch, loss_agg="seq_mean")
        _, prompts = prompts_for(policy, 4, seed=8)
        prompts = [p for p in prompts for _ in range(2)]
        batch = dart.rollout(policy, REGISTRY, prompts, cfg, 1.0, torch.Generator().manual_seed(0))
        dart.grpo_update(policy, dart.make_optimizer(policy, cfg), batch, torch.linspace(-1, 1, 8), cfg)
        grads.append({n: p.grad.clone() for n, p in policy.model.named_parameters() if p.requires_grad})
    assert all(torch.allclose(grads[0][k], grads[1][k], rtol=1e-4, atol=1e-9) for k in grads[0])


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
    with policy.update_precision():
        assert {m.weight.dtype for m in frozen_linears(model)} == {torch.bfloat16}  # the output layer too
        assert model.get_input_embeddings().weight is embedding and embedding.dtype == torch.float32
    assert {m.weight.dtype for m in frozen_linears(model)} == {torch.float32}
    assert model.get_output_embeddings().weight is embedding
    before, after = None, []
    for cast_once in (True, False):
        if not cast_once:  # autocast casts every time
            monkeypatch.setattr(dart, "hold_frozen_linears", lambda model, dtype: (lambda: None))
        policy, cfg = make_policy("dart", randomize=0.02, train_dtype="bfloat16", micro_batch=3)
        _, prompts = prompts_for(policy, 4, seed=8)
        prompts = [p for p in prompts for _ in range(2)]
        batch = dart.rollout(policy, REGISTRY, prompts, cfg, 1.0, torch.Generator().manual_seed(0))
        before = dart.adapter_state(policy.model)
        dart.grpo_update(policy, dart.make_optimizer(policy, cfg), batch, torch.linspace(-1, 1, 8), cfg)
        after.append(dart.adapter_state(policy.model))
        assert {p.dtype for p in policy.model.parameters()} == {torch.float32}
    assert any(not torch.equal(before[k], after[0][k]) for k in before)  # the update did move the adapters
    assert all(torch.equal(after[0][k], after[1][k]) for k in before)


def test_no_tool_call_means_no_valid_call_share(make_policy):
    """A policy that never calls a tool has no share of valid calls: reported as n/a, not 100%."""
    tiny, cfg = make_policy("dart")
    tasks = [toy_tasks.sample_task(random.Random(0), WORLD, "test", family) for family in toy_tasks.FAMILIES]
    policy = dart.Policy(ScriptedModel(tiny.tok, tiny.special, ["No tool. <answer>7</answer>"] * 4), tiny.tok,
                         tiny.special, dart.Routing("dart", 2, 4.0, "cpu"), "cpu")
    metrics = {f"test_{k}": v for k, v in dart.evaluate(policy, REGISTRY, tasks, cfg).items()}
    assert metrics["test_tool_calls"] == 0 and metrics["test_valid_calls"] is None
    assert re.search(r"\| valid tool calls +\| +n/a \| +n/a \|", dart.results_table(metrics, metrics))
    assert dart.mean_std([None], 100) == "n/a" and dart.mean_std([0.5, None, 1.0], 100) == "75±35"


def test_reason_only_and_tool_only_train_their_own_tokens(scripted):
    out, policy = scripted(["Compute it. <calc>2+3</calc><answer>5</answer>"])
    response = out.ids[0, out.prompt_len:]
    trained = {mode: policy.tok.decode(response[dart.loss_mask(out, policy.special, mode)[0][0]].tolist())
               for mode in ("reason_only", "tool_only", "dart")}
    assert trained["tool_only"] == "2+3</calc>"           # the argument and the closing tag
    assert trained["reason_only"] == "Compute it. <calc><answer>5</answer>"  # the decision to call, the answer
    assert trained["dart"] == "Compute it. <calc>2+3</calc><answer>5</answer>"  # everything the policy wrote


def test_lora_dropout_acts_in_updates_only(make_policy):
    policy, cfg = make_policy("dart", randomize=0.05, lora_dropout=0.5)
    _, prompts = prompts_for(policy, 8, seed=6)
    first = dart.rollout(policy, REGISTRY, prompts, cfg, 1.0, torch.Generator().manual_seed(0))
    second = dart.rollout(policy, REGISTRY, prompts, cfg, 1.0, torch.Generator().manual_seed(0))
    assert torch.equal(first.ids, second.ids) and torch.equal(first.logprobs, second.logprobs)
    with torch.no_grad():
        plain, _ = dart.response_logprobs(policy, first.ids, first.attention_mask, first.prompt_len, 1.0)
        with dart.lora_dropout_on(policy.model):
            dropped, _ = dart.response_logprobs(policy, first.ids, first.attention_mask, first.prompt_len, 1.0)
    assert torch.allclose(plain[first.written_by_policy], first.logprobs[first.written_by_policy], atol=1e-4)
    assert not torch.allclose(dropped[first.written_by_policy], first.logprobs[first.written_by_policy], atol=1e-3)


# ---------------------------------------------------------------------------
# the layer outside this repository: a README snippet, PEFT files


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


def readme_code(section):
    """The first python block of a README section, exactly as printed."""
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "README.md")) as f:
        text = f.read()
    body = text.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", body, re.DOTALL).group(1)


def layer_block():
    """The lines of dart.py between its two marker lines, exactly as a reader would copy them."""
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "dart.py")) as f:
        text = f.read()
    return text[text.index("# >>> DART layer\n"):text.index("# <<< DART layer\n")]


def test_the_layer_block_pastes_alone_and_the_readme_snippet_routes_like_the_engine(small_hf_folder, tmp_path,
                                                                                     monkeypatch):
    """The block between the markers runs in an empty namespace (it imports torch and the standard
    library, nothing of this repository or of transformers); then the README's "Use the DART layer
    in your own code" snippet, run verbatim after it on a small model saved under the hub name it
    loads (from_pretrained takes a local folder of that name first), trains both adapters, and its
    generate() with the role hook produces the logits of dart.py's engine."""
    import shutil
    block = layer_block()
    assert set(re.findall(r"^(?:from|import) (\w+)", block, re.M)) <= {"contextlib", "dataclasses", "math", "torch"}
    code = readme_code("Use the DART layer in your own code")
    name = re.search(r'name = "(.+?)"', code).group(1)
    shutil.copytree(small_hf_folder, tmp_path / name)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pasted = {"__name__": "pasted"}
    exec(block, pasted)
    exec(code, pasted)
    model, tok, routing = (pasted[k] for k in ("model", "tok", "routing"))
    assert all(len(tok.encode(tag, add_special_tokens=False)) == 1 for tag in dart.TAGS)
    # its training step reached both adapters: the trajectory it trains on has both roles
    moved = [block_view(SimpleNamespace(model=model, routing=routing), b) for b in (R, T)]
    assert all(any(v.abs().sum() > 0 for k, v in m.items() if k.endswith("lora_B")) for m in moved)
    with torch.no_grad():  # adapters far from zero, so that a wrongly routed token changes the logits
        generator = torch.Generator().manual_seed(0)
        for p in model.parameters():
            if p.requires_grad:
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
        attention = torch.ones_like(sequence)
        with torch.no_grad():
            engine = policy.logits(sequence, attention, dart.position_ids(attention),
                                   dart.token_roles(sequence, special.spans))
        generated = torch.stack(out.logits, 1)[0]
        assert torch.allclose(generated, engine[0, len(prompt) - 1:-1], atol=1e-4)
        # and the engine, sampling greedily itself, writes the same tokens until its first observation
        rolled = dart.rollout(policy, REGISTRY, [prompt], dataclasses.replace(dart.Config(), max_new_tokens=12), 0)
        by_policy = rolled.written_by_policy[0]
        agree = int(by_policy.long().cumprod(0).sum())
        written = slice(len(prompt), len(prompt) + agree)
        assert agree > 0 and torch.equal(rolled.ids[0, written], sequence[0, written])


def saved_run(policy, cfg, out):
    """A run directory holding config.json and a checkpoint of `policy`'s adapters."""
    cfg.out = str(out)
    dart.RunFiles(cfg, 0)
    dart.save_checkpoint(cfg.out, policy, dart.make_optimizer(policy, cfg), cfg, 1)
    return cfg.out


def test_peft_export_files_and_merged_logits(make_policy, cfg_factory, tmp_path):
    """Each exported adapter has PEFT's file names, key names and shapes, and merged the way PEFT
    merges a LoRA (W + lora_alpha / r * B A) gives the logits DART gives with every token in its role."""
    from safetensors.torch import load_file
    policy, cfg = make_policy("dart", randomize=0.05)
    saved_run(policy, cfg, tmp_path / "run")
    dart.main([f"--export_peft={cfg.out}"])
    folders = [os.path.join(cfg.out, "peft", name) for name in ("reasoning", "tool")]
    ids, attention, position, _ = batch_of(policy)
    targets = set(cfg.targets.split(","))
    for role, folder in zip((R, T), folders):
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


# ---------------------------------------------------------------------------
# results that hold: format health, the no-signal warning, paired differences, warnings


def test_format_health_and_the_no_signal_warning(cfg_factory, tmp_path, capsys):
    """A policy that never answers (two new tokens: no room for <answer>) gets a one-line warning
    after three steps of zero-variance groups; a policy that learns does not."""
    mute = dart.train(cfg_factory(out=str(tmp_path / "mute"), steps=3, max_new_tokens=2, questions_per_step=2,
                                  eval_per_family=1), report=False)
    printed = capsys.readouterr().out
    assert "warning: no learning signal" in printed and "--warm_start" in printed
    assert "0% of answers well-formed" in printed  # the first evaluation's format health
    records = [json.loads(line) for line in open(os.path.join(mute, "metrics.jsonl"))]
    assert all(r["zero_variance_groups"] == 1 and r["answered"] == 0 for r in records if "reward" in r)
    assert records[0]["test_answered"] == 0 and records[0]["test_called_tool"] == 0
    dart.train(cfg_factory(out=str(tmp_path / "speaks"), steps=3, questions_per_step=2, eval_per_family=1),
               report=False)
    assert "no learning signal" not in capsys.readouterr().out


def test_paired_difference_interval():
    ones, zeros = np.ones((3, 40)), np.zeros((3, 40))
    assert dart.paired_difference(ones, zeros) == (100.0, (100.0, 100.0))
    assert dart.paired_difference(ones, ones) == (0.0, (0.0, 0.0))
    rng = np.random.default_rng(0)
    a, b = np.zeros((3, 200)), np.zeros((3, 200))
    for row in a:
        row[rng.choice(200, 20, replace=False)] = 1  # 10 points better on every seed: detected
    mean, (lo, hi) = dart.paired_difference(a, b)
    assert mean == 10 and 0 < lo < 10 < hi
    a[2], b[2, rng.choice(200, 40, replace=False)] = 0, 1  # a third seed 20 points worse: no finding
    mean, (lo, hi) = dart.paired_difference(a, b)
    assert abs(mean) < 1e-9 and lo < 0 < hi
    runs = lambda rows: [{"final": {"test_correct": list(r)}} for r in rows]
    assert dart.difference_line({"dart": runs(a), "joint": runs(b)}, "dart", "joint").endswith(
        "no detectable difference at this budget")
    assert dart.difference_line({"dart": runs(ones), "joint": runs(zeros)}, "dart", "joint").endswith(
        "dart is better at this budget")


def test_the_sweep_table_and_chart_from_fake_runs():
    """One row per rank: each mode's mean±std over seeds and dart's paired differences; the chart
    marks each interval, its mean and zero."""
    def runs(rows):
        return [{"final": {"test_acc": float(np.mean(r)), "test_correct": list(r)}} for r in rows]
    ones, halves = np.ones((2, 10)), np.tile([1, 0], (2, 5))
    results = {1: {"joint": runs(halves), "dart": runs(ones)}, 8: {"joint": runs(ones), "dart": runs(ones)}}
    table = dart.sweep_table(results, ["joint", "dart"], [1, 8]).splitlines()
    assert table[0] == "| LoRA rank r | joint | dart | dart - joint |"
    mean, (lo, hi) = dart.paired_difference(ones, halves)
    assert table[2] == f"| 1 | 50±0 | 100±0 | +50.0 [{lo:+.1f}, {hi:+.1f}] |" and lo > 0
    assert table[3] == "| 8 | 100±0 | 100±0 | +0.0 [+0.0, +0.0] |"
    chart = dart.interval_chart([("r=1", 5.0, (1.0, 9.0)), ("r=8", -1.0, (-3.0, 1.0))], width=13).splitlines()
    assert chart[0] == "     r=1    |[---*---]  +5.0 [+1.0, +9.0]"  # one column a point, from -3 to +9
    assert chart[1] == "     r=8 [-*|]          -1.0 [-3.0, +1.0]" and chart[2].split() == ["-3", "+9"]


def test_compare_sweeps_ranks_and_reuses_finished_runs(cfg_factory, tmp_path, monkeypatch, capsys):
    """--compare --ranks trains each (rank, mode, seed) once, with alpha/r kept, prints a row per rank
    and the chart; the same command again trains nothing, and one with another mode trains only it."""
    cfg = cfg_factory(compare=True, ranks="1,2", modes="joint,dart", seeds=1, steps=1, eval_every=1,
                      questions_per_step=1, out=str(tmp_path / "sweep"))
    dart.compare_modes(cfg)
    printed = capsys.readouterr().out
    assert "| LoRA rank r | joint | dart | dart - joint |" in printed and "dart - joint against the LoRA rank" in printed
    assert json.load(open(tmp_path / "sweep" / "r2" / "dart-s0" / "config.json"))["alpha"] == 2 * cfg.alpha / cfg.lora_rank
    trained = []
    monkeypatch.setattr(dart, "train", lambda run, report=True: trained.append(run.out) or pytest.fail("retrained"))
    dart.compare_modes(cfg)
    assert capsys.readouterr().out.count("reusing") == 4 and not trained
    monkeypatch.undo()
    dart.compare_modes(dataclasses.replace(cfg, ranks="1", modes="joint,dart,joint2r"))
    assert capsys.readouterr().out.count("reusing") == 2


def test_no_deprecation_warnings_from_the_libraries(make_policy, cfg_factory, tmp_path):
    """A run (rollouts, update, evaluation) and model.generate warn of nothing deprecated."""
    import warnings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dart.train(cfg_factory(out=str(tmp_path / "run"), steps=1, questions_per_step=2, eval_per_family=1),
                   report=False)
        policy, _ = make_policy("dart")
        ids = torch.tensor([dart.prompt_ids(policy.tok, "What is 2 plus 3?")])
        policy.routing.gate = policy.routing.table[dart.REASONING]  # one gate for every token
        policy.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False,
                              pad_token_id=policy.special.pad)
    deprecated = [str(w.message) for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))]
    assert deprecated == []


# ---------------------------------------------------------------------------
# the GPU path, checked on a CPU: what a GPU would pay for (syncs, casts, devices)


def count_reads(monkeypatch):
    """Counts, per dart.py function, the reads of tensor values into Python. On a GPU each is a
    sync: the host waits until the device has finished everything queued before it."""
    import collections
    import sys
    reads = collections.Counter()
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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("mode", dart.MODES)
def test_gpu_rollout_logprobs_agree_with_training_in_bfloat16(make_policy, mode):
    """On a GPU in bfloat16 the engine's log-probs agree with the training forward's to bfloat16's
    rounding (a one-token decode step and a whole-sequence forward run different kernels, so not to
    1e-4 as in float32), and both route every position alike."""
    policy, cfg = make_policy(mode, randomize=0.02, device="cuda", dtype="bfloat16")
    _, prompts = prompts_for(policy, 4, seed=3)
    out = dart.rollout(policy, REGISTRY, [p for p in prompts for _ in range(3)], cfg, 1.0,
                       torch.Generator("cuda").manual_seed(0))
    with torch.no_grad(), policy.update_precision():
        logp, _ = dart.response_logprobs(policy, out.ids, out.attention_mask, out.prompt_len, 1.0)
    gap = (logp - out.logprobs)[out.written_by_policy].abs()
    assert gap.mean() < 0.05 and gap.max() < 1.0, (gap.mean(), gap.max())
    assert torch.equal(out.roles[out.attention_mask.bool()],
                       dart.token_roles(out.ids, policy.special.spans)[out.attention_mask.bool()])


def test_rollout_and_update_read_the_device_once_per_step(make_policy, monkeypatch):
    """The engine reads the device once per decode step (the sampled tokens), plus the finished
    batch at the end; the update plans its micro-batches from two reads before it starts, then
    reads once per pass (is the loss finite?), never inside its loop over micro-batches."""
    policy, cfg = make_policy("dart", randomize=0.02, micro_batch=3)
    _, prompts = prompts_for(policy, 4, seed=2)
    reads = count_reads(monkeypatch)
    batch = dart.rollout(policy, REGISTRY, [p for p in prompts for _ in range(3)], cfg, 1.0,
                         torch.Generator().manual_seed(0))
    steps = batch.written_by_policy.shape[1]
    lengths = batch.attention_mask[:, batch.prompt_len:].sum(-1)
    assert len(set(lengths.tolist())) > 1  # rows finished at different steps
    assert dict(reads) == {"rollout": steps + 2}
    reads.clear()
    for passes in (1, 2):
        cfg.updates_per_batch = passes
        dart.grpo_update(policy, dart.make_optimizer(policy, cfg), batch, torch.linspace(-1, 1, 12), cfg)
        assert reads.pop("grpo_update") == passes and reads.pop("micro_batches") == 2
        assert set(reads) <= {"metrics"}  # the log, read after the update's work is done
        reads.clear()


def test_a_resumed_optimizer_state_lives_where_a_fresh_ones_does(make_policy, tmp_path, monkeypatch):
    """AdamW keeps its step counts on the host; a checkpoint is read onto the CPU and the optimizer
    moves the rest to the adapters' device, so a resumed run's state is laid out as a fresh one's
    (loaded straight onto a GPU, every optimizer step would sync on each step count)."""
    policy, cfg = make_policy("dart", randomize=0.02)
    fresh = dart.make_optimizer(policy, cfg)
    _, prompts = prompts_for(policy, 2, seed=1)
    batch = dart.rollout(policy, REGISTRY, [p for p in prompts for _ in range(2)], cfg, 1.0,
                         torch.Generator().manual_seed(0))
    dart.grpo_update(policy, fresh, batch, torch.linspace(-1, 1, 4), cfg)
    saved_run(policy, cfg, tmp_path / "run")
    dart.save_checkpoint(cfg.out, policy, fresh, cfg, 1)
    locations = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: locations.append(k.get("map_location")) or real_load(*a, **k))
    resumed = dart.make_optimizer(policy, cfg)
    assert dart.load_checkpoint(cfg.out, policy, resumed, cfg) == 1 and locations == ["cpu"]
    layout = lambda opt: [(k, v.device, v.dtype) for s in opt.state.values() for k, v in sorted(s.items())]
    assert layout(resumed) == layout(fresh) and layout(fresh)


def test_resume_and_export_use_the_base_the_run_recorded(cfg_factory, tmp_path, monkeypatch):
    """config.json records the cached base a run trained on; --resume and --export_peft use it even
    when today's settings would name another one (as the warm-start dtype does on another device)."""
    run = dart.train(cfg_factory(out=str(tmp_path / "run"), steps=1, questions_per_step=1, lr_schedule="constant"),
                     report=False)
    recorded = json.load(open(os.path.join(run, "config.json")))["cached_base"]
    assert os.path.isfile(os.path.join(recorded, "base.json"))
    monkeypatch.setattr(dart, "base_path", lambda cfg: str(tmp_path / "another-base"))
    dart.main([f"--export_peft={run}"])
    config = json.load(open(os.path.join(run, "peft", "reasoning", "adapter_config.json")))
    assert config["base_model_name_or_path"] == recorded
    dart.main([f"--resume={run}", "--steps=2"])  # a constant learning rate lets a run go on
    assert [json.loads(line)["step"] for line in open(os.path.join(run, "metrics.jsonl"))] == [0, 1, 2]
    assert not os.path.exists(tmp_path / "another-base")


def test_a_run_whose_base_is_gone_is_resumed_exported_and_reused(cfg_factory, tmp_path, monkeypatch):
    """Once the cached base a run recorded is deleted, --export_peft still writes the adapters (it
    needs no base), leas.py still reuses the finished run, and --resume rebuilds the base where it
    was: the settings that built it are the run's own."""
    cache = tmp_path / "cache"
    shutil.copytree(cfg_factory().cache_dir, cache)
    run = dart.train(cfg_factory(out=str(tmp_path / "run"), cache_dir=str(cache), **SHORT), report=False)
    recorded = json.load(open(os.path.join(run, "config.json")))["cached_base"]
    kept = shutil.move(recorded, tmp_path / "kept-base")
    dart.main([f"--export_peft={run}"])
    assert os.path.isfile(os.path.join(run, "peft", "reasoning", "adapter_model.safetensors"))
    dart.train_or_reuse(dart.saved_config(run))  # a finished run: reused, not retrained
    assert not os.path.exists(recorded)
    rebuilt = []

    def build_again(cfg, device):  # stands in for the minutes of the warm start: the base as it was
        rebuilt.append(cfg.cached_base)
        from transformers import AutoModelForCausalLM, AutoTokenizer
        return AutoModelForCausalLM.from_pretrained(kept), AutoTokenizer.from_pretrained(kept)
    monkeypatch.setattr(dart, "build_tiny_base", build_again)
    dart.main([f"--resume={run}"])
    assert rebuilt == [recorded] and os.path.isfile(os.path.join(recorded, "base.json"))


def test_sampling_precision_holds_the_frozen_weights_in_it(make_policy, monkeypatch):
    """--dtype=bfloat16 (auto on a GPU that computes it natively): the frozen linear weights are held
    in bfloat16 from loading on, and give exactly the logits of float32 weights that autocast casts
    in every forward; the embedding table stays float32, and an update in the same precision casts
    nothing more."""
    held, cfg = make_policy("dart", randomize=0.02, dtype="bfloat16")
    assert {m.weight.dtype for m in frozen_linears(held.model)} == {torch.bfloat16}
    assert held.model.get_input_embeddings().weight.dtype == torch.float32
    casts = []
    monkeypatch.setattr(dart, "hold_frozen_linears", lambda model, dtype: casts.append(dtype) or (lambda: None))
    with held.update_precision():
        assert casts == []
    cast_each_time, _ = make_policy("dart", randomize=0.02, dtype="bfloat16")
    assert {m.weight.dtype for m in frozen_linears(cast_each_time.model)} == {torch.float32}
    ids, attention, position, roles = batch_of(held)
    with torch.no_grad():
        assert torch.equal(routed(held, ids, attention, position, roles),
                           routed(cast_each_time, ids, attention, position, roles))


def test_auto_precision_is_bfloat16_only_where_the_gpu_computes_it(monkeypatch):
    cfg = dart.Config()
    assert dart.autocast_dtypes(cfg, "cpu") == (None, None)
    for native, expected in ((True, torch.bfloat16), (False, None)):  # False: a T4, V100 or Turing laptop
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: native or
                            including_emulation)
        assert dart.autocast_dtypes(cfg, "cuda") == (expected, expected)
    assert dart.autocast_dtypes(dataclasses.replace(cfg, train_dtype="bfloat16"), "cpu") == (None, torch.bfloat16)


def test_tags_take_spare_embedding_rows_before_the_matrix_grows(small_hf_folder):
    """A model whose embedding matrix has rows beyond its tokenizer (Qwen2.5: 151,936 for 151,665)
    keeps its size, so that the output layer stays on the GPU's tile sizes; a full one grows by
    exactly the tags. Either way every new tag's row is the mean of its text's pieces."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    for spare in (0, 64):
        tok = AutoTokenizer.from_pretrained(small_hf_folder)
        model = AutoModelForCausalLM.from_pretrained(small_hf_folder)
        model.resize_token_embeddings(len(tok) + spare)
        pieces = {tag: tok.encode(tag, add_special_tokens=False) for tag in dart.TAGS}
        rows = model.get_input_embeddings().weight.detach().clone()
        dart.add_tag_tokens(model, tok)
        size = model.get_input_embeddings().weight.shape[0]
        assert size == (len(tok) + spare - len(dart.TAGS) if spare else len(tok))
        for tag in dart.TAGS:
            assert torch.allclose(model.get_input_embeddings().weight[tok.convert_tokens_to_ids(tag)],
                                  rows[pieces[tag]].mean(0))


# ---------------------------------------------------------------------------
# data parallel (torchrun): N processes take exactly one process's step


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rows_of(batch, rows):
    """A share of a batch of rollouts: the rows one process would have rolled out."""
    pick = lambda values: [values[i] for i in rows]
    return dart.Rollout(ids=batch.ids[rows], attention_mask=batch.attention_mask[rows], roles=batch.roles[rows],
                        written_by_policy=batch.written_by_policy[rows], logprobs=batch.logprobs[rows],
                        texts=pick(batch.texts), tool_calls=pick(batch.tool_calls),
                        observations=pick(batch.observations), invalid_calls=pick(batch.invalid_calls))


DDP_CASES = [(agg, empty) for agg in ("token_mean", "seq_mean", "dr_grpo") for empty in (False, True)]


def ddp_update(policy, batch, advantages, cfg, rows):
    """One GRPO update with plain SGD (lr 1, no clipping): the step is the gradient itself, so a
    wrong normalization shows (Adam's first step, lr * sign(g), and clipping would hide it)."""
    optimizer = torch.optim.SGD([p for p in policy.model.parameters() if p.requires_grad], lr=1.0)
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
    for agg, empty in DDP_CASES:
        cfg = dataclasses.replace(saved["cfg"], loss_agg=agg, max_grad_norm=1e9)
        policy = dart.load_policy(cfg)
        dart.load_trainable(policy.model, saved["adapters"])
        batch = on_device(saved["empty_batch"] if empty else saved["batch"], policy.device)
        results[agg, empty] = ddp_update(policy, batch, saved["advantages"].to(policy.device), cfg,
                                         list(range(rank * share, (rank + 1) * share)))
    if rank == 1:  # the per-step guard of train() notices processes whose adapters differ
        with torch.no_grad():
            next(p for p in policy.model.parameters() if p.requires_grad).add_(1e-3)
    try:
        dart.check_same_adapters(policy.model, 0)
        results["guard"] = "silent"
    except RuntimeError:
        results["guard"] = "raised"
    if rank == 0:
        torch.save(results, out_path)
    torch.distributed.barrier()  # neither process tears its connections down while the other still uses them
    torch.distributed.destroy_process_group()


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
needs_two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_two_gpus)])
def test_two_processes_take_exactly_the_one_process_step(make_policy, tmp_path, device):
    policy, cfg = make_policy("dart", randomize=0.02, device=device, dtype="float32")
    _, prompts = prompts_for(policy, 8, seed=11)
    batch = on_device(dart.rollout(policy, REGISTRY, prompts, cfg, 1.0, torch.Generator(device).manual_seed(0)), "cpu")
    empty = rows_of(batch, list(range(8)))
    empty.written_by_policy = empty.written_by_policy.clone()
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
        moved = sum((whole[k] - adapters[k]).abs().sum() for k in whole)
        assert moved > 0
        for k in whole:
            assert torch.allclose(split[agg, is_empty][k], whole[k], rtol=1e-5, atol=1e-7), (agg, is_empty, k)


def torchrun(args, cwd):
    import subprocess
    import sys
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
               os.path.join(os.path.dirname(os.path.abspath(__file__)), "dart.py")] + args
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_torchrun_end_to_end_and_resume(cfg_factory, tmp_path):
    """Two processes end to end: they finish, hold identical adapters after every step (train()
    checks it each step and raises otherwise), write one run directory, and resume."""
    cfg = cfg_factory()
    dart.load_base(cfg)  # the base is cached: the processes only read it
    flags = [f"--cache_dir={cfg.cache_dir}", "--device=cpu", "--base_batch=16", "--questions_per_step=2",
             "--group_size=4", "--eval_per_family=2", "--eval_every=2", "--save_every=1", "--max_new_tokens=48",
             "--lr_schedule=constant"]  # constant: the resume below extends the run
    done = torchrun(flags + ["--steps=2"], tmp_path)
    runs = os.listdir(tmp_path / "runs")
    assert len(runs) == 1 and done.stdout.count("run directory:") == 1
    run = tmp_path / "runs" / runs[0]
    torchrun([f"--resume={run}", "--steps=4"], tmp_path)
    records = [json.loads(line) for line in open(run / "metrics.jsonl")]
    assert [r["step"] for r in records] == [0, 1, 2, 3, 4] and "test_acc" in records[-1]
    assert os.listdir(tmp_path / "runs") == runs


def test_warm_start_of_an_hf_model_teaches_the_format_and_is_cached(small_hf_folder, cfg_factory, monkeypatch):
    """The supervised warm start of a --model (here the small random HF model) runs, is cached
    under runs/cache and reused, and afterwards the model writes the tags: it answers in
    <answer>...</answer>, which the untrained model never does."""
    cfg = cfg_factory(model=str(small_hf_folder), warm_start=40, warm_lr=3e-3, lora_rank=4)
    rng = random.Random(3)
    tasks = [toy_tasks.sample_task(rng, WORLD, "train") for _ in range(16)]

    def answered(policy):
        out = dart.rollout(policy, REGISTRY, [dart.prompt_ids(policy.tok, t.question) for t in tasks], cfg, 0)
        return np.mean([toy_tasks.parse_answer(text) is not None for text in out.texts])

    assert answered(dart.load_policy(dataclasses.replace(cfg, warm_start=0))) == 0
    warm = dart.load_policy(cfg)
    assert os.path.exists(os.path.join(dart.base_path(cfg), "base.json"))
    assert answered(warm) >= 0.5
    monkeypatch.setattr(dart, "imitate_demonstrations", lambda *args, **kwargs: pytest.fail("the cached base was not reused"))
    again = dart.load_policy(cfg)
    assert all(torch.equal(a, b) for a, b in zip(warm.model.state_dict().values(), again.model.state_dict().values()))


# ---------------------------------------------------------------------------
# the warm start in the memory of a small GPU: a LoRA and the tags' rows, merged after


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
    dart.lora_warm_start(model, tok, dart.Config(warm_start=1), "cpu", None)

    assert not any(isinstance(m, dart.DartLinear) for m in model.modules())
    assert all(p.dtype == torch.float32 for p in model.parameters())
    vocab_rows = model.get_input_embeddings().weight.shape[0]
    assert (len(dart.TAGS), 32) in trained["shapes"] and not any(vocab_rows in shape for shape in trained["shapes"])
    torch.testing.assert_close(model(input_ids=ids).logits, trained["logits"], rtol=1e-4, atol=1e-4)
    tags = tok.convert_tokens_to_ids(dart.TAGS)
    others = [i for i in range(len(tok)) if i not in tags]
    for name, p in model.named_parameters():
        if "embed" in name or "lm_head" in name:
            assert torch.equal(p[others], before[name][others]) and not torch.equal(p[tags], before[name][tags])
        elif "norm" not in name and name.endswith("weight"):  # (a LoRA leaves biases as they are)
            assert not torch.equal(p, before[name]), name  # every linear layer got its LoRA merged


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
        dart.lora_warm_start(gpt2, tok, dart.Config(model="gpt2", warm_start=1), "cpu", None)


def test_the_warm_start_trains_a_lora_on_cuda_every_weight_elsewhere_and_caches_them_apart(small_hf_folder,
                                                                                            cfg_factory):
    cfg = cfg_factory(model=str(small_hf_folder), warm_start=2, lora_rank=4)
    assert dart.warm_weights(cfg, "cuda") == "lora" and dart.warm_weights(cfg, "cpu") == "all"
    lora = dataclasses.replace(cfg, warm_weights="lora")
    assert dart.warm_weights(lora, "cpu") == "lora" and dart.base_path(lora) != dart.base_path(cfg)
    policy = dart.load_policy(lora)
    assert os.path.exists(os.path.join(dart.base_path(lora), "base.json"))
    assert sum(isinstance(m, dart.DartLinear) for m in policy.model.modules()) == 14  # the RL's own, no more


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
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
    cfg = dart.Config(model="qwen2.5-0.5b-shapes", warm_start=3, device="cuda")
    torch.cuda.reset_peak_memory_stats()
    dart.lora_warm_start(model, tok, cfg, "cuda", torch.bfloat16)
    peak_gb = torch.cuda.max_memory_allocated() / 1e9
    print(f"peak GPU memory of the warm start: {peak_gb:.2f} GB")
    assert peak_gb <= 8, peak_gb

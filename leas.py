"""
LEAS: do reasoning and tool use interfere when trained together, and by how much?

The paper's diagnostic half (v2 of the paper calls it Capability Effect Attribution), on
the same tiny world as dart.py:

    1. train three adapters with dart.py's own loop: reason_only (M_Reas), tool_only
       (M_Tool) and joint (M_Unified), same steps and hyperparameters, for each of K seeds;
    2. build two hybrids for free by loading adapters into the DART layer's role blocks:
       H_Tool (base writes reasoning, M_Tool writes tool tokens), H_Reas (the other way);
    3. sample N answers per test question from each of the six variants;
    4. per question, fit z = X lambda by least squares, z = logit of the smoothed success
       rate, X the 6-column indicator matrix below: lambda23 < 0 means that optimizing
       reasoning and tool use in the same parameters hurt (interference), > 0 helped; and
       lambda12 + lambda13 + lambda23, the same joint training against the hybrids (routed as DART);
    5. gradient directions: under the joint adapter, the policy gradient of a trajectory's
       reasoning tokens versus that of its tool tokens (the paper: nearly orthogonal), against
       controls of the same size; and each role's share of joint's one AdamW.

    python leas.py                 # all of it: 3 seeds x 3 variants x 40 RL steps, ~15 min of CPU
    python leas.py grad            # only the gradient-direction analysis
    python leas.py --seeds=5       # more seeds: a tighter between-seed interval
    python leas.py --runs=DIR --steps=40 --samples=8

Options are this file's LeasConfig and any of dart.py's Config (training knobs).
"""
import dataclasses
import os
import sys
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import dart
import toy_tasks
import tools
from dart import DartError, at_least, option


@dataclass
class LeasConfig:
    runs: str = option("", "where the variants are trained, or reused if already there (default: the folder of "
                           "these settings' runs, shared with dart.py --compare: runs/<model>-<hash>/r<rank>)")
    seeds: int = option(3, "K seeds per trained variant, stacked in one fit and fitted one by one", at_least(1))
    samples: int = option(16, "N answers per test question per variant", at_least(1))
    per_family: int = option(25, "test questions per task family (sampled at --temperature)", at_least(1))
    bootstrap: int = option(2000, "resamples of questions for the 95% intervals", at_least(100))
    grad_questions: int = option(8, "gradient analysis: questions (at most the test questions that need a tool) ...",
                                 at_least(1))
    grad_rollouts: int = option(8, "... and rollouts of each", at_least(1))


# -----------------------------------------------------------------------------
# The attribution model (pure numpy: copy it anywhere)

VARIANTS = ("Base", "M_Reas", "M_Tool", "M_Unified", "H_Tool", "H_Reas")
EFFECTS = ("lambda1", "lambda2", "lambda3", "lambda12", "lambda13", "lambda23")
# indicators: x1 base, x2 tool optimized, x3 reasoning optimized, x_ij = 1 iff capabilities i
# and j were optimized jointly in the same parameters
INDICATORS = {
    "Base":      (1, 0, 0, 0, 0, 0),
    "M_Reas":    (1, 0, 1, 0, 1, 0),
    "M_Tool":    (1, 1, 0, 1, 0, 0),
    "M_Unified": (1, 1, 1, 1, 1, 1),
    "H_Tool":    (1, 1, 0, 0, 0, 0),
    "H_Reas":    (1, 0, 1, 0, 0, 0),
}


def design_matrix(variants=VARIANTS):
    """X with one row per variant (in the given order, repeats allowed) and the six effect columns."""
    return np.array([INDICATORS[v] for v in variants], dtype=float)


def smoothed_logit(successes, samples):
    """z = logit((k + 0.5) / (N + 1)): finite even when k = 0 or k = N."""
    s = (np.asarray(successes, dtype=float) + 0.5) / (samples + 1)
    return np.log(s / (1 - s))


def fit_effects(X, Z):
    """Least squares for every question at once: X (rows, 6), Z (rows, questions) ->
    lambdas (6, questions) and residuals (rows, questions). Exact with the six variants;
    with several seeds stacked the rows outnumber the effects and residuals are nonzero."""
    lambdas, *_ = np.linalg.lstsq(X, Z, rcond=None)
    return lambdas, Z - X @ lambdas


T_975 = (12.71, 4.30, 3.18, 2.78, 2.57, 2.45, 2.36, 2.31, 2.26, 2.23)  # Student t quantiles, df = 1..10


def seed_interval(values):
    """Mean and 95% t-interval of a number measured once per seed (no interval from one seed):
    the spread between training runs, which a bootstrap over questions does not see."""
    values = np.asarray(values, dtype=float)
    if len(values) < 2:
        return float(values.mean()), None
    df = len(values) - 1
    t = T_975[df - 1] if df <= len(T_975) else 1.96 + 2.4 / df  # within 1% of the exact quantile
    half = t * values.std(ddof=1) / np.sqrt(len(values))
    return float(values.mean()), (float(values.mean() - half), float(values.mean() + half))


def conclusion(mean_lambda23, interval):
    """A finding only when the between-seed interval of mean lambda23 excludes the alternative."""
    if interval is None:
        return "no conclusion from one seed: there is no between-seed interval (use --seeds=3 or more)"
    lo, hi = interval
    where = f"mean lambda23 {mean_lambda23:+.2f}, between-seed 95% interval [{lo:+.2f}, {hi:+.2f}]"
    if hi < 0:
        return f"interference: joint training hurts ({where})"
    if lo > 0:
        return f"synergy, not interference: joint training helps ({where})"
    return f"no conclusion at this budget: the interval includes 0 ({where})"


# -----------------------------------------------------------------------------
# Variants: three trained adapters, six ways to place them in the DART layer's blocks

# variant -> (adapter in the reasoning block, adapter in the tool block); None = zeros
BLOCKS = {
    "Base":      (None, None),
    "M_Reas":    ("reason_only", "reason_only"),
    "M_Tool":    ("tool_only", "tool_only"),
    "M_Unified": ("joint", "joint"),
    "H_Tool":    (None, "tool_only"),
    "H_Reas":    ("reason_only", None),
}
TRAINED = ("reason_only", "tool_only", "joint")
# each variant's RL budget, shorter than dart.py's default so that nine runs (three variants,
# three seeds) fit the time of one long run; evaluated once, at the end
TRAINING = {"steps": 40, "eval_every": 40}


def runs_of(cfg, lcfg):
    return lcfg.runs or os.path.join(dart.runs_folder(cfg), f"r{cfg.lora_rank}")


def train_variants(cfg, lcfg, modes=TRAINED):
    """Adapters of every trained variant and seed, {(mode, seed): state}, and the base they were
    trained on: one for all, since the hybrids put two runs' adapters on one base."""
    states, bases = {}, set()
    for seed in range(lcfg.seeds):
        for mode in modes:
            out = os.path.join(runs_of(cfg, lcfg), f"{mode}-s{seed}")
            dart.train_or_reuse(dataclasses.replace(cfg, mode=mode, seed=seed, out=out))
            states[mode, seed] = dart.load_adapters(out)
            bases.add(dart.saved_config(out).cached_base)
    if len(bases) > 1:
        raise DartError(f"the runs in {runs_of(cfg, lcfg)} were trained on {len(bases)} different bases "
                        f"({', '.join(sorted(bases))}); train them all on one (pass --runs=another folder)")
    return states, bases.pop()


def place_variant(policy, states, variant, seed):
    """Load a variant into a dart-mode policy: each block gets a trained adapter or zeros."""
    any_state = next(iter(states.values()))
    for block, mode in enumerate(BLOCKS[variant]):
        state = states[mode, seed] if mode else {k: torch.zeros_like(v) for k, v in any_state.items()}
        dart.load_adapter_block(policy.model, state, block, policy.routing.lora_rank)


# -----------------------------------------------------------------------------
# Sampling and the report


def success_counts(policy, registry, tasks, cfg, lcfg, seed, batch_rows=256):
    """k per task: how many of N sampled answers are right."""
    prompts = [dart.prompt_ids(policy.tok, t.question) for t in tasks for _ in range(lcfg.samples)]
    generator = torch.Generator(policy.device).manual_seed(seed)
    rewards = []
    for start in range(0, len(prompts), batch_rows):
        out = dart.rollout(policy, registry, prompts[start:start + batch_rows], cfg, cfg.temperature, generator)
        rewards += [toy_tasks.reward(text, tasks[(start + i) // lcfg.samples]) for i, text in enumerate(out.texts)]
    return np.array(rewards).reshape(len(tasks), lcfg.samples).sum(1)


def attribution(counts, tasks, lcfg):
    """counts: {(variant, seed): k per task} -> the report dictionary."""
    rows = [(v, s) for s in range(lcfg.seeds) for v in VARIANTS]
    K = np.stack([counts[r] for r in rows])                     # (rows, questions)
    kept = K.max(0) > 0                                         # some variant solved it at least once
    if not kept.any():
        raise DartError("no variant solved any test question even once; train longer (--steps) or sample more "
                        "(--samples)")
    X = design_matrix([v for v, _ in rows])
    lambdas, residuals = fit_effects(X, smoothed_logit(K[:, kept], lcfg.samples))
    rng = np.random.default_rng(0)
    families = np.array([t.family for t in tasks])[kept]
    summary = {}
    for name, values in zip(EFFECTS, lambdas):
        summary[name] = {"mean": float(values.mean()), "ci95": dart.bootstrap_interval(values, lcfg.bootstrap, rng),
                         "median": float(np.median(values)),
                         "median_ci95": dart.bootstrap_interval(values, lcfg.bootstrap, rng, np.median)}
    l23, l12, l13 = (lambdas[EFFECTS.index(e)] for e in ("lambda23", "lambda12", "lambda13"))
    # lambda12 = z(M_Tool) - z(H_Tool): what the tool-trained adapter does on the reasoning tokens too (lambda13 the
    # other way). So lambda23 sets joint training against single-role adapters acting on every token, while
    # lambda12 + lambda13 + lambda23 = z(M_Unified) - z(H_Tool) - z(H_Reas) + z(Base) sets it against each
    # single-role adapter on its own role's tokens alone (the hybrids, routed as DART routes its two adapters)
    hybrids = l12 + l13 + l23
    by_family = {}
    for family in ("all", *dict.fromkeys(t.family for t in tasks)):
        pick = np.ones(len(families), bool) if family == "all" else families == family
        if pick.any():  # |lambda23| below 1e-9 is rounding noise: neither interference nor synergy
            by_family[family] = {
                "below": float((l23[pick] < -1e-9).mean()), "above": float((l23[pick] > 1e-9).mean()),
                "n": int(pick.sum()), "lambda12": float(l12[pick].mean()), "lambda13": float(l13[pick].mean()),
                "lambda23": float(l23[pick].mean()), "against_hybrids": float(hybrids[pick].mean()),
                "lambda23_ci95": dart.bootstrap_interval(l23[pick], lcfg.bootstrap),
                "against_hybrids_ci95": dart.bootstrap_interval(hybrids[pick], lcfg.bootstrap)}
    per_seed = []  # the same fit on each seed's six variants alone
    for seed in range(lcfg.seeds):
        K_seed = np.stack([counts[v, seed] for v in VARIANTS])[:, kept]
        l23_seed = fit_effects(design_matrix(), smoothed_logit(K_seed, lcfg.samples))[0][EFFECTS.index("lambda23")]
        rate = {v: 100 * counts[v, seed].mean() / lcfg.samples for v in VARIANTS}  # % of sampled answers right
        per_seed.append({"lambda23_mean": float(l23_seed.mean()),
                         "interference_share": float((l23_seed < -1e-9).mean()),
                         **{f"{v}_gain": float(rate[v] - rate["Base"]) for v in VARIANTS[1:]}})
    between = {key: seed_interval([p[key] for p in per_seed]) for key in per_seed[0]}
    kept_index = np.flatnonzero(kept)
    return {
        "per_seed": per_seed,
        "between_seeds": between,
        "conclusion": conclusion(*between["lambda23_mean"]),
        "effects": summary,
        "interference_share_ci95": dart.bootstrap_interval((l23 < -1e-9).astype(float), lcfg.bootstrap, rng),
        "by_family": by_family,  # lambda23's shares below and above 0, means and intervals over the family's questions
        "success_rate": {v: float(np.mean([counts[v, s].mean() / lcfg.samples for s in range(lcfg.seeds)]))
                         for v in VARIANTS},
        "residual_rms": float(np.sqrt((residuals ** 2).mean())),
        "dropped": [t.question for t, k in zip(tasks, kept) if not k],
        "questions": [{"question": tasks[i].question, "family": tasks[i].family,
                       "k": {f"{v}/s{s}": int(counts[v, s][i]) for v, s in rows},
                       "lambda": dict(zip(EFFECTS, map(float, lambdas[:, j])))}
                      for j, i in enumerate(kept_index)],
        "kept": len(kept_index),
    }


def attribution_table(report, lcfg):
    lines = [f"LEAS on {report['kept']} test questions ({len(report['dropped'])} dropped: no variant "
             f"solved them), N={lcfg.samples} samples, {lcfg.seeds} seed(s), residual rms "
             f"{report['residual_rms']:.3f}",
             "", "success rate per variant: " + ", ".join(
                 f"{v} {r:.0%}" for v, r in report["success_rate"].items()), "",
             f"{'effect':<10} {'mean':>7} {'95% CI':>16} {'median':>8} {'95% CI':>16}   (bootstrap over questions)"]
    for name, e in report["effects"].items():
        mean, lo, hi, median, mlo, mhi = (f"{x:+.2f}".replace("-0.00", "+0.00") for x in (
            e["mean"], *e["ci95"], e["median"], *e["median_ci95"]))
        lines.append(f"{name:<10} {mean:>7} {f'[{lo}, {hi}]':>16} {median:>8} {f'[{mlo}, {mhi}]':>16}")
    lo, hi = report["interference_share_ci95"]
    lines += ["", f"{'questions':<12} {'lambda23<0':>11} {'lambda23>0':>11} {'n':>5} {'lambda12':>9} {'lambda13':>9} "
                  f"{'lambda23':>9} {'95% CI':>16} {'12+13+23':>9} {'95% CI':>16}",
              "(means over the questions; < 0: interference; 12+13+23: M_Unified against the hybrids, routed as DART)"]
    ci = "[{:+.2f}, {:+.2f}]".format
    for family, f in report["by_family"].items():
        lines.append(f"{family:<12} {f['below']:>11.0%} {f['above']:>11.0%} {f['n']:>5} {f['lambda12']:>+9.2f} "
                     f"{f['lambda13']:>+9.2f} {f['lambda23']:>+9.2f} {ci(*f['lambda23_ci95']):>16} "
                     f"{f['against_hybrids']:>+9.2f} {ci(*f['against_hybrids_ci95']):>16}")
    lines.append(f"share with interference: {report['by_family']['all']['below']:.0%} "
                 f"(95% CI over questions {lo:.0%}-{hi:.0%}; paper: 62-67% in 3 of 4 settings)")
    lines += ["", f"between seeds (each seed's six variants fitted alone, {lcfg.seeds} seed(s)):"]
    for key, label, fmt in (("lambda23_mean", "mean lambda23", "{:+.2f}"),
                            ("interference_share", "share with lambda23 < 0", "{:.0%}")):
        mean, interval = report["between_seeds"][key]
        spread = "" if interval is None else f", 95% t-interval [{fmt.format(interval[0])}, {fmt.format(interval[1])}]"
        values = ", ".join(fmt.format(p[key]) for p in report["per_seed"])
        lines.append(f"  {label:<24} per seed {values}: mean {fmt.format(mean)}{spread}")
    lines.append(f"conclusion: {report['conclusion']}")
    lines += ["", "what each variant adds to the base's success rate (points; each seed's variants against its own "
                  "base sample):"]
    for variant in VARIANTS[1:]:
        mean, interval = report["between_seeds"][f"{variant}_gain"]
        spread = "" if interval is None else f", between-seed 95% t-interval [{interval[0]:+.1f}, {interval[1]:+.1f}]"
        verdict = "" if interval is None or interval[0] <= 0 <= interval[1] else "  (differs from Base)"
        lines.append(f"  {variant + ' - Base':<18} {mean:+.1f}{spread}{verdict}")
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# Gradient directions


def gradient_batch(policy, registry, cfg, lcfg, world):
    """grad_rollouts answers to each of grad_questions test questions that need a tool (the same under
    every adapter), and their GRPO advantages as training computes them."""
    tool_tasks = [t for t in toy_tasks.test_set(world, lcfg.per_family) if t.family != "notool"]
    picks = np.random.default_rng(0).choice(len(tool_tasks), lcfg.grad_questions, replace=False)
    tasks = [tool_tasks[i] for i in picks]
    prompts = [dart.prompt_ids(policy.tok, t.question) for t in tasks for _ in range(lcfg.grad_rollouts)]
    batch = dart.rollout(policy, registry, prompts, cfg, cfg.temperature, torch.Generator(policy.device).manual_seed(0))
    rewards = torch.tensor([toy_tasks.reward(text, tasks[i // lcfg.grad_rollouts], cfg.format_bonus)
                            for i, text in enumerate(batch.texts)])
    advantages = dart.group_advantages(rewards.view(len(tasks), -1), cfg.scale_std).flatten().to(policy.device)
    return tasks, batch, advantages


def token_set_gradients(policy, batch, row, loss_tokens, token_sets, params, temperature):
    """The policy gradient of each set of one trajectory's tokens: the gradient of -sum(log pi) over
    the set / the number of the trajectory's `loss_tokens`, so that sets which partition those tokens
    add up to the gradient of the trajectory's mean token loss (GRPO's loss divided by the
    trajectory's advantage, which scales the direction and may flip its sign, never turns it)."""
    logp, _ = dart.response_logprobs(policy, batch.ids[row:row + 1], batch.attention_mask[row:row + 1],
                                     batch.prompt_len, temperature)
    total = loss_tokens.sum()
    grads = []
    for tokens in token_sets:
        loss = -(logp[0] * tokens).sum() / total
        grads.append([torch.zeros_like(p) if g is None else g for g, p in zip(
            torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True), params)])
    return grads


def layer_of(name):
    parts = name.split(".")
    return int(parts[parts.index("layers") + 1]) if "layers" in parts else -1


def cosines(vectors):
    """Pairwise cosine similarities between rows."""
    unit = vectors / vectors.norm(dim=1, keepdim=True).clamp(min=1e-12)
    return unit @ unit.T


# the comparisons of the gradient table: (key, label), each between two sets of m tokens. A
# trajectory's reasoning set against its tool set; the matched controls, its two reasoning sets
# (or its two tool sets) against each other, which differ in their tokens as the two roles do but
# not in their role: "cross-role is less aligned" means less than these, not less than 90 degrees
GRADIENT_ROWS = (
    ("cross_role", "reasoning vs tool, same trajectory"),
    ("reasoning_control", "control: reasoning vs reasoning, same trajectory"),
    ("tool_control", "control: tool vs tool, same trajectory"),
    ("reasoning_across", "reasoning vs reasoning, other trajectories"),
    ("tool_across", "tool vs tool, other trajectories"),
)
SETS = ("reasoning_a", "reasoning_b", "tool_a", "tool_b")  # each trajectory's matched sets: matched_subsets


def matched_subsets(reasoning, tool, generator):
    """SETS: four disjoint random sets of m = min(n_R, n_T) // 2 tokens, two of a trajectory's reasoning
    tokens (0/1 masks) and two of its tool tokens. The cosine of two sums of noisy token gradients grows
    with how many each holds, so only sums of equal sizes compare."""
    m = min(int(reasoning.sum()), int(tool.sum())) // 2
    sets = torch.zeros(4, len(reasoning), dtype=torch.bool)
    for first, tokens in ((0, reasoning), (2, tool)):
        where = tokens.nonzero().squeeze(-1)
        where = where[torch.randperm(len(where), generator=generator)]
        sets[first, where[:m]], sets[first + 1, where[m:2 * m]] = True, True
    return sets


def matched_cosines(grads):
    """grads: {set: (trajectories, dims)}, the gradients of each trajectory's SETS -> GRADIENT_ROWS'
    cosines: per trajectory, or as a matrix between trajectories (each one's first set of a role)."""
    pair = lambda a, b: F.cosine_similarity(grads[a], grads[b], dim=1).tolist()
    return {"cross_role": pair("reasoning_a", "tool_a"), "reasoning_control": pair("reasoning_a", "reasoning_b"),
            "tool_control": pair("tool_a", "tool_b"), "reasoning_across": cosines(grads["reasoning_a"]).tolist(),
            "tool_across": cosines(grads["tool_a"]).tolist()}


def gradient_directions(policy, cfg, lcfg, tasks, batch):
    """Under the joint adapter, per sampled trajectory with at least two tokens of each role: the
    gradients of its matched sets, compared overall and per layer; its question, family and m."""
    named = [(n, p) for n, p in policy.model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    roles = dart.predicting_roles(batch, policy.special)
    mask = dart.loss_mask(batch, roles, "joint")
    by_role = [mask & (roles == role) for role in (dart.REASONING, dart.TOOL)]
    kept = [r for r in range(len(batch.texts)) if all(tokens[r].sum() >= 2 for tokens in by_role)]
    sets = {key: [] for key in SETS}
    for row in tqdm(kept, desc="per-role gradients", leave=False):
        masks = matched_subsets(by_role[0][row].cpu(), by_role[1][row].cpu(), torch.Generator().manual_seed(row))
        grads = token_set_gradients(policy, batch, row, mask[row], list(masks.to(mask.device)), params,
                                    cfg.temperature)
        for key, grad in zip(sets, grads):
            sets[key].append([g.cpu() for g in grad])  # in host memory: one per trajectory adds up
    question = [row // lcfg.grad_rollouts for row in kept]
    result = {"trajectories": len(kept), "question": question, "family": [tasks[q].family for q in question],
              "m": [min(int(tokens[row].sum()) for tokens in by_role) // 2 for row in kept]}
    if len(kept) < 2:
        return result
    for scope in ["all"] + sorted({layer_of(n) for n, _ in named}):
        keep = [i for i, (n, _) in enumerate(named) if scope == "all" or layer_of(n) == scope]
        result[str(scope)] = matched_cosines({key: torch.stack([torch.cat([g[i].flatten() for i in keep])
                                                                for g in grads]) for key, grads in sets.items()})
    return result


def pooled(results, key, family=None, scope="all"):
    """One comparison over every seed's trajectories (of `family`), per trajectory or as a matrix of pairs
    (NaN: a trajectory with itself, or another seed's), and each one's independent unit: seed/question."""
    parts, units = [], []
    for seed, r in enumerate(results):
        pick = [i for i, f in enumerate(r["family"]) if family in (None, f)]
        values = np.asarray(r[scope][key], dtype=float)
        parts.append(values[pick] if values.ndim == 1 else values[np.ix_(pick, pick)])
        units += [f"{seed}/{r['question'][i]}" for i in pick]
    if parts[0].ndim == 1:
        return np.concatenate(parts), np.array(units)
    pairs = np.block([[a if i == j else np.full((len(a), len(b)), np.nan) for j, b in enumerate(parts)]
                      for i, a in enumerate(parts)])
    np.fill_diagonal(pairs, np.nan)
    return pairs, np.array(units)


def mean_and_interval(values, units):
    """The mean over trajectories, or over pairs (each once), and a 95% interval of the width of a t-interval
    over the pseudo-values of a jackknife that leaves out one unit at a time: pairs share trajectories, a
    question's rollouts share it, so neither pairs nor trajectories are independent draws (the units are)."""
    mean = lambda keep: np.nanmean(values[keep] if values.ndim == 1 else values[np.ix_(keep, keep)])
    names, full = np.unique(units), mean(units == units)
    center, (lo, _) = seed_interval([len(names) * full - (len(names) - 1) * mean(units != u) for u in names])
    return float(full), (float(full - (center - lo)), float(full + (center - lo)))


def angle(cos):
    return float(np.degrees(np.arccos(np.clip(cos, -1, 1))))


def gradient_finding(results, family=None):
    """Cross-role against each matched control, paired by trajectory: the mean of (control -
    cross-role) cosine with its interval, and what it says."""
    lines, less, more = [], [], []
    cross, units = pooled(results, "cross_role", family)
    for key, role in (("reasoning_control", "reasoning"), ("tool_control", "tool")):
        mean, (lo, hi) = mean_and_interval(pooled(results, key, family)[0] - cross, units)
        less.append(lo > 0)
        more.append(hi < 0)
        lines.append(f"  {role} control minus cross-role: {mean:+.2f} [{lo:+.2f}, {hi:+.2f}]")
    if all(less):
        verdict = "cross-role is less aligned than same-role within a trajectory (both controls)"
    elif any(less):
        role, other = ("reasoning", "tool") if less[0] else ("tool", "reasoning")
        verdict = (f"cross-role is less aligned than two sets of the {role} tokens, not than two of the {other} "
                   f"tokens")
    elif all(more):
        verdict = "cross-role is more aligned than same-role within a trajectory (both controls)"
    else:
        verdict = "cross-role is not less aligned than same-role within a trajectory"
    return lines + [f"finding: {verdict}"]


def gradient_table(results, family=None):
    """results: one gradient_directions() result per seed. Each comparison's mean cosine (and angle)
    over the trajectories (of `family`) of all seeds, or over their pairs within a seed, with its 95%
    interval over (seed, question) units; per layer, the means; then the finding against the controls."""
    usable = [r for r in results if r["trajectories"] >= 2]
    cross, units = pooled(usable, "cross_role", family) if usable else ([], [])
    if len(set(units)) < 2:
        return (f"gradient directions{f' ({family})' if family else ''}: fewer than 2 sampled questions had a "
                f"trajectory with 2+ tokens of each role; raise --grad_questions or --grad_rollouts")
    m = [m for r in usable for m, f in zip(r["m"], r["family"]) if family in (None, f)]
    lines = [f"gradient directions under M_Unified (joint adapter){f' on the {family} questions' if family else ''}, "
             f"{len(usable)} seed(s): {len(cross)} trajectories of {len(set(units))} questions with 2+ tokens of "
             f"each role; each set holds m = min(n_R, n_T) // 2 of a trajectory's tokens, drawn at random "
             f"(median m {np.median(m):g}); 95% intervals: jackknife over (seed, question)", "",
             f"{'cosine (all adapter parameters), m tokens a side':<52} {'mean':>6} {'angle':>6} {'95% interval':>16}"]
    for key, label in GRADIENT_ROWS:
        mean, (lo, hi) = mean_and_interval(*pooled(usable, key, family))
        lines.append(f"{label:<52} {mean:+6.2f} {angle(mean):4.0f}deg {f'[{lo:+.2f}, {hi:+.2f}]':>16}")
    if family is None:
        lines += ["", "per layer, mean cosine: " + ", ".join(key for key, _ in GRADIENT_ROWS)]
        for scope in [k for k in usable[0] if k.lstrip("-").isdigit()]:
            means = [np.nanmean(pooled(usable, key, scope=scope)[0]) for key, _ in GRADIENT_ROWS]
            lines.append(f"  layer {scope:<3} " + " ".join(f"{m:+6.2f}" for m in means))
    return "\n".join(lines + [""] + gradient_finding(usable, family))


def role_gradients(policy, batch, advantages, cfg):
    """Each role's GRPO gradient on one batch under `joint`, flattened: on-policy the ratio is 1, so it is
    that of -A log pi per token, weighted as in training (the KL term left out: no role's reward)."""
    params = dart.trainable(policy.model)
    roles = dart.predicting_roles(batch, policy.special)
    mask = dart.loss_mask(batch, roles, "joint")
    weights = dart.token_weights(mask, cfg.loss_agg, cfg.max_new_tokens, dart.batch_totals(mask))  # one process
    logp, _ = dart.response_logprobs(policy, batch.ids, batch.attention_mask, batch.prompt_len, cfg.temperature,
                                     with_entropy=False)
    per_token = -advantages[:, None] * torch.where(mask, logp, 0.0) * weights
    grads = [torch.autograd.grad((per_token * (roles == role)).sum(), params, retain_graph=True)
             for role in (dart.REASONING, dart.TOOL)]
    return [torch.cat([g.flatten() for g in grad]) for grad in grads]


def optimizer_shares(g_reasoning, g_tool):
    """Two roles in one AdamW second moment, v ~ g_R^2 + g_T^2 per parameter (the cross term 2 g_R g_T
    averages out over steps if they are uncorrelated): each role's norm, the reasoning role's share of
    sum(v), and each role's kept step, sum(|g| f) / sum(|g|) with f = |g| / sqrt(v): its first-order
    progress on its own loss per step against an optimizer of its own (DART's: v = g^2, f = 1)."""
    r2, t2 = g_reasoning.double() ** 2, g_tool.double() ** 2
    root_v = (r2 + t2).sqrt().clamp(min=1e-300)
    keeps = lambda g2: float((g2 / root_v).sum() / g2.sqrt().sum())
    return {"norm_reasoning": float(r2.sum().sqrt()), "norm_tool": float(t2.sum().sqrt()), "reasoning_share":
            float(r2.sum() / (r2 + t2).sum()), "reasoning_keeps": keeps(r2), "tool_keeps": keeps(t2)}


def optimizer_lines(results):
    lines = ["one AdamW for both roles under joint, per seed: each role's GRPO gradient on the questions above, "
             "sampled as RL began (B = 0) and as it ended (n/a: every group's rewards equal, no gradient)"]
    for when in ("start", "end"):
        each = lambda key, fmt: ", ".join("n/a" if np.isnan(v := r["optimizer"][when][key]) else fmt.format(v)
                                          for r in results)
        lines.append(f"  {when:<5}  |g_R| {each('norm_reasoning', '{:.3g}')}; |g_T| {each('norm_tool', '{:.3g}')}; "
                     f"reasoning's share of v {each('reasoning_share', '{:.0%}')}; share of its own step kept: "
                     f"tool {each('tool_keeps', '{:.2f}')}, reasoning {each('reasoning_keeps', '{:.2f}')}")
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# Putting it together


# dart.py's options that name runs or commands: leas.py trains and reuses its own runs
NOT_OURS = ("mode", "seed", "out", "resume", "compare", "modes", "ranks", "bench", "export_peft")


def parse_command_line(argv):
    """Split the flags between LeasConfig and dart.Config; 'grad' selects the gradient part."""
    mine = [f.name for f in dataclasses.fields(LeasConfig)]
    names = mine + [f.name for f in dataclasses.fields(dart.Config)]
    command = [a for a in argv if not a.startswith("-")]
    if command not in ([], ["grad"]):
        raise DartError(f"unknown command {' '.join(command)!r}; the only command is 'grad'")
    flags = [a for a in argv if a.startswith("-")]
    if ignored := [a for a in flags if a.removeprefix("--").partition("=")[0] in NOT_OURS]:
        raise DartError(f"leas.py picks its runs itself (modes {', '.join(TRAINED)}, seeds 0 to --seeds - 1, at "
                        f"--lora_rank, in --runs): drop {ignored[0]}")
    ours = [a for a in flags if a.removeprefix("--").partition("=")[0] in mine]
    lcfg = dart.parse_args(ours, LeasConfig(), names)
    cfg = dart.parse_args([a for a in flags if a not in ours], dart.Config(**TRAINING), names)
    if lcfg.runs and os.path.isfile(lcfg.runs):
        raise DartError(f"--runs={lcfg.runs} is a file; pass the folder where the variants are trained or reused")
    tool_questions = 3 * lcfg.per_family  # every family but notool needs a tool
    if lcfg.grad_questions > tool_questions:
        raise DartError(f"--grad_questions must be at most the {tool_questions} test questions that need a tool "
                        f"(3 x --per_family), not {lcfg.grad_questions}")
    return cfg, lcfg, bool(command)


def report_path(cfg, lcfg, grad_only):
    """Beside the runs (whose folder fixes their settings), leas-<hash of this file's settings>.json, or
    leas_grad-...: another --seeds, --samples, --per_family or --grad_* writes a report of its own."""
    settings = {k: v for k, v in dataclasses.asdict(lcfg).items() if k != "runs"}
    return os.path.join(runs_of(cfg, lcfg), f"leas{'_grad' if grad_only else ''}-{dart.short_hash(settings)}.json")


def run_leas(cfg, lcfg, grad_only=False):
    world = dart.world_of(cfg)
    registry = tools.registry(world.kb)
    states, base = train_variants(cfg, lcfg, ("joint",) if grad_only else TRAINED)
    if dart.process_rank() > 0:
        return {}  # under torchrun the variants train data-parallel; sampling and fitting run in rank 0
    cfg = dataclasses.replace(cfg, cached_base=base)  # sampled on the base the variants were trained on
    report = {}
    if not grad_only:
        policy = dart.load_policy(dataclasses.replace(cfg, mode="dart"))
        tasks = toy_tasks.test_set(world, lcfg.per_family)
        counts = {}
        for seed in range(lcfg.seeds):
            for variant in tqdm(VARIANTS, desc=f"sampling {lcfg.samples} answers per question (seed {seed})"):
                place_variant(policy, states, variant, seed)
                counts[variant, seed] = success_counts(policy, registry, tasks, cfg, lcfg, 1000 * seed + 7)
        del policy  # before the joint model loads: one model in memory at a time
        report = attribution(counts, tasks, lcfg)
        print("\n" + attribution_table(report, lcfg))
    report["gradients"] = []
    for seed in range(lcfg.seeds):
        joint = dart.load_policy(dataclasses.replace(cfg, mode="joint", seed=seed))  # the adapter as RL began
        start = optimizer_shares(*role_gradients(joint, *gradient_batch(joint, registry, cfg, lcfg, world)[1:], cfg))
        dart.load_adapter_block(joint.model, states["joint", seed], 0, joint.routing.lora_rank)
        tasks, batch, advantages = gradient_batch(joint, registry, cfg, lcfg, world)
        result = gradient_directions(joint, cfg, lcfg, tasks, batch)
        result["optimizer"] = {"start": start, "end": optimizer_shares(*role_gradients(joint, batch, advantages, cfg))}
        report["gradients"].append(result)
        del joint  # one model in memory at a time
    print("\n" + gradient_table(report["gradients"]))
    for family in sorted({f for r in report["gradients"] for f in r["family"]}):
        print("\n" + gradient_table(report["gradients"], family))
    print("\n" + optimizer_lines(report["gradients"]))
    report["config"] = {"leas": dataclasses.asdict(lcfg), "train": dataclasses.asdict(cfg)}
    path = report_path(cfg, lcfg, grad_only)
    dart.write_json(path, report)
    print(f"\nreport: {path}")
    return report


def command_line(argv):
    if {"-h", "--help"} & set(argv):
        print(dart.help_text(__doc__, LeasConfig, dart.Config))
        return
    cfg, lcfg, grad_only = parse_command_line(argv)
    dart.init_distributed(cfg)
    run_leas(cfg, lcfg, grad_only)


def main(argv):
    dart.cli(command_line, argv)


if __name__ == "__main__":
    main(sys.argv[1:])

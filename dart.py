"""
DART: Disentangled Action-Reasoning Tuning, in one file.

From "Reasoning and Tool-use Compete in Agentic RL" (arXiv 2602.00994). An agent
interleaves free-text reasoning with tool calls. Trained the usual way, one set of
parameters learns from every token, and the two behaviours interfere. DART freezes
the backbone and gives each behaviour its own LoRA adapter; a fixed rule routes every
token to exactly one of them. The method comes first, in the order to read it, and ends at
the line "# ===== The method ends here": stop there and you have read all of it.

the method
    1. token roles: which adapter writes which token
    2. the DART layer: two LoRA adapters as one gated rank-2r LoRA, and a routed forward
       (sections 1-2 are one block between two marker lines that needs torch alone:
       paste it into your own trainer)
    3. the method's settings, each with its default and meaning
    4. GRPO: group advantages, token weights, the clipped loss with KL to the reference
    5. the rollout engine: batched, KV-cached sampling with tool calls in the middle
    6. the update: log-probs, loss masks, one GRPO step on a batch of rollouts
    7. the RL step (sample, roll out, score, update) and the loop (evaluate, step, checkpoint)
the harness (the method calls into it in single lines, each commented)
    8. evaluation and statistics, time and memory
    9. runs: checkpoints, adapters on disk and as PEFT, run folders, train()
    10. models: the embedded tiny default (built and warm-started here) or any HF causal LM
    11. config and command line, the report, --compare (and its rank sweep), --bench
    12. several processes (torchrun): the few lines data parallelism needs

    python dart.py                        # tiny model, a few minutes on 2 CPU cores
    python dart.py --mode=joint --steps=50
    python dart.py --model=Qwen/Qwen2.5-0.5B-Instruct --device=cuda   # never run: no GPU was available
"""
# >>> DART layer
# Token roles and the DART layer. The lines between the two marker lines need torch alone:
# paste them into your own trainer as they are. What is specific to Hugging Face models or
# to this file's rollout engine stays below the block.
import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# 1. Token roles
#
# role(t) is the role of the token that position t PREDICTS (position t's logits predict
# token t+1). It is TOOL iff the prefix up to and including token t is inside an open tool
# span: the last tool tag so far is an opening one. The environment's <obs> also ends a span
# (it answers the call, or reports a malformed one). So the position holding <calc> is TOOL
# (it predicts the argument) and the position holding </calc> is REASONING: deciding to call
# a tool is a reasoning decision; the call's contents and its closing tag are tool tokens.

REASONING, TOOL = 0, 1
OBS, OBS_END, ANSWER, ANSWER_END = "<obs>", "</obs>", "<answer>", "</answer>"


def format_tags(tool_names):
    """Every tag of the format, each of which must be ONE token: <name> and </name> for each
    tool, then the observation and answer tags."""
    return [tag for name in tool_names for tag in (f"<{name}>", f"</{name}>")] + [OBS, OBS_END, ANSWER, ANSWER_END]


@dataclass
class SpanTags:
    """Token ids of the tags that open a tool span (<calc>, ...) and of those that end one
    (</calc>, ..., and <obs>)."""
    opens: torch.Tensor
    ends: torch.Tensor

    @classmethod
    def from_vocab(cls, token_id, tool_names, device="cpu"):
        """token_id: tag text -> token id, e.g. a Hugging Face tokenizer's convert_tokens_to_ids."""
        return cls(opens=torch.tensor([token_id(f"<{name}>") for name in tool_names], device=device),
                   ends=torch.tensor([token_id(f"</{name}>") for name in tool_names] + [token_id(OBS)], device=device))


def token_roles(ids, spans):
    """(B, T) token ids -> (B, T) roles, the rule above in vectorized form."""
    index = torch.arange(ids.shape[-1], device=ids.device).expand_as(ids)
    none = torch.full_like(ids, -1)
    last_open = torch.where(torch.isin(ids, spans.opens.to(ids.device)), index, none).cummax(-1).values
    last_end = torch.where(torch.isin(ids, spans.ends.to(ids.device)), index, none).cummax(-1).values
    return (last_open > last_end).long()


def next_role(role, token, spans):
    """The same rule, one token at a time, for generation (a test checks that they agree)."""
    role = torch.where(torch.isin(token, spans.opens.to(token.device)), TOOL, role)
    return torch.where(torch.isin(token, spans.ends.to(token.device)), REASONING, role)


# -----------------------------------------------------------------------------
# 2. The DART layer
#
# For a frozen linear W and two rank-r adapters stacked into A = [A_r; A_t] and
# B = [B_r B_t]:
#
#     y = W x + B ( g(role) * (A x) )          g: (2r,) gate with the scale alpha/r folded in
#
#     reasoning token:  g = alpha/r * [1 1 .. 1 | 0 0 .. 0]      -> only (A_r, B_r) acts
#     tool token:       g = alpha/r * [0 0 .. 0 | 1 1 .. 1]      -> only (A_t, B_t) acts
#
#             x ──► W ──────────────────────────────►(+)──► y
#             │                                        ▲
#             └──► [A_r; A_t] ──► ⊙ g(role) ──► [B_r B_t]
#
# Same FLOPs as one rank-2r LoRA; the inactive block gets exactly zero gradient at
# that position. joint, joint2r and dart differ in the gate table below alone; reason_only
# and tool_only in which tokens carry loss (loss_mask, section 6); mixlora by a router in each
# layer (DartLinear.router); two_agent by two forwards and two KV caches (routed_forward, new_caches).

# mode -> (gate over the blocks for a REASONING position, for a TOOL position).
# Gate entries sum to 1 per token, so each token's LoRA has the usual alpha/rank scale
# (joint2r is one rank-2r LoRA: alpha/(2r) per unit).
BLOCK_GATES = {
    "joint": ((1.0,), (1.0,)),
    "joint2r": ((0.5, 0.5), (0.5, 0.5)),
    "dart": ((1.0, 0.0), (0.0, 1.0)),
    "reason_only": ((1.0,), (1.0,)),
    "tool_only": ((1.0,), (1.0,)),
    "mixlora": ((0.5, 0.5), (0.5, 0.5)),    # two blocks; a learned router sets each token's gate
    "two_agent": ((1.0, 0.0), (0.0, 1.0)),  # each agent's forward sets every role to its own
}
MODES = tuple(BLOCK_GATES)
ATTENTION_AND_MLP = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class Routing:
    """State shared by every DART layer of one model: the gate of the current forward."""

    def __init__(self, mode, lora_rank, alpha, device):
        self.mode = mode
        self.lora_rank = lora_rank
        self.scale = alpha / lora_rank
        self.table = self.scale * torch.tensor(BLOCK_GATES[mode], device=device).repeat_interleave(lora_rank, -1)
        self.gate = None       # (..., blocks * lora_rank), set by route()
        self.enabled = True    # False = the frozen base model (the KL reference)

    @property
    def blocks(self):
        return self.table.shape[-1] // self.lora_rank

    def route(self, roles):
        """The gate of every position from its role: roles of any shape, a single role for all."""
        self.gate = self.table[roles]


class DartLinear(nn.Module):
    def __init__(self, frozen, routing, dropout, with_router, generator):
        super().__init__()
        self.frozen = frozen
        self.routing = routing
        units = routing.blocks * routing.lora_rank
        A = torch.empty(units, frozen.in_features)
        nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=generator)  # as nn.Linear and PEFT
        self.lora_A = nn.Parameter(A.to(frozen.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(frozen.out_features, units, device=frozen.weight.device))  # y = W x
        self.dropout = nn.Dropout(dropout)
        # mixlora: a router in each wrapped linear makes soft gates over the blocks for every token
        self.router = None
        if with_router:
            self.router = nn.Linear(frozen.in_features, routing.blocks, bias=False, device=frozen.weight.device)
            nn.init.zeros_(self.router.weight)  # uniform gates at the start

    def forward(self, x):
        y = self.frozen(x)
        if not self.routing.enabled:
            return y
        hidden = F.linear(self.dropout(x), self.lora_A)
        if self.router is None:
            gate = self.routing.gate
        else:
            weights = torch.softmax(self.router(x).float(), -1).to(hidden.dtype)
            gate = self.routing.scale * weights.repeat_interleave(self.routing.lora_rank, -1)
        return y + F.linear(hidden * gate, self.lora_B)


def linear_names(model):
    """The names the model's linear layers go by (q_proj, ...): what `targets` may name."""
    return {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, nn.Linear)}


def attach_dart(model, lora_rank=8, alpha=16.0, targets=ATTENTION_AND_MLP, mode="dart", dropout=0.0, seed=0):
    """Freeze the model and wrap every linear named in `targets` in a DartLinear. Returns the
    Routing: set its gate with routing.route(roles) before each forward."""
    if mode not in BLOCK_GATES:
        raise ValueError(f"unknown mode {mode!r}; modes are {', '.join(MODES)}")
    if missing := sorted(set(targets) - linear_names(model)):
        raise ValueError(f"no linear layer named {missing[0]} in this model; its linear layers are "
                         f"{', '.join(sorted(linear_names(model)))}")
    for p in model.parameters():
        p.requires_grad_(False)
    device = next(model.parameters()).device
    routing = Routing(mode, lora_rank, alpha, device)
    generator = torch.Generator().manual_seed(seed)  # A's initialization is part of the seed
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if child_name in targets and isinstance(child, nn.Linear):
                setattr(module, child_name, DartLinear(child, routing, dropout, mode == "mixlora", generator))
    model.eval()  # the frozen base never drops anything; lora_dropout_on() enables LoRA dropout in updates
    return routing


def routed_forward(forward, routing, roles):
    """Logits (as float) with every position routed by its role. `forward(agent)` runs the model
    once and returns its logits. Every mode but two_agent is one forward: route, then run. two_agent
    runs one forward per agent (agent = REASONING, then TOOL), each over the whole context with its
    own adapter (and, when generating, its own KV cache: forward picks it by `agent`), and takes
    each position's logits from the agent of its role."""
    if routing.mode != "two_agent" or not routing.enabled:
        routing.route(roles)
        return forward(REASONING).float()
    logits = []
    for agent in (REASONING, TOOL):
        routing.route(torch.full_like(roles, agent))
        logits.append(forward(agent).float())
    kept_roles = roles[:, -logits[0].shape[1]:]  # the positions whose logits were kept (logits_to_keep)
    return torch.where(kept_roles[..., None] == TOOL, logits[1], logits[0])


@contextlib.contextmanager
def adapters_off(routing):
    """The reference model of the KL term: the same weights with every adapter switched off."""
    routing.enabled = False
    try:
        yield
    finally:
        routing.enabled = True


@contextlib.contextmanager
def lora_dropout_on(model):
    """Dropout on the LoRA branch during the update only: sampling, the reference and evaluation
    use the deterministic network, and the frozen base never drops anything."""
    dropouts = [m.dropout for m in model.modules() if isinstance(m, DartLinear)]
    for d in dropouts:
        d.train()
    try:
        yield
    finally:
        for d in dropouts:
            d.eval()
# <<< DART layer

import atexit
import copy
import dataclasses
import hashlib
import json
import os
import random
import shutil
import sys
import time
from collections import deque
from dataclasses import field

import numpy as np
import torch.distributed as dist
from tqdm import tqdm

import toy_tasks
import tools

# -----------------------------------------------------------------------------
# 3. The method's settings


def option(default, help, valid=None):
    """A config field with its one-line help text (python dart.py --help prints it) and the test
    its value must pass, as (predicate, what it allows); checked as soon as the command line is read."""
    return field(default=default, metadata={"help": help, "valid": valid})


def at_least(low):
    return lambda value: value >= low, f"at least {low}"


def above(low):
    return lambda value: value > low, f"above {low}"


def between(low, high):
    return lambda value: low <= value < high, f"in [{low}, {high})"


def one_of(*choices):
    return lambda value: value in choices, "one of " + ", ".join(choices)


@dataclass
class Method:
    """Every knob the method reads, with its default and meaning (python dart.py --help prints them;
    ranges checked as the command line is read). Config, below the marker, adds the harness's."""
    # what to train
    mode: str = option("dart", "which adapters write which tokens: " + ", ".join(MODES), one_of(*MODES))
    steps: int = option(80, "RL steps", at_least(1))
    seed: int = option(0, "seed of the adapters' initialization, the questions and the sampling", at_least(0))
    # the adapters (section 2)
    lora_rank: int = option(8, "rank r of EACH adapter (DART has two: 2r units in all)", at_least(1))
    alpha: float = option(16.0, "LoRA scale is alpha / r", above(0))
    lora_dropout: float = option(0.0, "dropout on the LoRA branch, in updates only", between(0, 1))
    targets: str = option(",".join(ATTENTION_AND_MLP), "names of the linear layers that get adapters")
    # GRPO and the update (sections 4 and 6)
    questions_per_step: int = option(8, "questions per RL step", at_least(1))
    group_size: int = option(8, "G rollouts per question (GRPO compares the rollouts of a question)", at_least(2))
    lr: float = option(1e-3, "peak AdamW learning rate of the adapters", above(0))
    lr_schedule: str = option("cosine", "cosine (warmup, then decay to 10% of lr at the last step) | constant",
                              one_of("cosine", "constant"))
    warmup_steps: int = option(5, "steps of linear learning-rate warmup", at_least(0))
    temperature: float = option(1.0, "sampling temperature; log-probs use the same", above(0))
    clip_eps: float = option(0.2, "PPO clip range of the ratio", between(0, 1))
    kl_beta: float = option(0.01, "weight of the k3 KL to the adapters-off reference (0 = skip it)", at_least(0))
    scale_std: bool = option(True, "divide advantages by the group std (false, with --loss_agg=dr_grpo: Dr. GRPO)")
    loss_agg: str = option("token_mean", "token_mean | seq_mean | dr_grpo", one_of("token_mean", "seq_mean", "dr_grpo"))
    updates_per_batch: int = option(1, "> 1 makes the clipping matter; 1 = REINFORCE with a group baseline",
                                    at_least(1))
    micro_batch: int = option(8, "rows per forward/backward in the update (memory; the loss is the same at any size)",
                              at_least(1))
    max_grad_norm: float = option(1.0, "gradient clipping", above(0))
    format_bonus: float = option(0.0, "reward for a wrong but well-formed answer (paper: 0)", between(0, 1))
    # the rollout's limits (section 5)
    max_new_tokens: int = option(80, "tokens per response, observations included", at_least(1))
    max_tool_calls: int = option(4, "tool calls per response", at_least(0))
    max_arg_tokens: int = option(24, "tokens in one tool call's argument", at_least(1))
    max_obs_tokens: int = option(24, "tokens of one observation (the warm start's are cut alike)", at_least(1))
    # the loop (section 7)
    eval_every: int = option(20, "RL steps between greedy test evaluations", at_least(1))
    save_every: int = option(20, "RL steps between checkpoints", at_least(1))


# -----------------------------------------------------------------------------
# 4. GRPO
#
# Per question, G rollouts; advantage A = (r - mean) / (std + 1e-4) within the group.
# Per generated token, with ratio rho = pi / pi_old:
#
#     loss_t = -min(rho * A, clip(rho, 1 - eps, 1 + eps) * A) + beta * KL_k3(pi, pi_ref)
#     KL_k3  = exp(ref - logp) - (ref - logp) - 1        (Schulman's k3: unbiased, >= 0)
#
# pi_ref is the same model with its adapters off. pi_old is the first update pass's own
# log-probs, not the sampler's: the two agree only up to floating point (a bfloat16 update after
# float32 sampling differs by ~1e-2 per token), and a ratio across them would clip tokens for no
# reason. So with one update per batch rho = 1 exactly and the gradient is REINFORCE with a
# group-mean baseline; the clip acts only when updates_per_batch > 1.


def group_advantages(rewards, scale_std=True):
    """(Q, G) rewards -> (Q, G) advantages. A group whose rewards are all equal gets zeros."""
    centered = rewards - rewards.mean(-1, keepdim=True)
    if not scale_std:  # Dr. GRPO: no division by the std (it over-weights near-solved questions)
        return centered
    return centered / (rewards.std(-1, keepdim=True, unbiased=False) + 1e-4)


def batch_totals(mask):
    """What the aggregations divide by: (tokens carrying loss, sequences carrying loss, sequences)."""
    mask = mask.float()
    return torch.stack([mask.sum(), (mask.sum(-1) > 0).float().sum(), mask.new_tensor(mask.shape[0])])


def token_weights(mask, loss_agg, max_new_tokens, totals):
    """(B, N) weights so that loss = sum(weights * per-token loss) over the whole batch; computed
    once, so micro-batching the update leaves the loss unchanged. `totals`: the whole batch's
    batch_totals (under torchrun `mask` is one process's share of it)."""
    mask = mask.float()
    tokens, carrying, sequences = totals
    if loss_agg == "token_mean":  # every token counts the same (DAPO)
        return mask / tokens.clamp(min=1)
    if loss_agg == "seq_mean":    # mean per sequence, then over the sequences that carry loss (GRPO)
        return mask / (mask.sum(-1, keepdim=True).clamp(min=1) * carrying.clamp(min=1))
    return mask / (sequences * max_new_tokens)  # dr_grpo: a constant normalizer, the budget


def token_loss(logp, old_logp, ref_logp, advantages, clip_eps, kl_beta):
    """Per-token GRPO loss and k3 KL, for (B, N) log-probs under the current, old (first update
    pass) and reference policies and (B, 1) advantages. Callers zero the slots without loss first: an
    inf there would survive a mask in the forward and turn into NaN in the backward."""
    ratio = torch.exp(logp - old_logp)
    surrogate = torch.min(ratio * advantages, ratio.clamp(1 - clip_eps, 1 + clip_eps) * advantages)
    kl = torch.exp(ref_logp - logp) - (ref_logp - logp) - 1
    return -surrogate + kl_beta * kl, kl


# -----------------------------------------------------------------------------
# 5. The rollout engine
#
# Our own sampling loop, not generate(): the adapter switches per token and tool results
# are spliced in mid-sequence. All rows advance one token per step. Each row has a queue
# of forced tokens: when it closes a tool call, the tool runs and the observation's tokens
# are queued; they are fed instead of sampled ones and carry no loss. Prompts are
# left-padded, with an explicit attention mask and position ids, the same as in training.


def instructions():
    """A --model's system prompt. It holds whole tool spans, so the positions inside them are
    routed to the tool adapter, the same way in rollout and training; a prompt must never hold
    an unclosed tag."""
    usage = ", ".join(tool.usage for tool in tools.TOOLS.values())
    return (f"Answer the question. Tools: {usage}; each call is answered in <obs>...</obs>. "
            f"End with <answer>number</answer>.")


@dataclass
class Special:
    """Token ids the engine needs, read off a tokenizer once."""
    spans: SpanTags   # what the role rule reads
    tool_opened: dict  # id of <calc> -> "calc", ...
    tool_closed: dict  # id of </calc> -> "calc", ...
    obs: int
    obs_end: int
    answer_end: int
    eos: int
    pad: int


def special_ids(tok, device="cpu"):
    ids = {tag: tok.convert_tokens_to_ids(tag) for tag in format_tags(tools.TOOLS)}
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    return Special(spans=SpanTags.from_vocab(ids.get, tools.TOOLS, device),
                   tool_opened={ids[f"<{n}>"]: n for n in tools.TOOLS},
                   tool_closed={ids[f"</{n}>"]: n for n in tools.TOOLS},
                   obs=ids[OBS], obs_end=ids[OBS_END], answer_end=ids[ANSWER_END], eos=tok.eos_token_id, pad=pad)


def autocast(device, dtype):
    """torch.autocast to `dtype` on the device's kind, or nothing for full precision (None)."""
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.split(":")[0], dtype=dtype)


@dataclass
class Policy:
    """Everything the engine and the trainer need: the model and how to talk to it."""
    model: nn.Module
    tok: object
    special: Special
    routing: Routing
    device: str
    sample_dtype: torch.dtype = None  # autocast dtype of sampling and evaluation, None = full precision
    train_dtype: torch.dtype = None   # autocast dtype of the update's forwards and backward
    in_update: bool = False           # inside update_precision(): forwards at train_dtype

    def logits(self, ids, attention_mask, position_ids, roles, caches=None, logits_to_keep=0):
        def forward(agent):
            return self.model(input_ids=ids, attention_mask=attention_mask, position_ids=position_ids,
                              cache=caches[agent] if caches else None, use_cache=caches is not None,
                              logits_to_keep=logits_to_keep).logits

        with autocast(self.device, self.train_dtype if self.in_update else self.sample_dtype):
            return routed_forward(forward, self.routing, roles)


def prompt_ids(tok, question):
    """The prompt: the model's chat template with tool instructions, or (tiny model) <bos>question\\n."""
    if tok.chat_template:
        messages = [{"role": "system", "content": instructions()}, {"role": "user", "content": question}]
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return tok.encode(text, add_special_tokens=False)
    return [tok.bos_token_id] + tok.encode(question + "\n", add_special_tokens=False)


def observation_ids(tok, special, text, max_tokens):
    """Tokens the environment inserts: <obs> text </obs>, tokenized once, tags in the text removed
    (they would change roles), the text cut to max_tokens."""
    for tag in format_tags(tools.TOOLS):
        text = text.replace(tag, "")
    return [special.obs] + tok.encode(text, add_special_tokens=False)[:max_tokens] + [special.obs_end]


def position_ids(attention_mask):
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def new_caches(policy):
    """One KV cache per agent: two_agent feeds every token to both agents."""
    from transformers import DynamicCache
    return [DynamicCache() for _ in range(2 if policy.routing.mode == "two_agent" else 1)]


@dataclass
class Rollout:
    ids: torch.Tensor             # (B, P + N) left-padded prompt, then N response slots
    attention_mask: torch.Tensor  # (B, P + N) 1 on real tokens
    roles: torch.Tensor           # (B, P + N) role each position was routed with
    written_by_policy: torch.Tensor  # (B, N) True where the policy wrote the token (the loss mask)
    logprobs: torch.Tensor        # (B, N) sampling log-prob of each policy token (0 elsewhere)
    texts: list                   # decoded responses
    call_counts: list             # per row, how many calls reached a tool (at most max_tool_calls)
    observation_counts: list      # per row, how many observations the environment inserted
    error_counts: list            # per row, how many of them were errors (malformed or failed calls)

    @property
    def prompt_len(self):
        return self.ids.shape[1] - self.written_by_policy.shape[1]


@dataclass
class EnvState:
    """The environment's state for one trajectory."""
    queue: deque = field(default_factory=deque)  # forced tokens still to feed
    tool: str = None                            # open tool span, if any
    argument: list = field(default_factory=list)
    calls: int = 0                              # calls that reached a tool
    observations: int = 0
    errors: int = 0


def env_step(state, token, policy, registry, cfg):
    """The environment's answer to one token the policy wrote. Malformed calls (nested, unclosed,
    stray closing tag, unknown tool, too long, over the call limit) become error observations."""
    special = policy.special
    result = None
    if token in special.tool_opened:
        if state.tool is not None:
            result = "error: calls cannot nest"
        elif state.calls >= cfg.max_tool_calls:
            result = f"error: at most {cfg.max_tool_calls} tool calls"
        else:
            state.tool, state.argument = special.tool_opened[token], []
    elif token in special.tool_closed:
        if state.tool != special.tool_closed[token]:
            result = "error: no open call"
        else:
            state.calls += 1
            result = tools.run_tool(registry, state.tool, policy.tok.decode(state.argument))
    elif token == special.obs:
        state.tool = None  # the policy wrote <obs> itself: by the role rule the span is over
    elif state.tool is not None:
        state.argument.append(token)
        if len(state.argument) > cfg.max_arg_tokens:
            result = f"error: call over {cfg.max_arg_tokens} tokens"
    if result is not None:
        state.tool = None
        state.observations += 1
        state.errors += result.startswith("error:")
        state.queue.extend(observation_ids(policy.tok, special, result, cfg.max_obs_tokens))


def sample(logits, temperature, generator):
    """Next tokens and their log-probs at the sampling temperature (greedy when it is 0)."""
    if temperature == 0:
        token = logits.argmax(-1)
        return token, torch.zeros_like(logits[:, 0])
    logp = torch.log_softmax(logits / temperature, -1)
    token = torch.multinomial(logp.exp(), 1, generator=generator).squeeze(-1)
    return token, logp.gather(-1, token[:, None]).squeeze(-1)


def pad_sequences(sequences, value, side, device):
    """Lists of different lengths as one (B, width) tensor padded on `side`, and its 0/1 mask."""
    width = max(map(len, sequences))
    ids = torch.full((len(sequences), width), value)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, sequence in enumerate(sequences):
        cols = slice(width - len(sequence), width) if side == "left" else slice(0, len(sequence))
        ids[i, cols] = torch.tensor(sequence)
        mask[i, cols] = 1
    return ids.to(device), mask.to(device)  # built on the host, one copy each to the device


def share_prompts(keys):
    """The G rollouts of a question share its prompt, which is read once. keys: one hashable per
    row, equal for rows with the same prompt. Returns the first row of each distinct key, and for
    every row the index of its key among them."""
    first = {}
    for row, key in enumerate(keys):
        first.setdefault(key, row)
    index = {key: i for i, key in enumerate(first)}
    return list(first.values()), [index[key] for key in keys]


def read_prompts(policy, keys, ids, attention_mask, position, roles, caches):
    """Every row's logits after its prompt, with each distinct prompt read once (the G rows of a
    question share it; `keys` as share_prompts) and its KV cache then copied to each of its rows."""
    first_rows, of_row = (torch.tensor(index, device=ids.device) for index in share_prompts(keys))
    logits = policy.logits(ids[first_rows], attention_mask[first_rows], position[first_rows], roles[first_rows],
                           caches, logits_to_keep=1)[:, -1]
    for cache in caches:
        cache.reorder_cache(of_row)
    return logits[of_row]


def environment_turn(states, live, sampled, policy, registry, cfg):
    """One step of every live row (a row is live while it is still writing), on the host: the next
    forced token if any are queued (no loss), else the sampled one, which the environment reads.
    Returns each row's token, whether the policy wrote it, and whether the row is still live after
    it (it stops after eos or </answer>)."""
    special = policy.special
    tokens, by_policy, live_after = [special.pad] * len(states), [False] * len(states), [False] * len(states)
    for i, token in zip(live, sampled):
        state = states[i]
        if state.queue:
            tokens[i], live_after[i] = state.queue.popleft(), True
            continue
        tokens[i], by_policy[i] = token, True
        env_step(state, token, policy, registry, cfg)
        live_after[i] = token not in (special.eos, special.answer_end)
    return tokens, by_policy, live_after


@torch.no_grad()
def rollout(policy, registry, prompts, cfg, temperature, generator=None):
    """Sample one response per prompt, with tool calls executed as they close. The environment
    runs on the host, and each step reads the device once (the sampled tokens): a read is a sync,
    which on a GPU stalls the queue of work."""
    special, device = policy.special, policy.device
    batch_size, width = len(prompts), max(map(len, prompts))
    # 1. the prompts, left-padded, each distinct one read once
    ids, attention = pad_sequences(prompts, special.pad, "left", device)
    roles, position = token_roles(ids, special.spans), position_ids(attention)
    caches = new_caches(policy)
    logits = read_prompts(policy, list(map(tuple, prompts)), ids, attention, position, roles, caches)
    role, position = roles[:, -1], position[:, -1]
    # 2. decode: every live row advances one token per step
    states = [EnvState() for _ in range(batch_size)]
    live = list(range(batch_size))  # the live rows, in the order of the caches' rows
    live_rows = torch.arange(batch_size, device=device)  # the same, on the device
    steps = []  # per step: (token, written by the policy, row was live, sampling log-prob, role)
    for _ in range(cfg.max_new_tokens):
        sampled, logp = sample(logits, temperature, generator)
        tokens, by_policy, live_after = environment_turn(states, live, sampled.tolist(), policy, registry, cfg)
        token, by_policy = torch.tensor([tokens, by_policy], device=device)
        by_policy = by_policy.bool()
        live_mask = torch.zeros(batch_size, dtype=torch.long, device=device).index_fill(0, live_rows, 1)
        logp = torch.zeros(batch_size, device=device).index_copy(0, live_rows, logp)
        role = next_role(role, token, special.spans)
        position = position + live_mask
        attention = torch.cat([attention, live_mask[:, None]], 1)
        steps.append((token, by_policy, live_mask, torch.where(by_policy, logp, 0.0), role))
        # 3. finished rows leave the decode batch and the caches: the next forwards skip them
        kept = [j for j, i in enumerate(live) if live_after[i]]  # cache rows that stay live
        if not kept:
            break
        if len(kept) < len(live):
            for cache in caches:
                cache.reorder_cache(torch.tensor(kept, device=device))
            live = [live[j] for j in kept]
            live_rows = torch.tensor(live, device=device)
        logits = policy.logits(token[live_rows, None], attention[live_rows], position[live_rows, None],
                               role[live_rows, None], caches, 1)[:, -1]
    # 4. the batch as training reads it, and the responses as text
    response, by_policy, response_attention, logprobs, new_roles = (torch.stack(column, 1) for column in zip(*steps))
    texts = [policy.tok.decode([t for t, on in zip(row, mask) if on])
             for row, mask in zip(response.tolist(), response_attention.tolist())]
    return Rollout(ids=torch.cat([ids, response], 1),
                   attention_mask=torch.cat([attention[:, :width], response_attention], 1),
                   roles=torch.cat([roles, new_roles], 1), written_by_policy=by_policy, logprobs=logprobs,
                   texts=texts, call_counts=[s.calls for s in states],
                   observation_counts=[s.observations for s in states], error_counts=[s.errors for s in states])


# -----------------------------------------------------------------------------
# 6. The update
#
# The log-probs of a batch of rollouts are recomputed by a training forward that reads the
# batch exactly as the rollout did (the same ids, mask, positions and roles), so before any
# update they equal the sampler's. The loss of each token is weighted once for the whole
# batch, and the batch is cut into micro-batches that accumulate gradients.


def response_logits(policy, ids, attention_mask, prompt_len, prompt_keys=None):
    """(B, N, V): the logits that predict each response token, as policy.logits(ids, ...)[:, prompt_len - 1:-1]
    with every position routed by its role, computed the way the rollout computed them (a speed-up,
    and the reason training log-probs equal sampling log-probs): each distinct prompt read once
    (prompt_keys as share_prompts; by default read off the ids), then every row's response on a copy
    of its prompt's KV cache, through which the gradient flows back into the shared prompt."""
    roles, position = token_roles(ids, policy.special.spans), position_ids(attention_mask)
    prompt = (slice(None), slice(None, prompt_len))
    if prompt_keys is None:
        prompt_keys = list(map(tuple, torch.cat([ids[prompt], attention_mask[prompt]], 1).tolist()))
    caches = new_caches(policy)
    last = read_prompts(policy, prompt_keys, ids[prompt], attention_mask[prompt], position[prompt], roles[prompt],
                        caches)
    rest = policy.logits(ids[:, prompt_len:], attention_mask, position[:, prompt_len:], roles[:, prompt_len:], caches)
    return torch.cat([last[:, None], rest[:, :-1]], 1)  # position t's logits predict token t + 1


def response_logprobs(policy, ids, attention_mask, prompt_len, temperature, with_entropy=True, prompt_keys=None):
    """Log-probs (at the sampling temperature) of the response tokens and (with_entropy) the
    policy's entropy at each response position."""
    logits = response_logits(policy, ids, attention_mask, prompt_len, prompt_keys)
    logp_all = torch.log_softmax(logits / temperature, -1)
    entropy = None
    if with_entropy:
        with torch.no_grad():
            entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp_all.gather(-1, ids[:, prompt_len:, None]).squeeze(-1), entropy


@dataclass
class MicroBatch:
    index: torch.Tensor  # the batch's rows it holds
    length: int          # the longest response among them
    prompts: list        # per row, its question's distinct prompt: rows with the same one read it once


def micro_batches(batch, size):
    """The batch's rows `size` at a time, each micro-batch cut to its longest response. Rows are
    ordered by their question group's longest response, so that a group stays together and reads
    its prompt once. Planned on the host before the update, whose loop then never waits on the device."""
    lengths = batch.attention_mask[:, batch.prompt_len:].sum(-1).tolist()
    _, of_row = share_prompts(list(map(tuple, batch.ids[:, :batch.prompt_len].tolist())))
    group_length = {}
    for row, group in enumerate(of_row):
        group_length[group] = max(group_length.get(group, 0), lengths[row])
    order = sorted(range(len(lengths)), key=lambda row: (-group_length[of_row[row]], of_row[row]))
    return [MicroBatch(torch.tensor(rows, device=batch.ids.device), max(lengths[r] for r in rows),
                       [of_row[r] for r in rows]) for rows in (order[i:i + size] for i in range(0, len(order), size))]


def micro_batch_logprobs(policy, batch, part, temperature, with_entropy=True):
    """response_logprobs of a micro-batch's rows, computed on their first `length` response slots
    and padded back to the batch's width with zeros (those slots carry no loss)."""
    end = batch.prompt_len + part.length
    logp, entropy = response_logprobs(policy, batch.ids[part.index, :end], batch.attention_mask[part.index, :end],
                                      batch.prompt_len, temperature, with_entropy, part.prompts)
    pad = (0, batch.written_by_policy.shape[1] - part.length)
    return F.pad(logp, pad), entropy if entropy is None else F.pad(entropy, pad)


def predicting_roles(batch, special):
    """(B, N): the role of the position that predicted each response token (the adapter that wrote it)."""
    return token_roles(batch.ids, special.spans)[:, batch.prompt_len - 1:-1]


def loss_mask(batch, roles, mode):
    """Which response tokens carry loss: those the policy wrote, of the role(s) the mode trains
    (`roles`: predicting_roles)."""
    if mode == "reason_only":
        return batch.written_by_policy & (roles == REASONING)
    if mode == "tool_only":
        return batch.written_by_policy & (roles == TOOL)
    return batch.written_by_policy


@torch.no_grad()
def reference_logprobs(policy, batch, parts, temperature):
    """Log-probs of the batch's response tokens under the KL reference (the adapters off)."""
    ref_logp = torch.zeros_like(batch.logprobs)
    with adapters_off(policy.routing):
        for part in parts:
            ref_logp[part.index] = micro_batch_logprobs(policy, batch, part, temperature, with_entropy=False)[0]
    return ref_logp


def trainable(model):
    """The adapters (and mixlora's routers): the only parameters with a gradient."""
    return [p for p in model.parameters() if p.requires_grad]


def make_optimizer(policy, cfg):
    """AdamW over the adapters (and mixlora's routers) only, without weight decay: the pull
    toward the base model is the KL term's job."""
    return torch.optim.AdamW(trainable(policy.model), lr=cfg.lr, weight_decay=0.0)


def grpo_update(policy, optimizer, batch, advantages, cfg):
    """updates_per_batch GRPO updates on a batch of rollouts (this process's share of it); returns
    per-role metrics of the whole batch. A non-finite loss or gradient skips the update and leaves
    the adapters as they were."""
    params = trainable(policy.model)
    # 1. which tokens carry loss, and each one's weight in the batch's loss
    roles = predicting_roles(batch, policy.special)
    mask = loss_mask(batch, roles, cfg.mode)
    totals = all_reduce_sum(batch_totals(mask))  # harness (torchrun): over every process's share; one: these
    weights = token_weights(mask, cfg.loss_agg, cfg.max_new_tokens, totals)
    parts = micro_batches(batch, cfg.micro_batch)
    log = UpdateLog(batch, mask, roles)
    with update_precision(policy):  # harness: forwards at --train_dtype (by default the sampling's: nothing changes)
        # 2. the reference's log-probs: it does not change between updates, so one forward per batch
        ref_logp = torch.where(mask, reference_logprobs(policy, batch, parts, cfg.temperature), 0.0) \
            if cfg.kl_beta > 0 else None
        old_logp = []  # pi_old per micro-batch: the first pass's own log-probs
        for update in range(cfg.updates_per_batch):
            # 3. forward and backward micro-batch by micro-batch; the gradients add up
            optimizer.zero_grad(set_to_none=True)
            total = torch.zeros((), dtype=torch.float64, device=mask.device)
            for i, part in enumerate(parts):
                rows = part.index
                with lora_dropout_on(policy.model):
                    logp, entropy = micro_batch_logprobs(policy, batch, part, cfg.temperature)
                logp = torch.where(mask[rows], logp, 0.0)
                if update == 0:
                    old_logp.append(logp.detach())
                ref = logp.detach() if ref_logp is None else ref_logp[rows]  # beta = 0: no reference forward
                per_token, kl = token_loss(logp, old_logp[i], ref, advantages[rows, None], cfg.clip_eps, cfg.kl_beta)
                loss = (per_token * weights[rows]).sum()
                loss.backward()
                total += loss.detach()
                log.add(update, rows, logp, per_token, kl, entropy)
            # 4. one optimizer step on the gradients of the whole batch, unless they are not finite
            sum_gradients(params)  # harness (torchrun): the whole batch's gradient; one process: nothing
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            total = all_reduce_sum(total)  # harness (torchrun): the whole batch's loss; one process: this
            loss_value, norm_value = torch.stack([total, grad_norm.double()]).tolist()
            log.passes += 1
            if not (math.isfinite(loss_value) and math.isfinite(norm_value)):
                log.skipped = 1
                optimizer.zero_grad(set_to_none=True)
                break
            optimizer.step()
    return log.metrics(loss_value, norm_value)


class UpdateLog:
    """What grpo_update reports per role (mean loss, KL and entropy of the tokens with loss) and the
    gap between training and sampling log-probs. Read at the end: a read inside the loop would make
    the host wait for the GPU before queueing the next micro-batch."""

    def __init__(self, batch, mask, roles):
        self.batch, self.mask, self.roles = batch, mask, roles
        self.pieces = []
        self.passes, self.skipped = 0, 0

    def add(self, update, rows, logp, per_token, kl, entropy):
        self.pieces.append((update, rows, logp.detach(), per_token.detach(), kl.detach(), entropy))

    def metrics(self, loss, grad_norm):
        roles = ((REASONING, "reason"), (TOOL, "tool"))
        sums = {f"{name}_{role}": 0.0 for name in ("loss", "kl", "entropy") for _, role in roles}
        sums["sampler_gap"] = 0.0  # |training - sampling log-prob| summed over the tokens with loss
        for update, rows, logp, per_token, kl, entropy in self.pieces:
            on = self.mask[rows]
            if update == 0:
                sums["sampler_gap"] += (logp - self.batch.logprobs[rows])[on].abs().sum().item()
            for role, name in roles:
                sel = on & (self.roles[rows] == role)
                sums[f"loss_{name}"] += per_token[sel].sum().item()
                sums[f"kl_{name}"] += kl[sel].sum().item()
                sums[f"entropy_{name}"] += entropy[sel].sum().item()
        counts = {name: (self.mask & (self.roles == role)).sum().item() for role, name in roles}
        summed = torch.tensor(list(sums.values()) + list(counts.values()), dtype=torch.float64, device=self.mask.device)
        summed = all_reduce_sum(summed).tolist()  # harness (torchrun): every process's; one process: these
        sums, counts = dict(zip(sums, summed)), dict(zip(counts, summed[len(sums):]))
        metrics = {"loss": loss, "grad_norm": grad_norm, "skipped": self.skipped,
                   "sampler_gap": sums.pop("sampler_gap") / max(sum(counts.values()), 1)}
        for name, count in counts.items():
            metrics[f"tokens_{name}"] = int(count)
            for key in ("loss", "kl", "entropy"):
                metrics[f"{key}_{name}"] = sums[f"{key}_{name}"] / max(count * self.passes, 1)
        return metrics


# -----------------------------------------------------------------------------
# 7. The RL step and the loop


SEED_STRIDE = 1_000_003  # above any step count: (seed, step) pairs never share a seed
RANK_STRIDE = 7919       # below it: each process's sampling seed differs from every other's


def step_seed(seed, step):
    """Every random choice of a step derives from (seed, step): a resumed run replays exactly."""
    return seed * SEED_STRIDE + step


def warmup_cosine(peak, step, total, warmup_steps, decay=True):
    """Linear warmup over warmup_steps, then constant or (decay) a cosine decay to 10% of the peak
    at step `total`. A function of the step alone, so a resumed run continues the same schedule."""
    ramp = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
    if not decay:
        return peak * ramp
    return peak * ramp * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step / total))))


def learning_rate(cfg, step):
    """The RL learning rate. The decay keeps the last steps small, so that a run ends near its best
    evaluation instead of drifting away from it."""
    return warmup_cosine(cfg.lr, step, max(1, cfg.steps - 1), cfg.warmup_steps, cfg.lr_schedule == "cosine")


def rl_step(policy, optimizer, registry, world, cfg, step):
    """Sample train questions, roll out G answers each, score, update (under torchrun each process
    its share). Returns the metrics and the speed apart: times differ between runs, metrics do not."""
    rank = process_rank()  # harness (torchrun): this process's number; one process: 0
    # 1. the step's questions (the same in every process) and its own sampling seed
    rng = random.Random(step_seed(cfg.seed, step))
    sampling_seed = step_seed(cfg.seed, step) + RANK_STRIDE * rank
    torch.manual_seed(sampling_seed)  # LoRA dropout
    generator = torch.Generator(policy.device).manual_seed(sampling_seed)
    tasks = [toy_tasks.sample_task(rng, world, "train") for _ in range(cfg.questions_per_step)]
    share = cfg.questions_per_step // process_count()  # harness (torchrun): its share; one process: all
    tasks = tasks[rank * share:(rank + 1) * share]
    # 2. G rollouts per question, scored against the gold answer
    prompts = [prompt_ids(policy.tok, t.question) for t in tasks for _ in range(cfg.group_size)]
    batch, rollout_seconds = timed(policy.device, lambda: rollout(policy, registry, prompts, cfg, cfg.temperature,
                                                                  generator))  # harness: timed() returns the time too
    rewards = [toy_tasks.reward(text, tasks[i // cfg.group_size], cfg.format_bonus)
               for i, text in enumerate(batch.texts)]
    advantages = group_advantages(torch.tensor(rewards).view(len(tasks), cfg.group_size), cfg.scale_std)
    advantages = advantages.flatten().to(policy.device)
    # 3. the update
    for group in optimizer.param_groups:
        group["lr"] = learning_rate(cfg, step)
    metrics, update_seconds = timed(policy.device, lambda: grpo_update(policy, optimizer, batch, advantages, cfg))
    # 4. what the step's rollouts did, over every process's (call_stats and peak_memory_mb: harness)
    lengths = batch.attention_mask[:, batch.prompt_len:].sum(-1).tolist()
    rows = gather_lists(list(zip(rewards, batch.call_counts, batch.error_counts, batch.observation_counts, lengths,
                                 batch.texts)))  # every process's rows, in order (in one process: these)
    rewards, calls, errors, observations, lengths, texts = map(list, zip(*rows))
    stats = call_stats(texts, calls, observations, errors)
    rewards = torch.tensor(rewards).view(-1, cfg.group_size)
    metrics.update(reward=rewards.mean().item(), accuracy=(rewards == 1).float().mean().item(),
                   **{key: stats[key] for key in ("tool_calls", "invalid_calls", "answered", "called_tool")},
                   response_tokens=float(np.mean(lengths)),
                   zero_variance_groups=(rewards.std(-1) == 0).float().mean().item())
    speed = {"rollout_s": rollout_seconds, "update_s": update_seconds, "sampled_tokens": int(sum(lengths)),
             "trained_tokens": metrics["tokens_reason"] + metrics["tokens_tool"],
             "peak_mb": peak_memory_mb(policy.device)}
    return metrics, speed


def train_loop(policy, optimizer, registry, world, test, cfg, start, files):
    """Steps `start` (0, or a resumed run's checkpoint) to cfg.steps: a greedy evaluation on the test
    questions every eval_every steps and after the last, an RL step, a checkpoint every save_every."""
    for step in files.progress(range(start, cfg.steps + 1)):  # harness: a progress bar over the steps
        record, speed = {"step": step}, None
        if step % cfg.eval_every == 0 or step == cfg.steps:  # harness: evaluate() reads the adapters, changes nothing
            record.update({f"test_{k}": v for k, v in evaluate(policy, registry, test, cfg).items()})
        if step < cfg.steps:
            metrics, speed = rl_step(policy, optimizer, registry, world, cfg, step)
            check_same_adapters(policy.model, step)  # harness (torchrun): every process holds the same; one: nothing
            record.update(metrics)
        files.log(record, speed)  # harness: metrics.jsonl, speed.jsonl and the progress bar
        if files.writes and step < cfg.steps and ((step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps):
            save_checkpoint(cfg.out, policy, optimizer, cfg, step + 1)  # harness: what --resume reads


# ===== The method ends here. The harness follows: evaluation, runs, models, config, --compare, torchrun =====

# -----------------------------------------------------------------------------
# 8. Evaluation and statistics, time and memory


class DartError(Exception):
    """A problem with the user's input or files: main() prints it as one line, no traceback."""


def call_stats(texts, call_counts, observation_counts, error_counts):
    """Tool use and format health of a set of responses: calls and errors per response, the share of
    observations that were not errors (None when there was none), and the shares with a well-formed
    <answer> and with an answered call (without the format, every reward is 0: nothing to learn)."""
    observations = sum(observation_counts)
    return {"tool_calls": float(np.mean(call_counts)),
            "valid_calls": 1 - sum(error_counts) / observations if observations else None,
            "invalid_calls": float(np.mean(error_counts)),
            "answered": float(np.mean([toy_tasks.parse_answer(t) is not None for t in texts])),
            "called_tool": float(np.mean([n > 0 for n in observation_counts]))}


def skill_rates(tasks, texts, skills):
    """Per skill (a decision where the demonstrator errs), the share of the questions with that
    pitfall on which the response reached the decision and got it right; None where none did."""
    verdicts = {skill: [] for skill in skills}
    for task, text in zip(tasks, texts):
        pitfalls = {skill for skill, _, _ in task.slips}
        for skill, right in toy_tasks.judge(task, text).items():
            if skill in pitfalls:
                verdicts[skill].append(right)
    return {f"skill_{skill}": float(np.mean(v)) if v else None for skill, v in verdicts.items()}


@torch.no_grad()
def evaluate(policy, registry, tasks, cfg, batch_size=256):
    """Greedy accuracy on `tasks` per family and per skill, tool use, format health, and each
    question's 0/1 result (for paired comparisons). Under torchrun each process answers a share."""
    mine = list(range(process_rank(), len(tasks), process_count()))
    answers = []
    for start in tqdm(range(0, len(mine), batch_size), desc="eval", leave=False, disable=process_rank() > 0):
        index = mine[start:start + batch_size]
        out = rollout(policy, registry, [prompt_ids(policy.tok, tasks[i].question) for i in index], cfg, temperature=0)
        answers += zip(index, [int(toy_tasks.reward(text, tasks[i]) == 1.0) for text, i in zip(out.texts, index)],
                       out.call_counts, out.observation_counts, out.error_counts, out.texts)
    _, correct, calls, observations, errors, texts = (list(column) for column in zip(*sorted(gather_lists(answers))))
    metrics = {"acc": float(np.mean(correct))}
    for family in sorted({t.family for t in tasks}):
        metrics[f"acc_{family}"] = float(np.mean([c for c, t in zip(correct, tasks) if t.family == family]))
    metrics.update(skill_rates(tasks, texts, world_of(cfg).skill_roles))
    stats = call_stats(texts, calls, observations, errors)
    metrics.update({k: stats[k] for k in ("tool_calls", "valid_calls", "answered", "called_tool")}, correct=correct)
    return metrics


def timed(device, work):
    """work()'s result and its wall time, counted until the device has finished what it was given."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    started = time.perf_counter()
    result = work()
    sync()
    return result, time.perf_counter() - started


def reset_peak_memory(device):
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    elif os.path.exists("/proc/self/clear_refs"):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # Linux: restart the process's peak-RSS counter


def peak_memory_mb(device):
    """CUDA: peak allocated tensor memory. CPU: the process's peak resident memory (Linux), which
    includes Python and the frozen model, so only the differences between modes are the adapters'."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2 ** 20
    if os.path.exists("/proc/self/status"):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    return float("nan")


# -----------------------------------------------------------------------------
# 9. Runs: checkpoints, adapters on disk, run folders, train()


def adapter_state(model):
    """A copy of the trainable tensors (a copy: detach() alone would alias the live weights)."""
    return {name: p.detach().to("cpu", copy=True) for name, p in model.named_parameters() if p.requires_grad}


def load_trainable(model, state):
    """Load adapter tensors; every trainable tensor must be there with its shape (the frozen base is
    not). Checked before anything is copied, so adapters of another model or mode are refused whole."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(state) != set(params):
        raise DartError(f"adapters for another model or mode: {len(set(state) ^ set(params))} tensor names differ")
    if wrong := [n for n, p in params.items() if tuple(state[n].shape) != tuple(p.shape)]:
        raise DartError(f"adapters for another rank or mode: {wrong[0]} has shape {tuple(state[wrong[0]].shape)}, "
                        f"this model's has {tuple(params[wrong[0]].shape)}")
    model.load_state_dict(state, strict=False)


def block_units(block, lora_rank):
    """The intermediate units of adapter block `block` (0: reasoning, 1: tool) in a DART layer."""
    return slice(block * lora_rank, (block + 1) * lora_rank)


def load_adapter_block(model, state, block, lora_rank):
    """Copy a single-block adapter (a joint / reason_only / tool_only run) into block `block` of
    this model's layers: the inference-time hybrids of LEAS cost no training."""
    params = dict(model.named_parameters())
    units = block_units(block, lora_rank)
    with torch.no_grad():
        for name, value in state.items():
            if name.endswith("lora_A"):
                params[name][units] = value
            elif name.endswith("lora_B"):
                params[name][:, units] = value


def atomic_write(path, write):
    """Write to a temporary file and rename: a run killed mid-write keeps the previous file."""
    tmp = f"{path}.tmp{os.getpid()}"
    write(tmp)
    os.replace(tmp, path)


def write_json(path, value):
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(value, f, indent=1)
    atomic_write(path, write)


def read_jsonl(path):
    """A log's records, one a line; a last line cut by a kill during an append is dropped with a note."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:  # a kill cuts the last line only, and a resumed run rewrites the log
            if i + 1 < len(lines):
                raise DartError(f"{path} is damaged at line {i + 1} ({e})") from e
            tqdm.write(f"note: dropped the half-written last line of {path}")
    return records


def save_checkpoint(run_dir, policy, optimizer, cfg, step):
    """checkpoint.pt (adapters, optimizer, step and the run's settings: what --resume needs) and
    adapters.safetensors (the adapters alone, for inference, LEAS and the PEFT export)."""
    from safetensors.torch import save_file
    state = adapter_state(policy.model)
    atomic_write(os.path.join(run_dir, "checkpoint.pt"), lambda p: torch.save(
        {"step": step, "adapters": state, "optimizer": optimizer.state_dict(), "config": dataclasses.asdict(cfg)}, p))
    metadata = {"step": str(step), "config": json.dumps(dataclasses.asdict(cfg))}
    atomic_write(os.path.join(run_dir, "adapters.safetensors"), lambda p: save_file(state, p, metadata=metadata))


def load_checkpoint(run_dir, policy, optimizer, cfg):
    """Restore adapters and optimizer; returns the step to continue from (0 without a checkpoint)."""
    path = os.path.join(run_dir, "checkpoint.pt")
    if not os.path.exists(path):
        return 0
    advice = "Delete that file to restart the run from step 0, or resume with the settings it was made with."
    try:
        # onto the CPU: AdamW keeps its step counts there (loaded onto a GPU, every optimizer step
        # would wait on a read of each of them); load_state_dict moves the rest to the adapters' device
        state = torch.load(path, map_location="cpu", weights_only=True)
        saved = Config(**state["config"])
        if changed := differing_setting(saved, cfg, RESUME_MAY_CHANGE):
            raise DartError(f"{path} holds adapters of another run (its --{changed} is {getattr(saved, changed)!r}, "
                            f"not {getattr(cfg, changed)!r}). {advice}")
        if int(state["step"]) > cfg.steps:  # the loop would not run, and the run would pass for a shorter one
            raise DartError(f"{path} is at step {state['step']}: --steps={cfg.steps} would end the run before it")
        load_trainable(policy.model, state["adapters"])
        optimizer.load_state_dict(state["optimizer"])
        return int(state["step"])
    except DartError:
        raise
    except Exception as e:  # any other failure means the file is not a checkpoint of this run
        raise DartError(f"cannot resume from {path} ({type(e).__name__}: {str(e)[:200]}). {advice}") from e


def write_peft_adapters(run_dir):
    """A run's adapters as PEFT LoRA adapters, a folder per block (peft/reasoning and peft/tool, or
    peft/shared): with PEFT on the run's base, each gives DART's logits with every token in its role."""
    from safetensors.torch import save_file
    cfg = saved_config(run_dir)
    if cfg.mode == "mixlora":
        raise DartError("mixlora's per-token soft router has no PEFT LoRA equivalent")
    state, path = load_adapters(run_dir), os.path.join(run_dir, "adapters.safetensors")
    names = ("reasoning", "tool") if BLOCK_GATES[cfg.mode] == BLOCK_GATES["dart"] else ("shared",)
    lora_rank = cfg.lora_rank * (2 if cfg.mode == "joint2r" else 1)  # joint2r: one rank-2r LoRA, scale alpha / 2r
    for block, name in enumerate(names):
        units, tensors = block_units(block, lora_rank), {}
        for key, value in state.items():  # e.g. model.layers.0.self_attn.q_proj.lora_A
            module, part = key.rsplit(".", 1)
            if part not in ("lora_A", "lora_B") or value.shape[0 if part == "lora_A" else 1] < units.stop:
                raise DartError(f"{path} does not hold this run's adapters ({key} has shape {tuple(value.shape)})")
            tensors[f"base_model.model.{module}.{part}.weight"] = (value[units] if part == "lora_A"
                                                                   else value[:, units]).contiguous()
        folder = os.path.join(run_dir, "peft", name)
        os.makedirs(folder, exist_ok=True)
        save_file(tensors, os.path.join(folder, "adapter_model.safetensors"))
        write_json(os.path.join(folder, "adapter_config.json"), {
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lora_rank, "lora_alpha": cfg.alpha,
            "lora_dropout": cfg.lora_dropout, "bias": "none", "fan_in_fan_out": False,
            "target_modules": sorted({k.rsplit(".", 2)[1] for k in state}),
            "base_model_name_or_path": cfg.cached_base or os.path.abspath(base_path(cfg)), "inference_mode": True,
            "init_lora_weights": True, "use_rslora": False, "use_dora": False, "modules_to_save": None})
    return [os.path.join(run_dir, "peft", name) for name in names]


def load_adapters(run_dir):
    """A run's adapters.safetensors; a missing or damaged file is refused in one line that names it."""
    from safetensors.torch import load_file
    path = os.path.join(run_dir, "adapters.safetensors")
    try:
        return load_file(path)
    except Exception as e:  # missing (a run writes it at its first checkpoint) or damaged
        raise DartError(f"cannot read {path} ({type(e).__name__}: {str(e)[:150]}); resume the run if it is "
                        f"unfinished, else delete its folder to train it again") from e


def saved_config(run_dir):
    """The Config a run directory's config.json holds, checked as the command line is."""
    path = os.path.join(run_dir, "config.json")
    if not os.path.isfile(path):
        raise DartError(f"{run_dir} is not a run directory (no config.json in it). Pass the folder a previous "
                        f"run printed, e.g. runs/<time>-dart-s0.")
    try:
        with open(path) as f:
            cfg = Config(**json.load(f))
    except (OSError, ValueError, TypeError) as e:  # unreadable, not JSON, or not this Config's fields
        raise DartError(f"{path} is not a config.json this dart.py wrote ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:120]}); pass the folder of a run made with this version") from e
    check_config(cfg, f"{path}: ")
    return cfg


# settings that say where a run lives and which command started it, not what it trains
NOT_THE_RUN = {"out", "resume", "cached_base", "cache_dir", "compare", "modes", "seeds", "ranks", "bench",
               "export_peft"}
# what a --resume may change besides: the length (under a constant learning rate), how often to evaluate and save,
# where and in what precision to compute, the micro-batch; never the base or the test set
RESUME_MAY_CHANGE = NOT_THE_RUN - {"cached_base"} | {"steps", "eval_every", "save_every", "device", "dtype",
                                                     "train_dtype", "micro_batch"}


def differing_setting(saved, cfg, may_differ):
    """The first setting, outside `may_differ`, in which two configs differ (None when they agree):
    the one check behind --resume, a checkpoint's loading, and the reuse of finished runs."""
    return next((f.name for f in dataclasses.fields(cfg)
                 if f.name not in may_differ and getattr(cfg, f.name) != getattr(saved, f.name)), None)


def claim(run_dir):
    """Make this process the one writer of a run folder until it exits: train, --resume, reuse and
    leas.py claim each folder they touch. The claim is RUN.lock beside it, made with O_EXCL, holding
    the pid (a torchrun job's rank 0 holds it for all of its processes); a dead process's is stale."""
    lock = os.path.abspath(run_dir) + ".lock"
    if holder := broadcast_from_first(lock_holder(lock) if process_rank() == 0 else None):
        raise DartError(f"{run_dir} is in use by process {holder}; wait for it to end, or pass another folder "
                        f"(if that process is gone, delete {lock})")


def lock_holder(lock):
    """None once `lock` is this process's (removed at its exit), else its live holder's pid and command."""
    os.makedirs(os.path.dirname(lock), exist_ok=True)
    while True:
        with contextlib.suppress(FileExistsError), open(lock, "x") as f:  # "x": O_EXCL, one process alone wins
            f.write(f"{os.getpid()} ({' '.join(sys.argv)})")
            atexit.register(os.remove, lock)
            return None
        with contextlib.suppress(FileNotFoundError), open(lock) as f:  # unless its holder just removed it
            holder = f.read()
            pid = int(holder.split()[0]) if holder[:1].isdigit() else None
            if pid is None or pid == os.getpid() or process_alive(pid):  # this process's own: taken again
                return None if pid == os.getpid() else holder or "(one that has not written its pid yet)"
            os.remove(lock)  # stale: its process was killed before its exit


def process_alive(pid):
    try:
        return os.kill(pid, 0) is None  # signal 0 only asks whether the process exists
    except OSError as e:
        return isinstance(e, PermissionError)  # it does, under another user


def train_or_reuse(run):
    """Train `run` into run.out; reuse it when the folder holds it finished, and resume it on its own
    base when it stopped early. A folder holding a run with other settings is refused, not overwritten."""
    run = resolved(run)
    claim(run.out)
    if os.path.exists(os.path.join(run.out, "metrics.jsonl")):
        saved = saved_config(run.out)
        run = dataclasses.replace(run, cached_base=run.cached_base or saved.cached_base)
        if changed := differing_setting(saved, run, NOT_THE_RUN - {"cached_base"}):
            raise DartError(f"{run.out} holds a run with --{changed}={getattr(saved, changed)!r}, not "
                            f"{getattr(run, changed)!r}: pass another folder, or the settings it was made with")
        if any(r["step"] == run.steps and "test_acc" in r for r in read_jsonl(os.path.join(run.out, "metrics.jsonl"))):
            if process_rank() == 0:
                print(f"reusing {run.out}")
            return
        run = dataclasses.replace(run, resume=run.out)
    train(run, report=False)


def runs_folder(cfg):
    """Where the runs of --compare and leas.py live, found and reused by any command with the same settings:
    runs/<model>-<hash>/r<rank>/<mode>-s<seed>, the hash of the settings they share as resolved on this machine
    (alpha/r included) and of their base's key (the world, the tools' answers in the demonstrations, the warm start)."""
    shared = {k: v for k, v in dataclasses.asdict(resolved(cfg)).items()
              if k not in NOT_THE_RUN | {"mode", "seed", "lora_rank", "alpha"}}
    shared.update(alpha_over_rank=cfg.alpha / cfg.lora_rank, base=base_key(cfg))
    return os.path.join("runs", f"{folder_name(cfg.model)}-{short_hash(shared)}")


NO_SIGNAL_STEPS = 3


def no_signal_warning(history):
    """One line, or None: when every group of the last NO_SIGNAL_STEPS steps had equal rewards, every
    advantage was zero and nothing was learned in them, at the start of a run or later."""
    steps = [r for r in history if "zero_variance_groups" in r][-NO_SIGNAL_STEPS:]
    if len(steps) < NO_SIGNAL_STEPS or any(r["zero_variance_groups"] < 1 for r in steps):
        return None
    if all(r["accuracy"] == 1 for r in steps):
        return (f"warning: no learning signal: every rollout of the last {NO_SIGNAL_STEPS} steps was right, so "
                f"every advantage is 0; the task is too easy for this model.")
    return (f"warning: no learning signal: in the last {NO_SIGNAL_STEPS} steps all rollouts of each question got "
            f"the same reward ({np.mean([r['accuracy'] for r in steps]):.0%} right, "
            f"{np.mean([r['answered'] for r in steps]):.0%} with a well-formed <answer>), so every advantage is 0 "
            f"and nothing is learned. Give the model the format first (--warm_steps=N steps of supervised "
            f"warm start), add --format_bonus=0.1, or use a stronger --model; Ctrl-C stops this run.")


class RunFiles:
    """The run directory: config.json, metrics.jsonl (a JSON object per step), speed.jsonl. Created once the model
    is loaded and a resumed run's checkpoint read: a run that fails before it trains leaves nothing. Rank 0 writes."""

    def __init__(self, cfg, start):
        self.dir, self.mode, self.first, self.writes, self.history = cfg.out, cfg.mode, start, process_rank() == 0, []
        if not self.writes:
            return
        os.makedirs(self.dir, exist_ok=True)
        write_json(os.path.join(self.dir, "config.json"), dataclasses.asdict(cfg))
        # a resumed run redoes the steps after its checkpoint: their lines go
        self.history = self.keep_steps_before("metrics.jsonl", start)
        self.keep_steps_before("speed.jsonl", start)

    def keep_steps_before(self, name, step):
        path = os.path.join(self.dir, name)
        kept = [r for r in read_jsonl(path) if r["step"] < step]
        with open(path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)
        return kept

    def append(self, name, record):
        with open(os.path.join(self.dir, name), "a") as f:
            f.write(json.dumps(record) + "\n")

    def progress(self, steps):  # the steps on a progress bar, which log() annotates (rank 0's alone shows)
        self.bar = tqdm(steps, desc=f"RL {self.mode}", initial=steps.start, total=steps.stop, disable=not self.writes)
        return self.bar

    def log(self, record, speed):
        if not self.writes:
            return
        if "test_acc" in record:
            self.bar.set_description(f"RL {self.mode} (test acc {record['test_acc']:.0%})")
            if record["step"] == self.first:
                tqdm.write(f"step {record['step']}: test accuracy {record['test_acc']:.0%}; format: "
                           f"{record['test_answered']:.0%} of answers well-formed, "
                           f"{record['test_called_tool']:.0%} call a tool")
        if "reward" in record:
            self.bar.set_postfix(reward=f"{record['reward']:.2f}", tool_calls=f"{record['tool_calls']:.1f}")
        self.history.append(record)
        if (warning := no_signal_warning(self.history)) and not no_signal_warning(self.history[:-1]):  # once a loss
            tqdm.write(warning)
        self.append("metrics.jsonl", record)
        if speed is not None:
            self.append("speed.jsonl", {"step": record["step"], **speed})


def train(cfg, report=True):
    """The whole RL run. Returns the run directory: RunFiles' files, adapters.safetensors and results.md."""
    # 1. the settings, checked before anything is built and resolved (auto: what it is here); the folder; the base
    check_config(cfg)
    cfg = resolved(cfg)
    if cfg.questions_per_step % process_count():
        raise DartError(f"--questions_per_step={cfg.questions_per_step} must be a multiple of the number of "
                        f"processes ({process_count()}): each process rolls out whole groups")
    stamp = time.strftime("%Y%m%d-%H%M%S")  # and the pid: two runs started in one second get two folders
    cfg.out = broadcast_from_first(cfg.out or os.path.join("runs", f"{stamp}-{cfg.mode}-s{cfg.seed}-{os.getpid()}"))
    claim(cfg.out)
    if not cfg.resume and os.path.exists(os.path.join(cfg.out, "metrics.jsonl")):
        raise DartError(f"{cfg.out} already holds a run; continue it with --resume={cfg.out}, or pass another --out")
    cfg.cached_base = cfg.cached_base or os.path.abspath(base_path(cfg))  # recorded: a resumed run reuses this base
    # 2. the policy, the world, the optimizer (and a resumed run's checkpoint)
    with first_process_first():
        policy = load_policy(cfg)
    reset_peak_memory(policy.device)  # a run's peak memory counts from here, the model loaded
    world = world_of(cfg)
    registry = tools.registry(world.kb)
    test = toy_tasks.test_set(world, cfg.eval_per_family)
    optimizer = make_optimizer(policy, cfg)
    start = load_checkpoint(cfg.out, policy, optimizer, cfg) if cfg.resume else 0
    files = RunFiles(cfg, start)
    train_loop(policy, optimizer, registry, world, test, cfg, start, files)  # 3. the loop (section 7)
    # 4. results.md, and the report: the table, the reward curve, a trajectory by role
    if files.writes:
        table, curve = write_results(cfg.out, files.history, cfg)
        if report:
            print_report(cfg.out, table, curve, policy, registry, test, cfg)
    return cfg.out


# -----------------------------------------------------------------------------
# 10. Models
#
# The base the adapters sit on, cached on disk and reused: either the embedded tiny default
# (a Llama of ~2M parameters and a BPE trained on the task vocabulary, built here), or any HF
# causal LM with the tags added as single tokens. Both get the same short supervised warm start
# on the demonstrator's trajectories first, so that they know the format.


def build_tokenizer(cfg, world):
    """Byte-level BPE trained on the task templates, every digit its own token, tags atomic."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=cfg.tiny_vocab, special_tokens=["<pad>", "<bos>", "<eos>"] + format_tags(tools.TOOLS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(toy_tasks.tokenizer_corpus(world), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")


def new_tiny_model(cfg, tok):
    """A randomly initialized Llama of the tiny_* size (a few M parameters)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(vocab_size=len(tok), hidden_size=cfg.tiny_dim, intermediate_size=3 * cfg.tiny_dim,
                         num_hidden_layers=cfg.tiny_layers, num_attention_heads=cfg.tiny_heads,
                         num_key_value_heads=cfg.tiny_heads, max_position_embeddings=512, tie_word_embeddings=True,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return LlamaForCausalLM(config)


def hf_model(cfg):
    """--model (any HF causal LM) with the tags as single tokens, checked for the linear layers
    that --targets names before minutes of warm start are spent on it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    name = cfg.model
    looks_like_path = name.startswith(("/", ".", "~")) or name.count("/") > 1  # hub ids are owner/name
    if looks_like_path and not os.path.isdir(os.path.expanduser(name)):
        raise DartError(f"--model={name} looks like a path but no such directory exists; pass a folder "
                        f"with config.json and weights, or omit --model for the embedded tiny model.")
    try:
        tok = AutoTokenizer.from_pretrained(os.path.expanduser(name))
        model = AutoModelForCausalLM.from_pretrained(os.path.expanduser(name), dtype=torch.float32)
    except Exception as e:  # hub, network and format errors all mean the same thing to the user
        raise DartError(f"cannot load --model={name} ({type(e).__name__}: {str(e).splitlines()[0][:150]}). Pass a "
                        f"folder with config.json and weights, or omit --model for the embedded tiny model.") from e
    if missing := sorted(set(cfg.targets.split(",")) - linear_names(model)):
        raise DartError(f"--targets={cfg.targets}: --model={name} has no linear layer named {missing[0]}; "
                        f"its linear layers are {', '.join(sorted(linear_names(model)))}")
    add_tag_tokens(model, tok)
    return model, tok


def add_tag_tokens(model, tok):
    """Make every tag one token: a missing tag is added, its input and output embeddings the mean
    of its text's pieces. The matrix grows only when the tokenizer outgrows it (many models keep
    spare rows: Qwen2.5 has 151,936 for 151,665 tokens)."""
    missing = [tag for tag in format_tags(tools.TOOLS) if tag not in tok.get_vocab()]
    if not missing:
        return
    pieces = {tag: tok.encode(tag, add_special_tokens=False) for tag in missing}
    tok.add_tokens(missing, special_tokens=True)
    if len(tok) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tok), mean_resizing=False)
    with torch.no_grad():
        for matrix in {id(m): m for m in (model.get_input_embeddings().weight,
                                          model.get_output_embeddings().weight)}.values():
            for tag, ids in pieces.items():
                matrix[tok.convert_tokens_to_ids(tag)] = matrix[ids].mean(0)


# the warm start's (steps, batch size, learning rate) when --warm_steps, --warm_batch, --warm_lr are
# left at -1: the tiny model learns the format from scratch, a pretrained one needs a short nudge
WARM_START_DEFAULTS = {"tiny": (600, 32, 1e-3), "pretrained": (60, 8, 1e-4)}


def warm_start_settings(cfg):
    defaults = WARM_START_DEFAULTS["tiny" if cfg.model == "tiny" else "pretrained"]
    return tuple(default if value == -1 else value
                 for value, default in zip((cfg.warm_steps, cfg.warm_batch, cfg.warm_lr), defaults))


def trajectory_ids(tok, special, trajectory, max_obs_tokens):
    """A written-out trajectory as (token ids, written-by-policy 0/1 list): the observations are
    tokenized by observation_ids and cut to max_obs_tokens, exactly as the environment inserts them."""
    ids, by_policy, rest = [], [], trajectory
    while rest:
        before, _, after = rest.partition(OBS)
        content, _, rest = after.partition(OBS_END)
        piece = tok.encode(before, add_special_tokens=False)
        ids += piece
        by_policy += [1] * len(piece)
        if after:
            obs = observation_ids(tok, special, content, max_obs_tokens)
            ids += obs
            by_policy += [0] * len(obs)
    return ids, by_policy


def imitate_demonstrations(model, tok, params, cfg, lr, device, dtype, desc):
    """The supervised warm start: `params` learn the demonstrator's trajectories (loss on the tokens
    the policy writes). Short on purpose: the base should know the format and leave room for RL."""
    steps, batch_size, _ = warm_start_settings(cfg)
    world = world_of(cfg)
    special = special_ids(tok)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    rng = random.Random(cfg.warm_seed)
    bar = tqdm(range(steps), desc=desc, leave=False)
    for step in bar:
        for group in opt.param_groups:  # warmup over the first 5% of the steps, then a cosine decay
            group["lr"] = warmup_cosine(lr, step, steps, max(1, steps // 20))
        sequences, targets = [], []
        for _ in range(batch_size):
            task = toy_tasks.sample_task(rng, world, "train")
            prompt = prompt_ids(tok, task.question)
            ids, by_policy = trajectory_ids(tok, special, toy_tasks.demonstration(rng, task), cfg.max_obs_tokens)
            sequences.append(prompt + ids)
            targets.append([0] * len(prompt) + by_policy)
        ids, attention = pad_sequences(sequences, special.pad, "right", device)
        target_mask = pad_sequences(targets, 0, "right", device)[0].bool()
        with autocast(device, dtype):
            logits = model(input_ids=ids, attention_mask=attention).logits[:, :-1]
        labels = ids[:, 1:].masked_fill(~target_mask[:, 1:], -100)
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return model.eval()


# The warm start's memory. Training every weight with AdamW holds 16 bytes a parameter (weight,
# gradient, two moments): 7.9 GB for Qwen2.5-0.5B's 494M, more than a laptop GPU's 8 GB. So on a
# GPU it trains a frozen bfloat16 copy (1.0 GB) with a rank-64 LoRA on every linear (35M x 16 bytes
# = 0.6 GB) and the tags' rows; with activations (~1.5 GB, 8 rows of ~150 tokens) and the logits and
# their gradient (~3 GB), about 6 GB. The LoRA is merged in float32 into the original weights, which
# never left the CPU. None of this has been measured on a GPU yet.
WARM_LORA_RANK, WARM_LORA_ALPHA = 64, 128.0
WARM_LORA_LR_FACTOR = 10  # LoRA's best learning rate is about 10x that of training every weight


def warm_weights(cfg, device):
    """What the warm start trains: "all" weights, or a "lora" and the tags' rows (auto: lora for a
    --model on CUDA, where memory is scarce; all elsewhere, and for the tiny model's random weights)."""
    if cfg.warm_weights != "auto":
        return cfg.warm_weights
    return "lora" if cfg.model != "tiny" and device.startswith("cuda") else "all"


def warm_dtype(cfg, device):
    """The warm start's autocast dtype: the update's for a --model (bfloat16 on a GPU that computes
    it: memory), full precision for the tiny model, whose base should not depend on the RL's."""
    return None if cfg.model == "tiny" else autocast_dtypes(cfg, device)[1]


def trainable_tag_rows(model, tag_ids):
    """The tags' rows of the input and output embeddings as parameters of their own (one when tied),
    put in place by forward hooks, so that no gradient or AdamW moment covers the whole vocabulary.
    The hooks stay on `model`: call it on a copy that is thrown away after."""
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    ids = torch.tensor(tag_ids, device=embed.weight.device)
    rows_in = nn.Parameter(embed.weight[ids].detach().float().clone())
    rows_out = rows_in if head.weight is embed.weight else nn.Parameter(head.weight[ids].detach().float().clone())
    with torch.no_grad():  # the factor the embedding multiplies a row by (1 mostly, sqrt(hidden size) in Gemma)
        rows, out = embed.weight[ids].float(), embed(ids).float()
        scale = ((out * rows).sum() / (rows * rows).sum()).item()
    if not torch.allclose(out, scale * rows, rtol=1e-2, atol=1e-2 * out.abs().max().item()):  # no hook can stand in
        raise DartError(f"the input embedding ({type(embed).__name__}) does more than scale its rows, so "
                        f"--warm_weights=lora cannot train the tags' rows; use --warm_weights=all")
    slot = torch.full(embed.weight.shape[:1], -1, device=ids.device)  # token id -> its tag's row, or -1
    slot[ids] = torch.arange(len(ids), device=ids.device)

    def embed_rows(module, args, out):  # the rows as the module's own computation would output them
        tag = slot[args[0]]
        return torch.where(tag[..., None] >= 0, (scale * rows_in[tag.clamp(min=0)]).to(out.dtype), out)

    def head_rows(module, args, out):
        return out.index_copy(-1, ids, F.linear(args[0], rows_out).to(out.dtype))

    embed.register_forward_hook(embed_rows)
    head.register_forward_hook(head_rows)
    return rows_in, rows_out


def lora_warm_start(model, tok, cfg, device, dtype):
    """The warm start in a small GPU's memory (see above): a frozen copy of `model` in `dtype` trains
    a rank-64 LoRA and the tags' rows, then written into `model`: W += (alpha / rank) B A, and the rows."""
    targets = [name for name in ATTENTION_AND_MLP if name in linear_names(model)]
    if not targets:
        raise DartError(f"--model={cfg.model} has no linear layer named {', '.join(ATTENTION_AND_MLP)} for the LoRA "
                        f"warm start; use --warm_weights=all")
    student = copy.deepcopy(model).to(device, dtype or torch.float32)
    routing = attach_dart(student, WARM_LORA_RANK, WARM_LORA_ALPHA, targets, mode="joint", seed=cfg.warm_seed)
    routing.route(torch.tensor(REASONING, device=device))  # joint: one block, the same gate for every token
    tag_ids = tok.convert_tokens_to_ids(format_tags(tools.TOOLS))
    rows_in, rows_out = trainable_tag_rows(student, tag_ids)
    rows = [rows_in] if rows_out is rows_in else [rows_in, rows_out]
    imitate_demonstrations(student.train(), tok, trainable(student) + rows, cfg,
                           warm_start_settings(cfg)[2] * WARM_LORA_LR_FACTOR, device, dtype,
                           f"warm start ({cfg.model}, LoRA rank {WARM_LORA_RANK})")
    with torch.no_grad():
        for name, layer in student.named_modules():
            if isinstance(layer, DartLinear):
                model.get_submodule(name).weight += (routing.scale * layer.lora_B @ layer.lora_A).cpu()
        model.get_input_embeddings().weight[tag_ids] = rows_in.cpu()
        model.get_output_embeddings().weight[tag_ids] = rows_out.cpu()
    return model


def build_base(cfg, device):
    """The base before RL: the tiny model (its tokenizer trained here, its weights random) or
    --model with the tags added, then the supervised warm start (--warm_steps=0: none), which
    always trains the tags' embedding rows: without them no model can learn to write a tag."""
    if cfg.model == "tiny":
        tok = build_tokenizer(cfg, world_of(cfg))
        torch.manual_seed(cfg.warm_seed)
        model = new_tiny_model(cfg, tok).to(device)
    else:
        model, tok = hf_model(cfg)
        torch.manual_seed(cfg.warm_seed)
    steps, _, lr = warm_start_settings(cfg)
    if steps > 0:
        dtype = warm_dtype(cfg, device)
        if warm_weights(cfg, device) == "lora":
            return lora_warm_start(model, tok, cfg, device, dtype).eval(), tok
        imitate_demonstrations(model.to(device).train(), tok, list(model.parameters()), cfg, lr, device, dtype,
                               f"warm start ({cfg.model})")
    return model.eval(), tok


def short_hash(value):
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:12]


def folder_name(model):
    """A model's name as a folder name: tiny, or the last part of its hub id or path."""
    return "".join(c if c.isalnum() else "-" for c in os.path.basename(os.path.normpath(model)))


def folder_fingerprint(name):
    """What identifies a local model folder's contents cheaply: its config and its files' sizes."""
    path = os.path.expanduser(name)
    if not os.path.isdir(path):
        return name  # a hub id
    files = sorted((f, os.path.getsize(os.path.join(path, f))) for f in os.listdir(path))
    config = open(os.path.join(path, "config.json")).read() if os.path.exists(os.path.join(path, "config.json")) else ""
    return short_hash([files, config])


def base_key(cfg):
    """What the cached base depends on: the model (tiny_* sizes, or the folder's contents), the
    warm start as it will run on this device, the world, the tags and the observations' cut."""
    device = resolve_device(cfg)
    world = world_of(cfg)
    key = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name.startswith("tiny_")} \
        if cfg.model == "tiny" else {"model": cfg.model, "fingerprint": folder_fingerprint(cfg.model)}
    key.update(warm_start=warm_start_settings(cfg), warm_seed=cfg.warm_seed, warm_weights=warm_weights(cfg, device),
               warm_dtype=str(warm_dtype(cfg, device)), world=short_hash(world.kb),
               tasks=short_hash(toy_tasks.tokenizer_corpus(world)), tags=format_tags(tools.TOOLS), max_obs_tokens=cfg.max_obs_tokens)
    return key


def base_path(cfg):
    """The cached base's folder: an ordinary HF model folder (config, weights, tokenizer)."""
    return os.path.join(cfg.cache_dir, f"{folder_name(cfg.model)}-{short_hash(base_key(cfg))}")


def load_base(cfg, device="cpu"):
    """The base model and tokenizer from cfg.cached_base (a run's recorded base) or the cache; built,
    warm-started (on `device`) and cached when it is not there."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path = cfg.cached_base or base_path(cfg)
    if not os.path.exists(os.path.join(path, "base.json")):
        if os.path.abspath(path) != os.path.abspath(base_path(cfg)):
            raise DartError(f"the base this run trained on, {path}, is gone, and it was built with other settings "
                            f"or on another device than these, so it cannot be rebuilt here; copy it back")
        model, tok = build_base(cfg, device)
        tmp = f"{path}.tmp{os.getpid()}"
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        write_json(os.path.join(tmp, "base.json"), base_key(cfg))
        with contextlib.suppress(OSError):  # it fails when another process has just cached this base
            os.rename(tmp, path)  # a half-written cache is never mistaken for a finished one
        shutil.rmtree(tmp, ignore_errors=True)  # ours, then: theirs stays, as that process may be loading it
    try:
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), AutoTokenizer.from_pretrained(path)
    except Exception as e:
        raise DartError(f"the cached base in {path} cannot be read ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:150]}); delete that folder and run again to rebuild it") from e


def autocast_dtypes(cfg, device):
    """Autocast dtypes (None = full precision) of (sampling and evaluation, the update and the warm
    start). auto = bfloat16 on a CUDA GPU that computes it natively (older GPUs emulate it, slower
    than float32), float32 elsewhere; train_dtype auto = as dtype."""
    native_bf16 = device.startswith("cuda") and torch.cuda.is_bf16_supported(including_emulation=False)
    pick = lambda name: {"auto": torch.bfloat16 if native_bf16 else None, "float32": None,
                         "bfloat16": torch.bfloat16}[name]
    sample = pick(cfg.dtype)
    train = sample if cfg.train_dtype == "auto" else pick(cfg.train_dtype)
    if sample is not None and train is None:  # the frozen weights are held in bfloat16 from loading on
        raise DartError(f"--train_dtype=float32 after bfloat16 sampling (--dtype={cfg.dtype} on {device}) would "
                        f"train on bfloat16-rounded weights; pass --dtype=float32 too")
    return sample, train


def world_of(cfg):
    return toy_tasks.make_world(conflict=cfg.conflict, conflict_sign=cfg.conflict_sign)


def resolved(cfg):
    """cfg with every `auto` replaced by what it means on this machine (the device, the dtypes, what
    the warm start trains): what a run records and what its reuse compares, so that a GPU run and a
    CPU run never pass for each other."""
    device = resolve_device(cfg)
    names = {None: "float32", torch.bfloat16: "bfloat16"}
    sample, train = autocast_dtypes(cfg, device)
    return dataclasses.replace(cfg, device=device, dtype=names[sample], train_dtype=names[train],
                               warm_weights=warm_weights(cfg, device))


def resolve_device(cfg):
    """The device to run on (auto = cuda, else mps, else cpu); a named one must be there."""
    there = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}
    if cfg.device == "auto":
        return next(device for device, available in there.items() if available)
    if not there[cfg.device]:
        raise DartError(f"--device={cfg.device} but no {cfg.device} device is visible; use --device=cpu")
    return cfg.device


def load_policy(cfg):
    """The base with DART layers attached, on its device. With a sampling dtype (bfloat16 on a GPU)
    the frozen linears are held in it from here on, not cast again by autocast in every forward."""
    from transformers.utils import logging
    logging.disable_progress_bar()  # our own bars say what is happening
    device = resolve_device(cfg)
    sample_dtype, train_dtype = autocast_dtypes(cfg, device)
    model, tok = load_base(cfg, device)
    if tok.eos_token_id is None:
        raise DartError(f"the tokenizer of --model={cfg.model} has no eos token")
    model.to(device)
    try:
        routing = attach_dart(model, cfg.lora_rank, cfg.alpha, cfg.targets.split(","), cfg.mode, cfg.lora_dropout,
                              cfg.seed)
    except ValueError as e:
        raise DartError(f"{e} (--targets={cfg.targets})") from e
    if sample_dtype is not None:  # for good: sampling and evaluation run at it from here on, nothing restores
        hold_frozen_linears(model, sample_dtype)
    return Policy(model, tok, special_ids(tok, device), routing, device, sample_dtype, train_dtype)


@contextlib.contextmanager
def update_precision(policy):
    """Forwards inside run at train_dtype. When it is lower than the sampling precision, the
    frozen linear weights are cast down once here, not by autocast in every forward (the same
    cast, so the same numbers, for a second copy of the weights during the update)."""
    held, wanted = policy.sample_dtype or torch.float32, policy.train_dtype or torch.float32
    restore = hold_frozen_linears(policy.model, wanted) if wanted != held else (lambda: None)
    policy.in_update = True
    try:
        yield
    finally:
        policy.in_update = False
        restore()


def hold_frozen_linears(model, dtype):
    """Hold the weights and biases of the frozen linear layers in `dtype`, and return a function
    that puts the previous tensors back. A tied output layer gets a copy of its own: the embedding
    table it shares must keep its precision, since its rows enter the residual stream as they are."""
    kept = []
    for module in model.modules():
        if isinstance(module, nn.Linear) and not module.weight.requires_grad:
            for name in ("weight", "bias"):
                tensor = getattr(module, name)
                if tensor is not None and tensor.dtype != dtype:
                    kept.append((module, name, tensor))
                    setattr(module, name, nn.Parameter(tensor.detach().to(dtype), requires_grad=False))

    def restore():
        for module, name, tensor in kept:
            setattr(module, name, tensor)
    return restore


# -----------------------------------------------------------------------------
# 11. Config and command line, the report, --compare, --bench


def comma_list(allowed, what, empty_ok=False):
    return (lambda value: (empty_ok and not value) or all(allowed(item) for item in value.split(",")),
            f"a comma-separated list of {what}")


def or_model_default(valid):
    """-1 (the model's default) or a value that passes `valid`."""
    return lambda value: value == -1 or valid[0](value), f"-1 or {valid[1]}"


@dataclass
class Config(Method):
    # what to run
    model: str = option("tiny", "'tiny' = the embedded default; else an HF model name or folder")
    out: str = option("", "run directory; default runs/<time>-<mode>-s<seed>-<pid>")
    resume: str = option("", "a run directory to continue from its last checkpoint")
    device: str = option("auto", "auto = cuda, else mps, else cpu", one_of("auto", "cpu", "cuda", "mps"))
    dtype: str = option("auto", "autocast of sampling and evaluation: auto = bfloat16 on a GPU that computes it "
                                "natively, float32 elsewhere", one_of("auto", "float32", "bfloat16"))
    train_dtype: str = option("auto", "update, warm-start autocast: as --dtype", one_of("auto", "float32", "bfloat16"))
    # the world: the competition dial (toy_tasks.py's naming family)
    conflict: float = option(0.0, "share P of training questions where the tool must write the key (size -> .area) "
                                  "and the answer another form; 0 = the four families alone", between(0, 1))
    conflict_sign: str = option("opposed", "opposed: the answer repeats the user's word (size), so the roles want "
                                           "opposite tokens; aligned: it is the key's name (area), the matched control",
                                one_of("opposed", "aligned"))
    # evaluation and checkpoints
    eval_per_family: int = option(50, "test questions per task family", at_least(1))
    # the embedded tiny model (its cached base is keyed by these tiny_* fields)
    tiny_dim: int = option(192, "tiny model: hidden size (an even multiple of tiny_heads)", at_least(1))
    tiny_layers: int = option(4, "tiny model: layers", at_least(1))
    tiny_heads: int = option(4, "tiny model: attention heads", at_least(1))
    tiny_vocab: int = option(400, "tiny model: BPE vocabulary size", at_least(1))
    # the supervised warm start before RL, of the tiny model and a --model alike (cached with the base)
    warm_steps: int = option(-1, "warm-start steps on demonstrations (0 = none; -1 = the model's default: "
                                 f"{WARM_START_DEFAULTS['tiny'][0]} tiny, {WARM_START_DEFAULTS['pretrained'][0]} "
                                 f"--model)", or_model_default(at_least(0)))
    warm_batch: int = option(-1, f"warm-start batch size (-1 = {WARM_START_DEFAULTS['tiny'][1]} tiny, "
                                 f"{WARM_START_DEFAULTS['pretrained'][1]} --model)", or_model_default(at_least(1)))
    warm_lr: float = option(-1.0, f"warm-start learning rate (-1 = {WARM_START_DEFAULTS['tiny'][2]} tiny, "
                                  f"{WARM_START_DEFAULTS['pretrained'][2]} --model; a LoRA warm start uses 10x)",
                            or_model_default(above(0)))
    warm_seed: int = option(0, "seed of the warm start (and of the tiny model's weights)", at_least(0))
    warm_weights: str = option("auto", "what a --model's warm start trains: all, or lora (a rank-64 LoRA merged after, "
                                       "and the tags' rows: fits a laptop GPU); auto = lora on CUDA, all elsewhere",
                               one_of("auto", "all", "lora"))
    cache_dir: str = option("runs/cache", "where warm-started bases are cached")
    cached_base: str = option("", "the base a run trains on: set by it, for --resume and --export_peft on any device")
    # other commands
    compare: bool = option(False, "train every mode on the same budget and print one table")
    modes: str = option("joint,joint2r,dart,two_agent,mixlora", "--compare: the modes to train, comma-separated",
                        comma_list(lambda mode: mode in MODES, ", ".join(MODES)))
    seeds: int = option(3, "--compare: seeds per mode", at_least(1))
    ranks: str = option("", "--compare: LoRA ranks to sweep, comma-separated, each with alpha/r as --alpha/--lora_rank "
                            "(default: --lora_rank alone)",
                        comma_list(lambda r: r.isascii() and r.isdigit() and r[0] != "0", "positive integers",
                                   empty_ok=True))  # isascii: "²" is a digit to isdigit(), not to int()
    bench: bool = option(False, "measure the cost claims on one batch")
    export_peft: str = option("", "write this run directory's adapters as PEFT LoRA adapters (in RUN/peft)")


def check_config(cfg, where=""):
    """Every option in its range, and the combinations that make sense: checked before any model is
    built or any file written, so that a typo costs a second, not minutes."""
    for f in dataclasses.fields(cfg):  # each value against its type, then its range or set
        value, kind, valid = getattr(cfg, f.name), f.type, f.metadata.get("valid")
        if not (isinstance(value, kind) and not (kind is int and isinstance(value, bool)) or (
                kind is float and isinstance(value, int) and not isinstance(value, bool))):
            raise DartError(f"{where}--{f.name} must be a {kind.__name__}, not {value!r}")
        if valid is not None and not valid[0](value):
            raise DartError(f"{where}--{f.name} must be {valid[1]}, not {value!r}")
    if not isinstance(cfg, Config):
        return
    if cfg.tiny_dim % cfg.tiny_heads or cfg.tiny_dim // cfg.tiny_heads % 2:  # rotary embeddings pair up units
        raise DartError(f"{where}--tiny_dim={cfg.tiny_dim} must be an even multiple of --tiny_heads={cfg.tiny_heads} "
                        f"(each head's size, tiny_dim / tiny_heads, even)")
    if cfg.model == "tiny" and (unknown := sorted(set(cfg.targets.split(",")) - set(ATTENTION_AND_MLP))):
        raise DartError(f"{where}--targets: the tiny model has no linear layer named {unknown[0]}; its layers are "
                        f"{', '.join(ATTENTION_AND_MLP)}")
    if cfg.model == "tiny" and cfg.warm_weights == "lora":
        raise DartError(f"{where}--warm_weights=lora: the tiny model starts from random weights, so its warm start "
                        f"trains them all")
    if os.path.isfile(cfg.out):
        raise DartError(f"{where}--out={cfg.out} is a file; pass a folder for the run")
    commands = [name for name in ("compare", "bench", "export_peft", "resume") if getattr(cfg, name)]
    if len(commands) > 1:
        raise DartError(f"{where}--{commands[0]} and --{commands[1]} are separate commands; give one")
    for name, items in (("modes", cfg.modes.split(",")), ("ranks", cfg.ranks.split(","))):
        if twice := [item for item in items if items.count(item) > 1]:  # a rank twice: its runs as more seeds
            raise DartError(f"{where}--{name} names {twice[0]} twice; name each once")


BOOLS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def parse_args(argv, defaults=None, names=None):
    """--key=value overrides of a config dataclass (Config by default); anything unknown, mistyped
    or out of range raises DartError naming the valid keys (`names`, when it is not the dataclass's)."""
    cfg = defaults or Config()
    kinds = {f.name: f.type for f in dataclasses.fields(cfg)}
    for arg in argv:
        key, has_value, text = arg.removeprefix("--").partition("=")
        if not arg.startswith("--") or key not in kinds:
            raise DartError(f"unknown option {arg!r}. Valid options: {', '.join('--' + k for k in names or kinds)}")
        kind = kinds[key]
        if not has_value and kind is not bool:
            raise DartError(f"--{key} needs a value, e.g. --{key}={getattr(cfg, key)}")
        try:
            value = BOOLS[text.lower() if has_value else "true"] if kind is bool else kind(text)
        except (KeyError, ValueError):
            value = None
        if value is None or (kind is float and not math.isfinite(value)):
            raise DartError(f"--{key} expects a {kind.__name__} value like --{key}={getattr(type(cfg)(), key)}, "
                            f"not {text!r}")
        setattr(cfg, key, value)
    check_config(cfg)
    if isinstance(cfg, Config) and not cfg.compare and (loose := [a for a in argv if a.startswith(
            ("--modes=", "--seeds=", "--ranks="))]):
        raise DartError(f"{loose[0]} is an option of --compare: add --compare, or drop it")
    return cfg


def help_text(usage, *config_classes):
    """The docstring, then every option with its default and its help."""
    fields = {}
    for kind in config_classes:
        for f in dataclasses.fields(kind):
            fields.setdefault(f.name, f)  # a name in two classes: the first one parses it
    return "\n".join([usage, "options (default):"] + [f"  --{f.name}={f.default}".ljust(36) + f"  {f.metadata['help']}"
                                                      for f in fields.values()])


# ---- what the user sees at the end ----

COLOURS = {"reasoning": "\033[36m", "tool": "\033[33m", "observation": "\033[2m"}
RESET = "\033[0m"


def markdown_table(head, rows):
    """A Markdown table with padded columns: the first left-aligned, the others right-aligned."""
    cells = [list(map(str, head))] + [list(map(str, row)) for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(head))]
    line = lambda row: "| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w)
                                         for i, (c, w) in enumerate(zip(row, widths))) + " |"
    rule = "|" + "|".join("-" * (w + 2) if i == 0 else "-" * (w + 1) + ":" for i, w in enumerate(widths)) + "|"
    return "\n".join([line(cells[0]), rule] + [line(row) for row in cells[1:]])


def sparkline(values, width=60):
    if not values:
        return ""
    chunks = np.array_split(np.asarray(values, dtype=float), min(width, len(values)))
    means = [c.mean() for c in chunks]
    lo, hi = min(means), max(means)
    bars = "▁▂▃▄▅▆▇█"
    return "".join(bars[int((m - lo) / (hi - lo + 1e-9) * (len(bars) - 1))] for m in means)


def percent(value):
    return "n/a" if value is None else f"{value:.0%}"  # None: a share of nothing (say, of zero tool calls)


def results_table(before, after, world):
    """Base (before RL) against trained, on the test split: per family, tool use, per skill."""
    rows = [(family, percent(before[key]), percent(after[key])) for family, key in [
        (f, f"test_acc_{f}") for f in world.families] + [("overall", "test_acc")]]
    rows.append(("tool calls / question", f"{before['test_tool_calls']:.2f}", f"{after['test_tool_calls']:.2f}"))
    rows.append(("valid tool calls", percent(before["test_valid_calls"]), percent(after["test_valid_calls"])))
    rows += [(f"{skill} right ({role})", percent(before[f"test_skill_{skill}"]), percent(after[f"test_skill_{skill}"]))
             for skill, role in world.skill_roles.items()]
    return markdown_table(("task family", "base", "trained"), rows)


def render_trajectory(policy, batch, row, colour):
    """One response, every token marked by who wrote it: the reasoning adapter, the tool adapter, the environment."""
    roles = batch.roles[row, batch.prompt_len - 1:-1]
    pieces = []
    for j, token in enumerate(batch.ids[row, batch.prompt_len:].tolist()):
        if not batch.attention_mask[row, batch.prompt_len + j]:
            break
        writer = "observation" if not batch.written_by_policy[row, j] else ("tool" if roles[j] == TOOL else "reasoning")
        text = policy.tok.decode([token])
        pieces.append(f"{COLOURS[writer]}{text}{RESET}" if colour else text)
    return "".join(pieces)


def write_results(run_dir, history, cfg):
    """results.md: base vs trained on the test split, and the reward curve."""
    evals = [r for r in history if "test_acc" in r]
    table = results_table(evals[0], evals[-1], world_of(cfg))
    curve = sparkline([r["reward"] for r in history if "reward" in r])
    with open(os.path.join(run_dir, "results.md"), "w") as f:
        f.write(f"# {cfg.mode}, {cfg.steps} RL steps, seed {cfg.seed}, model {cfg.model}\n\n{table}\n\n"
                f"train reward per step: {curve}\n")
    return table, curve


def verdict(text, task, error_count):
    """Why an answer is right or wrong, in a few words."""
    answer = toy_tasks.parse_answer(text)
    if answer == task.answer:
        return "right"
    if answer is None:
        return "wrong: no well-formed <answer> before the token limit"
    return f"wrong: answered {answer}" + (f" after {error_count} failed tool call(s)" if error_count else "")


def showcase(policy, registry, test, cfg):
    """The trajectory to show: of the multihop test questions on which the warm start's demonstrator writes a wrong
    tool call (any multihop question, if none), the first the policy answers right, greedily, else the first (wrong)."""
    multihop = [t for t in test if t.family == "multihop"]
    tricky = [t for t in multihop if slipped_call(t)] or multihop
    out = rollout(policy, registry, [prompt_ids(policy.tok, t.question) for t in tricky], cfg, temperature=0)
    verdicts = [verdict(text, t, n) for text, t, n in zip(out.texts, tricky, out.error_counts)]
    row = verdicts.index("right") if "right" in verdicts else 0
    return tricky[row], out, row, verdicts[row]


def slipped_call(task):
    """The demonstrator's first tool-role mistake on `task`, which earns no reward: the call it
    writes instead of the gold one (what the tool adapter has to learn); None if it makes none."""
    trajectory = next((t for skill, _, t in task.slips if toy_tasks.SKILL_ROLES[skill] == "tool"), None)
    if trajectory is None:
        return None
    gold = toy_tasks.tool_calls(task.trajectory)
    tool, argument = next(call for call, right in zip(toy_tasks.tool_calls(trajectory), gold) if call != right)
    return f"<{tool}>{argument}</{tool}>"


def print_report(run_dir, table, curve, policy, registry, test, cfg):
    example, out, row, judged = showcase(policy, registry, test, cfg)
    colour = sys.stdout.isatty() and not os.environ.get("NO_COLOR")
    legend = " ".join(f"{COLOURS[w]}{w}{RESET}" if colour else w for w in COLOURS)
    print(f"\n{table}\n\ntrain reward  {curve}\n")
    slip = slipped_call(example)
    print(f"a multihop test question, answered greedily ({legend}):\n  {example.question}\n  "
          f"{render_trajectory(policy, out, row, colour)}\n  gold: {example.answer} ({judged})\n"
          + (f"  the warm start's demonstrator often writes {slip} here: a wrong call, no reward\n" if slip else "")
          + f"\nrun directory: {run_dir}")


# ---- --compare and --bench ----
#
# The paper's claim is a comparison: DART beats shared-parameter GRPO (joint) at equal
# budget, and comes close to two separate agents (two_agent) at one model's memory.
# joint2r has DART's trainable parameters in one shared adapter: the capacity control.
# The rank sweep asks when the roles compete: with scarce capacity, if at all.


def run_summary(run_dir):
    """One finished run: its evaluations (all, before RL, final, best), parameter count, peak memory, speed."""
    evals = [r for r in read_jsonl(os.path.join(run_dir, "metrics.jsonl")) if "test_acc" in r]
    speed = read_jsonl(os.path.join(run_dir, "speed.jsonl"))
    params = sum(t.numel() for t in load_adapters(run_dir).values())
    rollout_s, update_s = sum(r["rollout_s"] for r in speed), sum(r["update_s"] for r in speed)
    return {"evals": evals, "before": evals[0], "final": evals[-1], "best": max(evals, key=lambda r: r["test_acc"]),
            "params": params, "peak_mb": max(r["peak_mb"] for r in speed),
            "s_per_step": (rollout_s + update_s) / len(speed),
            "sampled_tok_s": sum(r["sampled_tokens"] for r in speed) / rollout_s,
            "trained_tok_s": sum(r["trained_tokens"] for r in speed) / update_s}


def mean_std(values, scale=1.0, digits=0):
    """'mean±std' over seeds (sample std), or the single value; None (a share of zero calls) left out; none: 'n/a'."""
    values = np.asarray([v for v in values if v is not None], dtype=float) * scale
    if len(values) < 2:
        return f"{values[0]:.{digits}f}" if len(values) else "n/a"
    return f"{values.mean():.{digits}f}±{values.std(ddof=1):.{digits}f}"


def compare_table(summaries):
    """One row per mode (mean±std over seeds), after the warm-started base's."""
    before = next(iter(summaries.values()))[0]["before"]
    families = [key.removeprefix("test_acc_") for key in before if key.startswith("test_acc_")]
    keys = [f"test_acc_{f}" for f in families] + ["test_acc"]
    head = ["mode", *families, "overall", "valid calls", "calls/q", "trainable", "peak MB", "s/step",
            "sampled tok/s", "trained tok/s"]
    rows = [["base (no RL)"] + [f"{100 * before[k]:.0f}" for k in keys] +
            [mean_std([before["test_valid_calls"]], 100), f"{before['test_tool_calls']:.2f}", "0", "", "", "", ""]]
    for mode, runs in summaries.items():
        final = [r["final"] for r in runs]
        rows.append([mode] + [mean_std([f[k] for f in final], 100) for k in keys] + [
            mean_std([f["test_valid_calls"] for f in final], 100),
            mean_std([f["test_tool_calls"] for f in final], digits=2), f"{runs[0]['params']:,}"] + [
            f"{np.mean([r[key] for r in runs]):.{digits}f}" for key, digits in (
                ("peak_mb", 0), ("s_per_step", 2), ("sampled_tok_s", 0), ("trained_tok_s", 0))])
    return markdown_table(head, rows)


def bootstrap_interval(values, resamples=2000, rng=None, statistic=np.mean):
    """95% percentile interval of `statistic` when every axis of `values` is resampled with
    replacement (questions; or seeds and questions together, for a (seeds, questions) array)."""
    values = np.asarray(values, dtype=float)
    rng = np.random.default_rng(0) if rng is None else rng
    picks = []
    for axis, n in enumerate(values.shape):
        shape = [resamples] + [n if a == axis else 1 for a in range(values.ndim)]
        picks.append(rng.integers(0, n, size=(resamples, n)).reshape(shape))
    stats = statistic(values[tuple(picks)].reshape(resamples, -1), axis=1)
    return float(np.percentile(stats, 2.5)), float(np.percentile(stats, 97.5))


def paired_difference(a, b, resamples=2000, seed=0):
    """a, b: (seeds, questions) 0/1 results of two modes on the same seeds and test questions. The
    mean of a - b in points, and a 95% interval from a bootstrap over seeds and questions together:
    a difference that counts must hold for other training runs and other questions."""
    d = (np.asarray(a, dtype=float) - np.asarray(b, dtype=float)) * 100
    return float(d.mean()), bootstrap_interval(d, resamples, np.random.default_rng(seed))


def mode_difference(summaries, a, b, at=-1, questions=slice(None)):
    """paired_difference of two modes' results at their last evaluation (or `at`), on all questions or `questions`."""
    return paired_difference(*(np.asarray([r["evals"][at]["test_correct"] for r in summaries[mode]])[:, questions]
                               for mode in (a, b)))


def difference_line(summaries, a, b):
    mean, (lo, hi) = mode_difference(summaries, a, b)
    finding = ("no detectable difference at this budget" if lo <= 0 <= hi
               else f"{a if lo > 0 else b} is better at this budget")
    return (f"{a} - {b}: {mean:+.1f} points, 95% interval [{lo:+.1f}, {hi:+.1f}] (half-width {(hi - lo) / 2:.1f}) "
            f"over {len(summaries[a])} seed(s) and {len(summaries[a][0]['final']['test_correct'])} test questions: "
            f"{finding}")


def stability_table(summaries):
    """Per run: the best evaluation (and its step) against the final one."""
    rows = []
    for mode, runs in summaries.items():
        for seed, r in enumerate(runs):
            best, final = 100 * r["best"]["test_acc"], 100 * r["final"]["test_acc"]
            rows.append((mode, seed, f"{best:.1f} ({r['best']['step']})", f"{final:.1f}", f"{final - best:+.1f}"))
    return markdown_table(("mode", "seed", "best test acc (step)", "final", "final - best"), rows)


def differences_table(first, rows, modes, others):
    """One row per (label, summaries, evaluation index[, questions]): each of `modes`' final test accuracy (mean±std
    over seeds), then dart's paired difference with each of `others` there (points, 95% interval)."""
    table = []
    for label, summaries, at, *questions in rows:
        differences = [mode_difference(summaries, "dart", m, at, *questions) for m in others]
        table.append([label] + [mean_std([r["final"]["test_acc"] for r in summaries[m]], 100) for m in modes]
                     + [f"{mean:+.1f} [{lo:+.1f}, {hi:+.1f}]" for mean, (lo, hi) in differences])
    return markdown_table([first, *modes, *(f"dart - {m}" for m in others)], table)


def interval_chart(rows, width=41):
    """A chart of (label, mean, (lo, hi)) rows on one axis that includes 0: [ and ] the interval, * the mean, | zero."""
    lo, hi = min([0.0] + [r[2][0] for r in rows]), max([0.0] + [r[2][1] for r in rows])
    column = lambda x: round((x - lo) / (hi - lo + 1e-9) * (width - 1))
    lines = []
    for label, mean, (a, b) in rows:
        line = [" "] * width
        line[column(a):column(b) + 1] = "-" * (column(b) + 1 - column(a))
        line[column(0.0)] = "|"
        line[column(a)], line[column(b)], line[column(mean)] = "[", "]", "*"
        lines.append(f"{label:>8} {''.join(line)}  {mean:+.1f} [{a:+.1f}, {b:+.1f}]")
    return "\n".join(lines + [" " * 9 + f"{lo:+.0f}".ljust(width // 2) + f"{hi:+.0f}".rjust(width - width // 2)])


def compare_modes(cfg):
    """Train every mode at every LoRA rank on the same tasks, seeds and budget (each rank keeps
    alpha/r), or reuse the runs already there (runs_folder); print and save the tables."""
    modes = cfg.modes.split(",")
    ranks = [int(r) for r in cfg.ranks.split(",")] if cfg.ranks else [cfg.lora_rank]
    out = broadcast_from_first(cfg.out or runs_folder(cfg))
    scale = cfg.alpha / cfg.lora_rank
    # 1. every (rank, mode, seed) run, trained or reused
    results = {rank: {mode: [] for mode in modes} for rank in ranks}
    for rank in ranks:  # alpha/r kept: --alpha itself at --lora_rank, elsewhere rounded as a user would type it
        alpha = cfg.alpha if rank == cfg.lora_rank else float(f"{scale * rank:.12g}")
        for seed in range(cfg.seeds):
            for mode in modes:
                run = dataclasses.replace(cfg, mode=mode, seed=seed, lora_rank=rank, alpha=alpha, compare=False,
                                          out=os.path.join(out, f"r{rank}", f"{mode}-s{seed}"))
                train_or_reuse(run)
                results[rank][mode].append(run_summary(run.out) if process_rank() == 0 else None)
    if process_rank() > 0:
        return results
    # 2. per rank: the table of modes, dart's paired differences, each run's best against its final
    others = [m for m in modes if m != "dart"] if "dart" in modes else []
    sections = []
    for rank, summaries in results.items():
        header = (f"LoRA rank {rank} (joint: r, joint2r: 2r, dart: r + r; alpha {scale * rank:g}), {cfg.seeds} "
                  f"seed(s), {cfg.steps} RL steps of {cfg.questions_per_step}x{cfg.group_size} rollouts, model "
                  f"{cfg.model}, device {resolve_device(cfg)}; final test accuracy in %, mean±std over seeds")
        differences = "\n".join(difference_line(summaries, "dart", m) for m in others)
        # dart's differences at each evaluation (sharing may slow a role first) and per family (a conflict hits its own)
        steps = [(e["step"], summaries, at) for at, e in enumerate(summaries["dart"][0]["evals"])] if others else []
        curve = others and ("the learning curves: dart's paired differences at each evaluation, in points, 95% "
                            "intervals over seeds and questions\n\n" + differences_table("RL step", steps, [], others))
        families = np.array([t.family for t in toy_tasks.test_set(world_of(cfg), cfg.eval_per_family)])
        per_family = others and ("per task family, at the end: dart's paired differences, in points, 95% intervals "
                                 "over seeds and the family's questions\n\n" + differences_table("task family", [
                                     (f, summaries, -1, families == f) for f in dict.fromkeys(families)], [], others))
        parts = (header, compare_table(summaries), differences, curve, per_family, stability_table(summaries))
        sections.append("\n\n".join(part for part in parts if part))
    # 3. across ranks: the sweep's table and the chart of dart - joint
    if len(ranks) > 1:
        sections.append("the sweep: final test accuracy in %, mean±std over seeds; dart's paired differences in "
                        "points with 95% intervals over seeds and questions\n\n"
                        + differences_table("LoRA rank r", [(r, results[r], -1) for r in ranks], modes, others))
        if {"dart", "joint"} <= set(modes):
            rows = [(f"r={rank}", *mode_difference(results[rank], "dart", "joint")) for rank in ranks]
            sections.append("dart - joint against the LoRA rank, points (95% interval):\n" + interval_chart(rows))
    report = "\n\n".join(sections) + "\n"
    # named by its ranks, modes and seeds, so that another comparison in the same runs folder keeps this one
    name = os.path.join(out, f"compare-r{'-'.join(map(str, ranks))}-{'-'.join(modes)}-{cfg.seeds}seeds")
    with open(f"{name}.md", "w") as f:
        f.write(report)
    write_json(f"{name}.json", {"config": dataclasses.asdict(cfg), "results": {str(k): r for k, r in results.items()}})
    print(f"\n{report}\ntables: {name}.md, {name}.json")
    return results


def benchmark(cfg, repeats=5):
    """The cost claims side by side in one process: a GRPO update of dart vs joint2r vs two_agent
    on one batch, the engine vs model.generate, and the frozen base's share of each."""
    # 1. three policies on one base, and one batch of rollouts that every update will train on
    world = world_of(cfg)
    registry = tools.registry(world.kb)
    policies = {mode: load_policy(dataclasses.replace(cfg, mode=mode)) for mode in ("joint2r", "dart", "two_agent")}
    policy, device = policies["dart"], policies["dart"].device
    rng = random.Random(cfg.seed)
    tasks = [toy_tasks.sample_task(rng, world, "train") for _ in range(cfg.questions_per_step * cfg.group_size)]
    prompts = [prompt_ids(policy.tok, t.question) for t in tasks]
    roll_out = lambda: rollout(policy, registry, prompts, cfg, cfg.temperature, torch.Generator(device).manual_seed(0))
    batch = roll_out()
    # 2. sampling: the engine with tool calls, the same without the adapters, and generate() without tools,
    # before any update: the adapters are still zero, so all three sample the same tokens, and the engine's
    # difference with the adapters off is what the LoRA branches cost
    ids, attention = pad_sequences(prompts, policy.special.pad, "left", device)
    new_tokens = batch.written_by_policy.shape[1]
    engine_s, base_engine_s, generate_s = [], [], []
    for _ in tqdm(range(repeats), desc="bench: engine vs generate"):
        engine_s.append(timed(device, roll_out)[1])
        with adapters_off(policy.routing):
            base_engine_s.append(timed(device, roll_out)[1])
        policy.routing.route(torch.tensor(REASONING, device=device))  # one gate for every token
        with torch.no_grad(), autocast(device, policy.sample_dtype):
            generate_s.append(timed(device, lambda: policy.model.generate(
                input_ids=ids, attention_mask=attention, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                do_sample=True, top_k=None, top_p=None, temperature=cfg.temperature,
                pad_token_id=policy.special.pad))[1])
    # 3. the updates, interleaved so that drift in the machine's speed hits every mode alike; the first
    # round warms up; then the KL reference pass alone (the frozen base's share of an update)
    advantages = torch.randn(len(prompts), generator=torch.Generator().manual_seed(0)).to(device)
    optimizers = {mode: make_optimizer(p, cfg) for mode, p in policies.items()}
    update_s = {mode: [] for mode in policies}
    for repeat in tqdm(range(repeats + 1), desc="bench: GRPO updates"):
        for mode, p in policies.items():
            seconds = timed(device, lambda: grpo_update(p, optimizers[mode], batch, advantages, cfg))[1]
            if repeat:
                update_s[mode].append(seconds)
    with update_precision(policy):
        reference_s = [timed(device, lambda: reference_logprobs(policy, batch, micro_batches(batch, cfg.micro_batch),
                                                                cfg.temperature))[1] for _ in range(repeats)]
    # 4. medians, and the report
    median = {mode: float(np.median(seconds)) for mode, seconds in update_s.items()}
    slots = len(prompts) * new_tokens
    engine, generate = slots / np.median(engine_s), slots / np.median(generate_s)
    real = batch.attention_mask[:, batch.prompt_len:].sum().item() / np.median(engine_s)
    print(f"\nGRPO update on one batch of {len(prompts)} rollouts (median of {repeats}), device {device}:")
    print("\n".join(f"  {mode:<10} {seconds:.3f} s" for mode, seconds in median.items()))
    print(f"  dart / joint2r = {median['dart'] / median['joint2r']:.3f}   two_agent / dart = "
          f"{median['two_agent'] / median['dart']:.2f}")
    print(f"  of dart's update, the KL reference (the frozen base alone, no gradient): {np.median(reference_s):.3f} s")
    print(f"sampling {len(prompts)} rows x {new_tokens} new tokens: engine with tools {engine:.0f} tok/s ({real:.0f} "
          f"tok/s counting only tokens before each row's end), model.generate without tools {generate:.0f} tok/s: "
          f"ratio {engine / generate:.2f}")
    print(f"  the engine with the adapters off (the frozen base alone): {slots / np.median(base_engine_s):.0f} tok/s")


# -----------------------------------------------------------------------------
# 12. Several processes (torchrun)
#
# Data parallel, as in nanoGPT's train.py: each process holds the whole model and a share of
# the batch, in whole GRPO groups (so the advantages need no communication). The loss is
# normalized by the totals of the whole batch and the gradients are summed over processes:
# N processes take exactly the step that one process takes on the whole batch.


def process_rank():
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def process_count():
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_reduce_sum(tensor):
    if process_count() > 1:  # in place
        dist.all_reduce(tensor)
    return tensor


def sum_gradients(params):
    """Sum every process's gradients with one all-reduce over a flat buffer (a share that carried
    no loss contributes zeros: every process takes part in every collective, so none can hang)."""
    if process_count() == 1:
        return
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params])
    dist.all_reduce(flat)
    for p, grad in zip(params, flat.split([p.numel() for p in params])):
        p.grad = grad.view_as(p).clone()


def gather_lists(local):
    """Each process's list, concatenated in rank order (one process: the list itself)."""
    if process_count() == 1:
        return local
    parts = [None] * process_count()
    dist.all_gather_object(parts, local)
    return [item for part in parts for item in part]


def broadcast_from_first(value):
    """Rank 0's value, on every process."""
    box = [value]
    if process_count() > 1:
        dist.broadcast_object_list(box, src=0)
    return box[0]


@contextlib.contextmanager
def first_process_first():
    """Rank 0 runs the body before the others: it builds and caches the base, they read the cache."""
    if process_rank() > 0:
        dist.barrier()
    yield
    if process_rank() == 0 and process_count() > 1:
        dist.barrier()


def check_same_adapters(model, step):
    """Under torchrun every process must hold the same adapters after every step: one checksum per
    process, compared (a small gather per step, against a silent divergence)."""
    if process_count() == 1:
        return
    checksums = gather_lists([sum(p.detach().double().sum().item() for p in trainable(model))])
    if len(set(checksums)) > 1:
        raise RuntimeError(f"the processes' adapters differ after step {step}: checksums {checksums}")


def init_distributed(cfg):
    """Under torchrun, join the process group: nccl with one GPU per process on CUDA, gloo on CPU. The timeout is
    long: the other processes wait while rank 0 warm-starts a base, which can take longer than the default 10 min."""
    import datetime
    if int(os.environ.get("WORLD_SIZE", "1")) == 1 or process_count() > 1:
        return
    cuda = resolve_device(cfg).startswith("cuda")
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(hours=2))


def run_command(argv):
    if {"-h", "--help"} & set(argv):
        print(help_text(__doc__, Config))
        return
    cfg = parse_args(argv)
    if run_dir := cfg.resume:  # the run's own config, with the command line's overrides of what may change
        saved = saved_config(run_dir)
        cfg = parse_args(argv, defaults=dataclasses.replace(saved))
        if cfg.steps != saved.steps and saved.lr_schedule != "constant":
            raise DartError(f"--resume continues {run_dir} with its cosine learning-rate schedule, which decays over "
                            f"its {saved.steps} steps: --steps={cfg.steps} would reshape it mid-run. Only a run with "
                            f"--lr_schedule=constant may be extended; start a new run for another length.")
        if changed := differing_setting(saved, cfg, RESUME_MAY_CHANGE):
            raise DartError(f"--resume continues {run_dir} with its own settings, and --{changed} would change them "
                            f"({getattr(saved, changed)!r} -> {getattr(cfg, changed)!r}); only "
                            f"{', '.join('--' + k for k in sorted(RESUME_MAY_CHANGE - NOT_THE_RUN))} may change. "
                            f"Start a new run for other settings.")
        cfg.out = run_dir
    init_distributed(cfg)
    if cfg.bench and process_count() > 1:
        raise DartError("--bench measures one process; run it without torchrun")
    if cfg.export_peft:
        print("\n".join(f"wrote {path}" for path in write_peft_adapters(cfg.export_peft)))
    elif cfg.compare:
        compare_modes(cfg)
    elif cfg.bench:
        benchmark(cfg)
    else:
        train(cfg)


def cli(run, argv):
    """A command line: library errors (DartError) become one line, no traceback."""
    try:
        run(argv)
    except DartError as e:
        sys.exit(f"error: {e}")
    finally:
        if process_count() > 1:
            dist.destroy_process_group()


def main(argv):
    cli(run_command, argv)


if __name__ == "__main__":
    main(sys.argv[1:])

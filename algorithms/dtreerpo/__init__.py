"""d-TreeRPO (Pan et al., 2025; official code THU-BPM/d-TreeRPO): tree rollouts with verifiable step advantages
(``reference/ALGORITHMS.md`` section Q).

Rollout. Each prompt grows a tree of partial denoising states (:mod:`dare_gym.algorithms.dtreerpo.rollout`): LLaDA's semi-AR
low-confidence sampler is cut at the branch points T − ⌊kT/s⌋ into s levels (``tree_contraction_factor``); the
root has ``num_tree_samples`` children, every other inner node ``tree_branch_factor``, each child an independent
continuation of its parent. A tree has num_tree_samples · tree_branch_factor^(s−1) leaves and that is the
trainer's ``group_size``: the env's group of sub-envs for a prompt scores its leaves, so ``prompts_per_step``
counts trees (the recipe: 16 prompts, group_size 16 = 4 × 4 leaves, 20 segments per tree). With
``num_tree_samples: null`` the root fan-out is group_size / tree_branch_factor^(s−1).

Values and advantages. V(leaf) = r, V(node) = the NaN-aware mean of its children's V (bottom up);
A_c = V_c − mean{V_c′ : c′ a sibling of c} (leave one out; no sibling: A_c = V_c). No std scaling.

Estimator. A segment is a parent → child edge (x_p, x_c, A_c, group = the parent). One forward on x_p gives
ℓ^k = log π_θ(x_c^k | c, x_p) at every k masked in x_p and committed in x_c; the active tokens are those up to and
including the child's first stop token, with ℓ ≠ 0. π_old is scored once per batch in eval mode, π_ref on the
frozen reference.

Loss, with ρ_k = exp(ℓ^k − ℓ_old^k) and L_eff = max(1, #active):

    J_c  = (1/L_eff) Σ_k min(ρ_k A_c, clip(ρ_k, 1 − ε, 1 + ε) A_c)
    loss = −mean_c J_c + β · mean_c (1/L_eff) Σ_k k3_k + λ(t) · SD

SD (self-distillation), per sibling group g with ≥ 2 members and a positive advantage: w = softmax(A/τ(t)) over
the positive children, q_j the w-weighted histogram of their tokens at position j, and SD the mean over (g, j) of
KL(q_j ‖ π_θ(·|x_p)); λ(t) = λ_max(e^{γϱ} − 1)/(e^γ − 1), τ(t) = max(τ_max(1 − ϱ)^{β_τ}, 1e-6), ϱ = min(1, t/T).
Defaults (the official yaml, mirrored by DARE): ε = 0.4, β = 0.01, s = 2, branch 4, root 4, μ = 12, λ_max = 3e-3,
γ = 2, τ_max = 2, β_τ = 0.7.

Where a summary of the paper and the codes differ, this follows the official trainer and DARE: the baseline is the
mean of the *other* siblings (the summary's V_c − V_p is B/(B−1) times smaller), and s is the number of levels of
T/s steps each (the summary reads it as steps merged per level). Where the two codes differ:
- The update schedule (``update_schedule``). Official: a minibatch is one parent position's segments (that
  parent's children in every tree of the device's batch), trained for μ consecutive optimizer steps, one
  position after another in a shuffled order, a new tree search once all are used: ``per_parent``, the default,
  does exactly that within one trainer step. DARE instead makes μ passes over unshuffled minibatches of every
  segment; ``all_segments`` makes μ passes over all segments with sibling groups kept together.
- Sibling groups share a minibatch, as the official trainer packs each parent's children together. DARE's
  node-major mini-batches never hold two siblings, so its SD term is identically 0.
- The clock t counts optimizer steps (official); T is ``self_distillation_horizon`` (30000, DARE's default; the
  official trainer uses the run's max_steps, DARE counts RL steps).
- The scored context is the sampled one: pad keys of left-padded prompts are hidden in both (DARE scores with an
  all-ones attention mask, the official code with none).
- π_ref is the trainer's reference: the LoRA-disabled base under LoRA (as both codes), else a frozen copy, so LoRA
  is not required for the KL term (DARE raises without it).
- SD reads π_θ(·|x_p) at a positive child's token from that child's own ℓ: siblings share x_p, so the forward
  each segment makes anyway is the parent forward the official code runs once more per group (equal without
  dropout), and every rank makes the same number of forwards.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from dare_gym.algorithms.base import (
    Algorithm,
    AlgorithmConfig,
    Rollout,
    masked_mean,
    register_algorithm,
)
from dare_gym.algorithms.options import ResponseMask
from dare_gym.core.buffer import RolloutBuffer, random_order
from dare_gym.core.distributed import gather_objects
from dare_gym.core.logprobs import token_entropy, token_log_probs
from dare_gym.core.losses import clipped_surrogate, kl_penalty
from dare_gym.core.policy import Completion, eval_mode
from dare_gym.algorithms.dtreerpo.rollout import TreeNodes, grow_trees, segment_buffer

SD_EPS = 1e-8  # in q / (Σw + ε) and log(q + ε), as the official trainer
UPDATE_SCHEDULES = ("per_parent", "all_segments")
PARENT_POSITION = "dtreerpo.parent_position"  # buffer column: the parent's position inside its own tree


@dataclass
class DTreeRPOConfig(ResponseMask, AlgorithmConfig):
    num_iterations: int = 12
    """μ: optimizer updates per batch of trees (official num_iterations / ppo_epochs)"""
    beta: float = 0.01
    """weight of the k3 KL towards the reference, a per-segment token mean"""
    epsilon: float = 0.4
    """token ratio clip range [1 − ε, 1 + ε]"""
    tree_contraction_factor: int = 2
    """s: the number of tree levels, each of T/s denoising steps"""
    tree_branch_factor: int = 4
    """children of every inner node below the root"""
    num_tree_samples: int | None = None
    """children of the root (recipe: 4); null: group_size / tree_branch_factor^(s−1), so a tree has group_size
    leaves"""
    self_distillation: bool = True
    """add λ(t)·SD, the KL from each sibling group's advantage-weighted token histogram to π_θ(·|x_p)"""
    self_distillation_lambda_max: float = 3e-3
    """λ_max: the SD weight at the end of the schedule"""
    self_distillation_gamma: float = 2.0
    """γ: λ(t) = λ_max(e^{γϱ} − 1)/(e^γ − 1)"""
    self_distillation_tau_max: float = 2.0
    """τ_max: the softmax temperature of the advantages at the start, τ(t) = τ_max(1 − ϱ)^{β_τ}"""
    self_distillation_beta: float = 0.7
    """β_τ: the exponent of τ(t)'s decay"""
    self_distillation_horizon: int = 30000
    """T: optimizer steps over which ϱ = t/T goes from 0 to 1"""
    update_schedule: str = "per_parent"
    """per_parent (official): the segments of one parent position of the trees (its children, in every tree of
    the batch) make a minibatch trained for num_iterations consecutive optimizer steps, one position after the
    other in a shuffled order; all_segments: num_iterations passes over every segment"""

    def check(self):
        if self.update_schedule not in UPDATE_SCHEDULES:
            raise ValueError(f"update_schedule must be one of {', '.join(UPDATE_SCHEDULES)}, got {self.update_schedule!r}")
        for name in ("num_iterations", "tree_contraction_factor", "tree_branch_factor", "self_distillation_horizon"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.num_tree_samples is not None and (not isinstance(self.num_tree_samples, int)
                                                  or isinstance(self.num_tree_samples, bool)
                                                  or self.num_tree_samples < 1):
            raise ValueError(f"num_tree_samples must be an integer >= 1 or null, got {self.num_tree_samples!r}")
        for name in ("beta", "epsilon", "self_distillation_lambda_max", "self_distillation_gamma",
                     "self_distillation_tau_max", "self_distillation_beta"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0:
                raise ValueError(f"{name} must be a number >= 0, got {value!r}")


# ------------------------------------------------------------------------------------ values, advantages


def tree_values(node: torch.Tensor, parent: torch.Tensor, depth: torch.Tensor, reward: torch.Tensor):
    """V of every row's node, bottom up: a leaf's reward, an inner node's NaN-aware mean of its children's V (0
    where none is known, as the official trainer's nan_to_num). Returns (values [N], the roots' values [R]: the
    roots have no row, their value is only logged)."""
    values = reward.double().clone()
    children: dict[int, list[int]] = defaultdict(list)
    for row, p in enumerate(parent.tolist()):
        children[p].append(row)

    def mean_of(rows: list[int]) -> float:
        known = values[rows][~torch.isnan(values[rows])]
        return float(known.mean()) if len(known) else 0.0

    for row in sorted(range(len(node)), key=lambda r: -int(depth[r])):  # children before their parents
        if children.get(int(node[row])):
            values[row] = mean_of(children[int(node[row])])
    rows = set(node.tolist())
    roots = torch.tensor([mean_of(kids) for p, kids in children.items() if p not in rows], dtype=torch.float64)
    return values, roots


def sibling_advantages(values: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """A_c = V_c − mean of the known V of c's siblings (rows sharing ``group``); V_c with no known sibling; 0 where
    V_c itself is unknown (NaN)."""
    known = ~torch.isnan(values)
    v = torch.where(known, values, torch.zeros_like(values))
    _, index = torch.unique(group, return_inverse=True)
    sums = torch.zeros(int(index.max()) + 1, dtype=v.dtype).index_add_(0, index, v)
    counts = torch.zeros_like(sums).index_add_(0, index, known.to(v.dtype))
    others, other_count = sums[index] - v, counts[index] - known.to(v.dtype)
    baseline = torch.where(other_count > 0, others / other_count.clamp(min=1), torch.zeros_like(v))
    return torch.where(known, v - baseline, torch.zeros_like(v))


# ---------------------------------------------------------------------------------------------- losses


def segment_mean(per_token: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    """[B] each segment's mean over its active tokens, (1/L_eff) Σ_k, with L_eff = max(1, #active)."""
    total = torch.where(active, per_token, torch.zeros_like(per_token)).sum(dim=1)
    return total / active.sum(dim=1).clamp(min=1)


def segment_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, active: torch.Tensor,
                        epsilon: float) -> tuple[torch.Tensor, torch.Tensor]:
    """−mean_c J_c: the clipped token surrogate, a token mean per segment, the mean over segments; and the
    per-token mask of clipped tokens."""
    per_token, clipped = clipped_surrogate(logp, old_logp, advantages[:, None], epsilon_low=epsilon)
    return segment_mean(per_token, active).mean(), clipped


def segment_kl(logp: torch.Tensor, ref_logp: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    """mean_c (1/L_eff) Σ_k k3_k, with u = ℓ_ref − ℓ on the active tokens."""
    return segment_mean(kl_penalty(logp, ref_logp, "k3"), active).mean()


def self_distillation_schedule(progress: float, *, lambda_max: float, gamma: float, tau_max: float,
                               tau_exponent: float) -> tuple[float, float]:
    """(λ, τ) at ϱ = progress clipped to [0, 1]: λ = λ_max(e^{γϱ} − 1)/(e^γ − 1) (λ_max·ϱ at γ = 0),
    τ = max(τ_max(1 − ϱ)^{β_τ}, 1e-6)."""
    rho = min(1.0, max(0.0, progress))
    weight = lambda_max * (math.expm1(gamma * rho) / math.expm1(gamma) if gamma > 0 else rho)
    return weight, max(tau_max * (1.0 - rho) ** tau_exponent, 1e-6)


def self_distillation_loss(logp: torch.Tensor, tokens: torch.Tensor, advantages: torch.Tensor, active: torch.Tensor,
                           group: torch.Tensor, tau: float) -> tuple[torch.Tensor, int]:
    """The mean over (sibling group g, position j) of KL(q_j ‖ π_θ(·|x_p)), and the number of terms.

    Groups count with ≥ 2 rows and a positive advantage; w = softmax(A/τ) over the positive rows, and q_j is the
    w-weighted histogram of their tokens at j (over those active at j, normalised by Σw + 1e-8). Siblings share
    x_p, so log π_θ(v|x_p) for a positive row's token v is that row's own ``logp`` at j: the sum over q's support
    is a sum over the positive rows, each weighted by its share of its token's mass."""
    total, terms = logp.new_zeros(()), 0
    for g in torch.unique(group):
        members = (group == g).nonzero().squeeze(1)
        if len(members) < 2:
            continue
        advantage = torch.nan_to_num(advantages[members].to(logp.dtype), nan=0.0)
        positive = advantage > 0
        if not positive.any():
            continue
        rows = members[positive]
        weights = torch.softmax(advantage[positive] / tau, dim=0)  # [K]
        act, tok, lp = active[rows], tokens[rows], logp[rows]  # [K, L]
        share = weights[:, None] * act  # [K, L] each row's weight where it is active
        norm = share.sum(dim=0) + SD_EPS  # [L]
        same = (tok[:, None, :] == tok[None, :, :]) & act[None, :, :]  # [K, K, L]: row k′ active with k's token
        mass = (same * weights[None, :, None]).sum(dim=1) / norm  # [K, L] q of row k's token
        term = torch.where(act, share / norm * (torch.log(mass + SD_EPS) - lp), torch.zeros_like(lp)).sum(dim=0)
        positions = act.any(dim=0)
        total = total + term[positions].sum()
        terms += int(positions.sum())
    return total / max(terms, 1), terms


def dtreerpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor | None, advantages: torch.Tensor,
                  active: torch.Tensor, tokens: torch.Tensor, group: torch.Tensor, *, epsilon: float, beta: float,
                  sd_weight: float, sd_tau: float) -> tuple[torch.Tensor, dict[str, float]]:
    """A minibatch's loss from its segments' token log-probs ([B, L], ``active`` the tokens that count):
    −mean_c J_c + β·KL (when ``ref_logp`` is given) + λ·SD (when ``sd_weight`` > 0), and its parts for the logs."""
    loss, clipped = segment_policy_loss(logp, old_logp, advantages, active, epsilon)
    log_ratio = (logp - old_logp).detach()
    metrics = {"policy_loss": loss.item(), "clip_fraction": masked_mean(clipped, active),
               "approx_kl_old": masked_mean(torch.exp(log_ratio) - 1 - log_ratio, active),
               "scored_tokens": float(active.sum()), "advantage_abs_mean": float(advantages.abs().mean())}
    if ref_logp is not None:
        kl = segment_kl(logp, ref_logp, active)
        loss = loss + beta * kl
        metrics["kl_ref"] = kl.item()
    if sd_weight > 0:
        sd, terms = self_distillation_loss(logp, tokens, advantages, active, group, sd_tau)
        loss = loss + sd_weight * sd
        metrics.update(sd_loss=sd.item(), sd_terms=float(terms), sd_lambda=sd_weight, sd_tau=sd_tau)
    return loss, metrics


# ------------------------------------------------------------------------------------------- estimator


def segment_logp(logits_fn, batch: RolloutBuffer, mask_token_id: int, device) -> tuple[torch.Tensor, ...]:
    """One forward on each row's parent state x_p: (ℓ [B, L], 0 off the segment; the segment's tokens, masked in
    x_p, committed in x_c, up to and including x_c's first stop token; the predictive entropy, detached)."""
    inputs = batch.model_inputs(device)
    parent = batch.columns["parent_ids"].to(device)
    child = inputs.completion_ids
    logits = logits_fn(torch.cat([inputs.prompt_ids, parent], dim=1), inputs.attention_mask,
                       logits_to_keep=child.shape[1])
    segment = (parent == mask_token_id) & (child != mask_token_id) & inputs.completion_mask.bool()
    logp = token_log_probs(logits, child)
    return torch.where(segment, logp, torch.zeros_like(logp)), segment, token_entropy(logits)


# ------------------------------------------------------------------------------------------- the rollout


@dataclass
class TreeRollout(Rollout):
    """The leaves are the completions the env scores (one per sub-env: a prompt's group holds its tree's leaves);
    the buffer's rows are the segments."""

    tree_prompts: list[str] = field(default_factory=list)
    tree: TreeNodes | None = None

    def buffer(self, rewards: Sequence[float], group_ids: Sequence[int],
               correct: Sequence[bool] | None = None) -> RolloutBuffer:
        return segment_buffer(self.tree, self.tree_prompts, rewards, self.policy, self.response_mask)


def leaf_completions(policy, tree: TreeNodes) -> list[Completion]:
    completions = []
    for node in tree.leaves().tolist():
        prompt = tree.prompt_ids[tree.tree[node]][tree.prompt_mask[tree.tree[node]].bool()]
        ids = tree.completion_ids[node].cpu()
        completions.append(Completion(text=policy.decode(ids), prompt_ids=prompt.cpu(), completion_ids=ids,
                                      unmask_step=tree.unmask_step[node].cpu(),
                                      commit_logp=tree.commit_logp[node].cpu()))
    return completions


def parent_positions(buffer: RolloutBuffer) -> torch.Tensor:
    """[N] each segment's parent position inside its own tree (0: the root, then its inner nodes in order): the
    same for the corresponding parents of every tree, since all trees of a batch have one shape."""
    tree, node, parent = buffer.columns["tree"], buffer.columns["node"], buffer.columns["parent"]
    positions = torch.empty_like(parent)
    for t in torch.unique(tree).tolist():
        rows = tree == t
        ids = torch.unique(torch.cat([parent[rows], node[rows]]))  # sorted: the root first, level-major
        positions[rows] = torch.searchsorted(ids, parent[rows])
    return positions


# -------------------------------------------------------------------------------------------- algorithm


@register_algorithm("dtreerpo", DTreeRPOConfig)
class DTreeRPO(Algorithm):
    config: DTreeRPOConfig
    minibatch_unit = "group_id"  # a parent's children train together, so SD sees whole sibling groups

    def __init__(self, config: DTreeRPOConfig, *, mask_token_id: int):
        super().__init__(config, mask_token_id=mask_token_id)
        self.optimizer_steps = 0  # SD's clock t
        self.root_value = float("nan")

    @property
    def needs_reference(self) -> bool:
        return self.config.beta > 0  # the k3 term towards the reference

    def fan_out(self, group_size: int) -> list[int]:
        """Children per node at each level: the root's, then tree_branch_factor; the leaves are group_size."""
        config = self.config
        below = config.tree_branch_factor ** (config.tree_contraction_factor - 1)
        root = config.num_tree_samples
        if root is None and group_size % below == 0:
            root = group_size // below
        if root is None or root * below != group_size:
            shown = "group_size / " if config.num_tree_samples is None else f"{root} × "
            raise ValueError(
                f"dtreerpo: a tree's leaves are scored by its prompt's group, so num_tree_samples × "
                f"tree_branch_factor^(tree_contraction_factor − 1) must equal group_size={group_size}; got "
                f"{shown}{config.tree_branch_factor}^{config.tree_contraction_factor - 1}: set group_size to a "
                f"multiple of {below}, or num_tree_samples to null")
        return [root] + [config.tree_branch_factor] * (config.tree_contraction_factor - 1)

    def rollout(self, policy, prompts: Sequence[str], *, group_size: int, generator, batch_size: int,
                settings: dict[str, Any], context=None) -> TreeRollout:
        fan_out = self.fan_out(group_size)
        settings = dict(settings)
        sampler = settings.pop("sampler", None)
        if sampler not in (None, "llada"):
            raise ValueError(f"dtreerpo's tree rollout is LLaDA's sampler: rollout.sampler must be llada or null, "
                             f"got {sampler!r}")
        if policy.block_size is not None:  # LLaDA's semi-AR blocks on the model's own block grid by default
            settings.setdefault("block_length", policy.block_size)
            settings.setdefault("steps", settings.get("gen_length", policy.generation_defaults["gen_length"]))
        _, options = policy.sampler_settings("llada", settings)  # validates the schedule, names unknown options
        trees = list(prompts[::group_size])
        for number, prompt in enumerate(trees):
            if any(p != prompt for p in prompts[number * group_size:(number + 1) * group_size]):
                raise ValueError(f"prompts must come in groups of group_size={group_size} copies; group {number} "
                                 "holds different prompts")
        prompt_ids, prompt_mask = policy.encode_prompts(trees)
        tree = grow_trees(policy, prompt_ids, prompt_mask, fan_out=fan_out, steps=options.steps,
                          gen_length=options.gen_length, block_length=options.block_length,
                          temperature=options.temperature, remasking=options.remasking, generator=generator,
                          batch_size=batch_size)
        return TreeRollout(list(prompts), leaf_completions(policy, tree), policy, self.response_mask,
                           tree_prompts=trees, tree=tree)

    def update_plan(self, buffer: RolloutBuffer, micro_batch_size: int, generator):
        """``all_segments``: the default plan. ``per_parent`` (the official schedule): for each parent position,
        in a random order, ``num_iterations`` optimizer steps on that position's segments alone."""
        if self.config.update_schedule == "all_segments":
            yield from super().update_plan(buffer, micro_batch_size, generator)
            return
        positions = parent_positions(buffer)
        order = torch.unique(positions)
        # one shuffled order for every rank (rank 0's), so a distributed update is the single-process one
        order = gather_objects(order[random_order(len(order), generator)].tolist())[0]
        for position in order:
            segment = buffer.select(positions == position)
            for iteration in range(self.config.num_iterations):
                yield iteration, segment.minibatches(micro_batch_size, generator=generator, unit="group_id")

    def advantages(self, buffer: RolloutBuffer, group_size: int) -> RolloutBuffer:
        values, roots = tree_values(buffer.columns["node"], buffer.columns["parent"], buffer.columns["depth"],
                                    buffer.reward)
        buffer.advantage = sibling_advantages(values, buffer.group_id).float()
        buffer.columns["value"] = values.float()
        self.root_value = float(roots.mean()) if len(roots) else float("nan")
        return buffer

    @torch.no_grad()
    def prepare(self, policy, reference, buffer: RolloutBuffer, generator, micro_batch_size: int = 64) -> None:
        """ℓ_old once per batch, in eval mode (μ = 1: the update is on-policy and ℓ_old is ℓ detached), and ℓ_ref."""
        scorers = [("old_logp", policy)] if self.config.num_iterations > 1 else []
        if self.needs_reference:
            scorers.append(("ref_logp", reference))
        with eval_mode(policy.model):
            for column, scorer in scorers:
                parts = [segment_logp(scorer.logits, buffer.select(rows), self.mask_token_id, policy.device)[0].cpu()
                         for rows in buffer.row_chunks(micro_batch_size)]
                buffer.columns[column] = torch.cat(parts)

    def loss(self, policy, batch: RolloutBuffer, iteration: int) -> tuple[torch.Tensor, dict[str, float]]:
        logp, segment, entropy = segment_logp(policy.logits, batch, self.mask_token_id, policy.device)
        device = logp.device
        sd_weight, sd_tau = self.sd_schedule() if self.config.self_distillation else (0.0, 1.0)
        loss, metrics = dtreerpo_loss(
            logp, batch.columns["old_logp"].to(device) if "old_logp" in batch.columns else logp.detach(),
            batch.columns["ref_logp"].to(device) if self.needs_reference else None, batch.advantage.to(device),
            segment & (logp.detach() != 0), batch.completion_ids.to(device), batch.group_id.to(device),
            epsilon=self.config.epsilon, beta=self.config.beta, sd_weight=sd_weight, sd_tau=sd_tau)
        metrics.update(entropy=masked_mean(entropy, segment), root_value=self.root_value)
        return loss, metrics

    def sd_schedule(self) -> tuple[float, float]:
        config = self.config
        return self_distillation_schedule(
            self.optimizer_steps / config.self_distillation_horizon, lambda_max=config.self_distillation_lambda_max,
            gamma=config.self_distillation_gamma, tau_max=config.self_distillation_tau_max,
            tau_exponent=config.self_distillation_beta)

    def after_optimizer_step(self) -> None:
        self.optimizer_steps += 1

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer_steps": self.optimizer_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer_steps = int(state.get("optimizer_steps", 0))

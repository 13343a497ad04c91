"""Memory of LLaDA2.0-mini training, on paper from its config.json, checked against the shrunk model on CPU.

    python experiments/llada2_memory.py            # the table (BENCHMARKS.md) and the CPU check, ~1 min
    python experiments/llada2_memory.py --config ../shared/families/LLaDA2.0-mini/config.json --check-only

**Counting.** Parameters and active parameters (per token: attention, dense layers, the shared expert, the router
and ``num_experts_per_tok`` of the routed experts, embeddings and head) come from the config's sizes. Bytes that
autograd keeps for the backward (activations) are counted op by op for :mod:`dare_gym.models.llada2` as written:
every tensor the forward saves, per token and per layer, in the activations' dtype (or float32 where the model
computes in float32: norms, router, the weighted sum of expert outputs, attention log-sum-exps), plus the
logits of the scored positions kept by the chunked log-probabilities (:mod:`dare_gym.logprobs`). The forward
counted is the block-diffusion training forward (:meth:`ModelFamily.noisy_clean_forward`: [x_0 ; x_t], 2·(prompt
+ gen) tokens a row, logits for the gen positions of x_t), the one EBPO and BGPO score with.

**Check.** The same counts for the shrunk LLaDA2.0-mini stand-in (real vocabulary, 3 layers, 16 experts) against
what runs on CPU: parameters, gradient and AdamW bytes of the built model, and the bytes autograd saves, measured
by :class:`update_probe.SavedTensorMeter` (distinct storages, weights excluded), in float32 and bfloat16, with and
without gradient checkpointing. They must agree exactly: the count is the code's.

**Settings of the table.** Micro-batch 4 rows, prompt 64 + gen 256 (the GPU check's schedule), blocks of 32,
gradient checkpointing (non-reentrant: each layer's input kept; at the backward one layer's internals at a time).
LoRA on one 80 GB card: bf16 base (float32 routers), r = 16 on the default targets, adapters, their gradients and
AdamW moments float32; the reference is the base with adapters off (no copy). Full fine-tuning under FSDP2 on
8 cards: float32 shards as master weights (4 B), float32 gradient shards (4 B), AdamW moments (8 B) per parameter
over 8, the bf16 parameters of the largest layer gathered (twice: FSDP prefetches the next layer), and with a KL
term a float32 reference sharded the same way.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

FAMILIES = Path(__file__).resolve().parents[2] / "shared" / "families"
GIB = 2**30


@dataclass
class Shape:
    """The sizes that decide LLaDA2's memory, from a config.json dict."""

    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    experts: int
    shared: int
    top_k: int
    groups: int
    top_groups: int
    expert_width: int
    dense_layers: int
    qkv_bias: bool
    dense_bias: bool

    @classmethod
    def from_config(cls, config: dict) -> "Shape":
        head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
        return cls(vocab=config["vocab_size"], hidden=config["hidden_size"], layers=config["num_hidden_layers"],
                   heads=config["num_attention_heads"], kv_heads=config["num_key_value_heads"], head_dim=head_dim,
                   intermediate=config["intermediate_size"], experts=config.get("num_experts") or 0,
                   shared=config.get("num_shared_experts") or 0, top_k=config["num_experts_per_tok"],
                   groups=config["n_group"], top_groups=config["topk_group"],
                   expert_width=config["moe_intermediate_size"], dense_layers=config["first_k_dense_replace"],
                   qkv_bias=bool(config.get("use_qkv_bias")), dense_bias=bool(config.get("use_bias")))

    @property
    def moe_layers(self) -> int:
        return self.layers - self.dense_layers if self.experts else 0

    @property
    def fused(self) -> int:  # query_key_value's output width
        return (self.heads + 2 * self.kv_heads) * self.head_dim


# ------------------------------------------------------------------------------------------- parameters


def parameter_counts(s: Shape) -> dict:
    """Parameters by part; ``active``: those one token's forward uses (top-k of the routed experts)."""
    swiglu = lambda width: 3 * s.hidden * width  # noqa: E731
    attention = (s.hidden * s.fused + s.fused * s.qkv_bias + s.heads * s.head_dim * s.hidden + s.hidden * s.dense_bias
                 + 2 * s.head_dim + 2 * s.hidden)  # projections, QK norms, the layer's two RMSNorms
    expert = swiglu(s.expert_width)
    router = s.experts * s.hidden
    shared = swiglu(s.expert_width * s.shared)
    parts = {
        "embeddings": s.vocab * s.hidden, "head": s.vocab * s.hidden, "final norm": s.hidden,
        "attention": s.layers * attention, "dense MLPs": (s.layers - s.moe_layers) * swiglu(s.intermediate),
        "routers": s.moe_layers * router, "shared experts": s.moe_layers * shared,
        "routed experts": s.moe_layers * s.experts * expert,
    }
    total = sum(parts.values())
    active = total - parts["routed experts"] + s.moe_layers * s.top_k * expert
    tensors = (3 + s.layers * (6 + s.qkv_bias + s.dense_bias) + 3 * (s.layers - s.moe_layers)
               + s.moe_layers * (1 + 3 * bool(s.shared) + 3 * s.experts))
    return {"parts": parts, "total": total, "active": active, "expert_bias_buffers": s.moe_layers * s.experts,
            "tensors": tensors}


def lora_parameters(s: Shape, rank: int) -> int:
    """LoRA r on LLaDA2's default targets: query_key_value and dense of every layer, the dense layers' and the
    shared experts' SwiGLU (routed experts and router untouched). A Linear(in, out) gets r·(in + out)."""
    linear = lambda fan_in, fan_out: rank * (fan_in + fan_out)  # noqa: E731
    attention = linear(s.hidden, s.fused) + linear(s.heads * s.head_dim, s.hidden)
    swiglu = lambda width: 2 * linear(s.hidden, width) + linear(width, s.hidden)  # noqa: E731
    return (s.layers * attention + (s.layers - s.moe_layers) * swiglu(s.intermediate)
            + s.moe_layers * swiglu(s.expert_width * s.shared))


# ------------------------------------------------------------------------------------------- activations


def _norm(width: int, a: int, rows: int = 1) -> int:
    """An RMSNorm over ``width`` (``rows`` of them a token): its rsqrt (float32), the normalised values before the
    gain in the activations' dtype, and in bf16 the float32 copy of its input (in float32 that copy *is* the input,
    counted where it is made)."""
    return rows * 4 + a * width + (4 * width if a == 2 else 0)


def layer_bytes_per_token(s: Shape, a: int, moe: bool) -> int:
    """What autograd keeps for one decoder layer, per token (fully trainable; bytes; a = activations' bytes)."""
    q, k = s.heads * s.head_dim, s.kv_heads * s.head_dim
    total = _norm(s.hidden, a)  # input_layernorm
    total += a * s.hidden  # its output: query_key_value's input
    total += a * s.fused  # query_key_value's output (values read from it; float32 QK norms read it too)
    total += _norm(q, a, s.heads)  # query norm, one per head (float32: its input is a view of the fused output)
    total += _norm(k, a, s.kv_heads)  # key norm
    total += a * q + a * k + a * q + 4 * s.heads  # attention: rotated queries and keys, output, log-sum-exp
    total += a * q  # the output re-laid out for dense
    total += (a * s.hidden if a == 4 else 0) + _norm(s.hidden, a)  # the residual h (float32: kept by the norm)
    total += a * s.hidden  # post_attention_layernorm's output: the MLP's input
    if not moe:
        return total + 4 * a * s.intermediate  # gate_proj and up_proj outputs, silu, their product
    slots = s.top_k
    total += 4 * s.hidden if a == 2 else 0  # the router's float32 copy of its input
    total += 4 * s.experts  # sigmoid scores (the group ranking and the choice are indices: no backward, freed)
    total += 8 * slots  # chosen experts (int64), where the weights are gathered
    total += 4 * slots + 4  # the chosen scores and their sum (normalisation)
    total += 8 * slots  # which token each sorted slot reads (int64)
    total += a * slots * s.hidden  # the tokens gathered per slot: the experts' input
    total += 4 * a * slots * s.expert_width  # each slot's expert: gate, silu, up, product
    total += 8 * slots  # the inverse permutation back to slot order (int64)
    total += 4 * slots * s.hidden + 4 * slots  # float32 expert outputs and their weights, for the weighted sum
    total += 4 * a * s.expert_width * s.shared  # the shared experts' SwiGLU
    return total


def activation_bytes(s: Shape, *, rows: int, prompt: int, gen: int, a: int, checkpointing: bool) -> dict:
    """Bytes autograd keeps for one block-diffusion training forward ([x_0 ; x_t]) and the chunked log-probs of the
    gen positions of x_t, plus (with checkpointing) the one layer recomputed at a time in the backward."""
    tokens = rows * 2 * (prompt + gen)
    kept = rows * gen
    rope = s.head_dim // 2  # partial_rotary_factor 0.5: rotary dims per head
    shared_inputs = 2 * tokens * rope * a + rows * (2 * (prompt + gen)) ** 2 * a  # cos, sin and the 4D mask
    embedding = tokens * 8  # the ids (the embedding's backward)
    layer_inputs = s.layers * tokens * s.hidden * a  # what checkpointing keeps (float32: kept by the norm anyway)
    dense = layer_bytes_per_token(s, a, moe=False) * tokens
    moe = layer_bytes_per_token(s, a, moe=True) * tokens
    if checkpointing:
        layers = layer_inputs
        recompute = max(dense if s.layers > s.moe_layers else 0, moe if s.moe_layers else 0)
    else:
        layers = (s.layers - s.moe_layers) * dense + s.moe_layers * moe + (layer_inputs if a == 4 else 0)
        recompute = 0
    final_norm = tokens * (_norm(s.hidden, a) + (s.hidden * a if a == 4 else 0))
    # the head's input: the kept positions' hidden states, a copy (with one row, a view of all of them)
    head = (tokens if rows == 1 else kept) * s.hidden * a
    logits = kept * s.vocab * a + kept * 8 + kept * 4  # logits, targets, log-normalisers (dare_gym.logprobs)
    model = shared_inputs + embedding + layers + final_norm + head
    return {"model": model, "log_probs": logits, "forward": model + logits, "recompute": recompute,
            "peak": model + logits + recompute, "tokens": tokens}


# ------------------------------------------------------------------------------------------- the table


def table(config: dict, *, rows: int = 4, prompt: int = 64, gen: int = 256, rank: int = 16, ranks: int = 8) -> dict:
    s = Shape.from_config(config)
    counts = parameter_counts(s)
    total, router = counts["total"], counts["parts"]["routers"]
    activations = activation_bytes(s, rows=rows, prompt=prompt, gen=gen, a=2, checkpointing=True)
    no_checkpointing = activation_bytes(s, rows=rows, prompt=prompt, gen=gen, a=2, checkpointing=False)
    adapters = lora_parameters(s, rank)
    lora = {"weights": 2 * (total - router) + 4 * router + 4 * counts["expert_bias_buffers"] + 4 * adapters,
            "gradients": 4 * adapters, "adamw": 8 * adapters, "activations": activations["peak"]}
    largest_layer = max(3 * s.hidden * s.intermediate if s.dense_layers else 0,
                        s.experts * 3 * s.hidden * s.expert_width + 3 * s.hidden * s.expert_width * s.shared
                        + s.experts * s.hidden) + s.hidden * s.fused + s.heads * s.head_dim * s.hidden
    # FSDP2: float32 shards; at a time two layers' bf16 parameters gathered (the next one prefetched) and, in the
    # backward, one layer's unsharded bf16 gradient and its float32 copy for the float32 reduce-scatter
    fsdp = {"weights": 4 * total / ranks + 2 * 2 * largest_layer, "gradients": 4 * total / ranks + 6 * largest_layer,
            "adamw": 8 * total / ranks, "activations": activations["peak"], "reference (beta > 0)": 4 * total / ranks}
    return {"shape": s.__dict__, "parameters": counts, "lora_parameters": adapters,
            "settings": dict(rows=rows, prompt=prompt, gen=gen, lora_rank=rank, fsdp_ranks=ranks, dtype="bfloat16",
                             gradient_checkpointing=True),
            "activations_without_checkpointing": no_checkpointing["peak"], "activations": activations,
            "lora_one_card": lora, "fsdp_per_card": fsdp}


def markdown(result: dict) -> str:
    p = result["parameters"]
    lines = [f"LLaDA2.0-mini: {p['total'] / 1e9:.2f}B parameters ({p['parts']['routed experts'] / 1e9:.2f}B in routed "
             f"experts), {p['active'] / 1e9:.2f}B active per token "
             f"({(p['active'] - p['parts']['embeddings'] - p['parts']['head']) / 1e9:.2f}B without embeddings and "
             f"head); LoRA r={result['settings']['lora_rank']}: {result['lora_parameters'] / 1e6:.1f}M adapter "
             "parameters.", "",
             "| GiB | LoRA, 1 × 80 GB card | full fine-tuning, FSDP2, per card of 8 |", "|---|---|---|"]
    lora, fsdp = result["lora_one_card"], result["fsdp_per_card"]
    for key, label in [("weights", "weights"), ("gradients", "gradients"), ("adamw", "AdamW states"),
                       ("activations", "activations (gen 256, checkpointing)")]:
        lines.append(f"| {label} | {lora[key] / GIB:.2f} | {fsdp[key] / GIB:.2f} |")
    lines.append(f"| total | {sum(lora.values()) / GIB:.1f} | "
                 f"{sum(v for k, v in fsdp.items() if not k.startswith('reference')) / GIB:.1f} "
                 f"(+{fsdp['reference (beta > 0)'] / GIB:.1f} with a KL reference) |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------- the CPU check


class LiveSavedMeter:
    """Bytes autograd keeps for the backward: distinct storages of the tensors saved by the graph that are still
    alive (weights excluded). A node whose output nothing uses is freed at once with what it saved, and its memory
    reused: counting by address alone would count it, or lose a later tensor at the same address."""

    def __init__(self, model: torch.nn.Module):
        import weakref

        self._ref = weakref.ref
        self.weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.saved: list = []
        self.peak = 0

    def live(self) -> int:
        storages = {}
        self.saved = [(ref, ptr, size) for ref, ptr, size in self.saved if ref() is not None]
        for _, ptr, size in self.saved:
            storages[ptr] = size
        return sum(storages.values())

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in self.weights and storage.nbytes():
            self.saved.append((self._ref(tensor), storage.data_ptr(), storage.nbytes()))
            self.peak = max(self.peak, self.live())
        return tensor

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda tensor: tensor)


def measure(folder: Path, *, dtype: torch.dtype, checkpointing: bool, rows: int, prompt: int, gen: int) -> dict:
    """One block-diffusion training forward and backward of the model in ``folder`` on CPU: parameter, gradient and
    AdamW bytes of the model itself, and the bytes autograd saved (forward and, with checkpointing, the recompute)."""
    import dare_gym
    from dare_gym.core.logprobs import token_log_probs
    from dare_gym.core.precision import MasterWeightAdamW, enable_activation_checkpointing, optimizer_state_bytes

    policy = dare_gym.load_policy(folder, dtype=dtype)
    model = policy.model.train()
    if checkpointing:
        enable_activation_checkpointing(model)
    generator = torch.Generator().manual_seed(0)
    clean = torch.randint(0, 1000, (rows, prompt + gen), generator=generator)
    noisy = clean.masked_fill(torch.rand(clean.shape, generator=generator) < 0.5, policy.mask_token_id)
    meter = LiveSavedMeter(model)
    optimizer = MasterWeightAdamW(model.parameters(), lr=1e-6)
    with meter.hooks():
        logits = policy.family.noisy_clean_forward(model, noisy, clean, None, block_size=policy.block_size,
                                                   logits_to_keep=gen)
        forward = meter.live()
        loss = token_log_probs(logits, clean[:, prompt:].contiguous()).sum()
        before_backward = meter.live()
        loss.backward()
    gradients = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
    optimizer.clip_and_step(1.0)
    return {"parameters": sum(p.numel() for p in model.parameters()),
            "parameter_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
            "gradient_bytes": gradients, "adamw_bytes": optimizer_state_bytes(optimizer),
            "saved_model": forward, "saved_before_backward": before_backward, "saved_peak": meter.peak}


COMBINATIONS = ((torch.float32, False), (torch.float32, True), (torch.bfloat16, False), (torch.bfloat16, True))


def check(config_path: Path, *, rows: int = 2, prompt: int = 12, gen: int = 20,
          combinations=COMBINATIONS) -> list[dict]:
    """Counts against measurements on the shrunk stand-in of ``config_path``'s folder, for each (dtype, gradient
    checkpointing) of ``combinations``: a list of {quantity: (counted, measured)}."""
    import tempfile

    from dare_gym.models.standin import build_standin

    results = []
    with tempfile.TemporaryDirectory() as scratch:
        folder = build_standin("llada2", Path(scratch) / "standin", source=config_path.parent)
        s = Shape.from_config(json.loads((folder / "config.json").read_text()))
        counts = parameter_counts(s)
        for dtype, checkpointing in combinations:
            measured = measure(folder, dtype=dtype, checkpointing=checkpointing, rows=rows, prompt=prompt, gen=gen)
            a = 2 if dtype == torch.bfloat16 else 4
            counted = activation_bytes(s, rows=rows, prompt=prompt, gen=gen, a=a, checkpointing=checkpointing)
            router = counts["parts"]["routers"]
            weights = (a * (counts["total"] - router) + 4 * router)
            results.append({
                "dtype": str(dtype).removeprefix("torch."), "checkpointing": checkpointing,
                "parameters": (counts["total"], measured["parameters"]),
                "parameter_bytes": (weights, measured["parameter_bytes"]),
                "gradient_bytes": (weights, measured["gradient_bytes"]),
                # two float32 moments and a step counter per tensor, float32 masters of the bf16 weights
                "adamw_bytes": (8 * counts["total"] + 4 * counts["tensors"]
                                + (4 * (counts["total"] - router) if a == 2 else 0), measured["adamw_bytes"]),
                "saved_by_the_model": (counted["model"], measured["saved_model"]),
                "saved_before_backward": (counted["forward"], measured["saved_before_backward"]),
            })
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=FAMILIES / "LLaDA2.0-mini" / "config.json")
    parser.add_argument("--check-only", action="store_true")
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "llada2_memory.json")
    args = parser.parse_args()
    config = json.loads(args.config.read_text())
    result = {} if args.check_only else table(config)
    checks = check(args.config)
    print("| dtype | checkpointing | quantity | counted | measured |\n|---|---|---|---|---|")
    for row in checks:
        for key in ("parameters", "parameter_bytes", "gradient_bytes", "adamw_bytes", "saved_by_the_model",
                    "saved_before_backward"):
            counted, measured = row[key]
            print(f"| {row['dtype']} | {row['checkpointing']} | {key} | {counted:,} | {measured:,} |")
    if not args.check_only:
        result["cpu_check"] = checks
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(result, indent=2) + "\n")
        print()
        print(markdown(result))


if __name__ == "__main__":
    main()

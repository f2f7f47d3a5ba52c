"""The memory plan: what a training run holds at its peak, estimated before any weight loads, against the device.

Parts (bytes), for the model described by its config (counted on the meta device, so nothing is allocated):

- weights: every parameter in the load dtype (`model.dtype`); with `sft.quantization` the linear layers of the
  blocks in 4 bits (NF4 + double-quantized scales, ~0.52 byte/parameter) or 8 bits (~1.03), the rest in 16 bits;
- gradients and optimizer state: AdamW keeps two moments per trainable parameter, in its dtype;
- activations: what autograd saves for backward at the configured micro-batch and context. Measured, not
  guessed: a replica of the model's own layer class, narrowed by a factor k (hidden size, heads, intermediate
  size / k; the head size kept) and run on CPU with 1 and 2 layers and 1 and 2 sequences, counts the bytes of
  every saved tensor; the per-layer, per-sequence difference times k scales it back (SDPA keeps O(T) per layer:
  a 256-token probe scaled by T/256; eager attention also keeps T x T scores: probed at T, or fitted from two
  lengths beyond 1024). LoRA, autocast and the attention kernel
  are applied to the replica as to the run. Gradient checkpointing keeps each layer's input and one layer's
  activations. A replica that cannot be built falls back to a generic formula (the plan says so);
- the loss: logits [B, T, V] (in the autocast dtype), their log-softmax (fp32, kept for backward) and, at the
  start of backward, two fp32 gradients of that size: at large vocabularies (Qwen2's 152k) the biggest part;
- autocast copies: bf16 copies of fp32 linear weights that autocast keeps from forward to backward;
- CPU only: a resumable checkpoint copies the trainable weights and optimizer state in RAM while it is written.

Peak = weights + optimizer + max(activations + loss + autocast copies, gradients, checkpoint copy), plus 15%
for the allocator (fragmentation, caches). `tests/test_memory.py` checks it against the measured peak RSS of
real CPU runs; `bench/gpu_check.sh` against CUDA's max allocated.
"""

from __future__ import annotations

import copy
import logging
import sys
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from components.core.context import StageError

log = logging.getLogger("seedlm.train")
GIB = 2**30
SLACK = 0.15
"""Allocator overhead on top of the live tensors: freed memory that glibc's arenas (CPU) or CUDA's caching allocator
keep, fragmentation, the runtime's own buffers. Measured on CPU: 5-20% over the live tensors after a few steps."""
PROBE_VOCAB = 16
PROBE_CONTEXT = 1024
"""Longest sequence the replica runs with eager attention; longer contexts are extrapolated (linear + T^2 term)."""
SDPA_PROBE_CONTEXT = 256
"""With SDPA (no T x T scores kept) the saved bytes grow linearly in T: the replica runs this many tokens."""
QUANT_BYTES = {"4bit": 0.52, "8bit": 1.03}
WIDTH_KEYS = ("hidden_size", "intermediate_size", "n_inner", "num_attention_heads", "num_key_value_heads")


@dataclass(frozen=True)
class Setup:
    """What the estimate depends on besides the model; `key` names the params.yaml section (pretrain/sft)."""

    key: str
    method: str
    batch_size: int
    grad_accum: int
    context: int
    weights: torch.dtype
    autocast: torch.dtype | None
    device: str = "cpu"
    quantization: str | None = None
    checkpointing: bool = False
    lora: Any = None
    new_tokens: int = 0
    snapshots: bool = False
    """CPU: resumable checkpoints copy the trainable weights and optimizer state in RAM."""

    @property
    def attention(self) -> str:
        """The kernel training runs (model.training_attention: eager for CPU bf16 autocast up to 1024 positions)."""
        eager = self.device == "cpu" and self.autocast == torch.bfloat16 and self.context <= PROBE_CONTEXT
        return "eager" if eager else "sdpa"


@dataclass
class Plan:
    setup: Setup
    parts: dict[str, float]
    peak: float
    available: float | None
    limit: str
    n_params: int
    trainable: int
    notes: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return self.available is None or self.peak <= self.available

    def metrics(self) -> dict[str, float]:
        out = {f"memory_plan/{k.replace(' ', '_')}_gb": v / GIB for k, v in self.parts.items()}
        out["memory_plan/peak_gb"] = self.peak / GIB
        if self.available is not None:
            out["memory_plan/available_gb"] = self.available / GIB
        return out

    def table(self) -> str:
        s = self.setup
        dtype = s.quantization or str(s.weights).removeprefix("torch.")
        amp = str(s.autocast).removeprefix("torch.") if s.autocast else "off"
        lines = [
            f"memory plan ({s.key}: {s.method}, weights {dtype}, autocast {amp}, batch {s.batch_size} x context "
            f"{s.context}, checkpointing {'on' if s.checkpointing else 'off'}, {s.attention} attention, "
            f"{self.trainable:,} of {self.n_params:,} parameters trained):"
        ]
        lines += [f"  {name:<16} {gib(v):>10}" for name, v in self.parts.items() if v]
        avail = f"{gib(self.available)} ({self.limit})" if self.available is not None else "unknown"
        verdict = "fits" if self.fits else "DOES NOT FIT"
        lines.append(f"  {'peak (+15%)':<16} {gib(self.peak):>10}   of {avail}: {verdict}")
        return "\n".join(lines + [f"  note: {n}" for n in self.notes])


def gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB / 100 else f"{n / 2**20:.1f} MiB"


# ---------------------------------------------------------------- the model, counted on the meta device
@dataclass(frozen=True)
class Counts:
    n_params: int
    trainable: int
    linear: int
    """Parameters of the blocks' linear layers (what bitsandbytes quantizes; autocast copies them and the head)."""
    head: int
    layers: int
    hidden: int
    vocab: int


def _meta_model(config: Any) -> Any:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def _linears(model: Any) -> list[tuple[str, int, int]]:
    """(name, fan in, fan out) of every linear layer but the output head (Conv1D: gpt2's transposed linear)."""
    head = model.get_output_embeddings()
    out = []
    for name, m in model.named_modules():
        if m is head or type(m).__name__ not in ("Linear", "Conv1D"):
            continue
        rows, cols = m.weight.shape
        out.append((name, *((cols, rows) if type(m).__name__ == "Linear" else (rows, cols))))
    return out


def _adapter_params(model: Any, setup: Setup, linears: list[tuple[str, int, int]]) -> int:
    """Parameters LoRA/DoRA adds (as peft builds them), and the new token rows it trains."""
    from components.training.lora import targets

    wanted = targets(model.config.model_type, setup.lora.target_modules)
    hit = [
        (i, o)
        for name, i, o in linears
        if wanted == "all-linear" or any(name == t or name.endswith("." + t) for t in wanted)
    ]
    adapters = sum(setup.lora.r * (i + o) + (o if setup.lora.dora else 0) for i, o in hit)
    hidden = model.get_input_embeddings().weight.shape[1]
    tied = getattr(model.config, "tie_word_embeddings", False) or model.get_output_embeddings() is None
    return adapters + setup.new_tokens * hidden * (1 if tied else 2)


_COUNTS: dict[tuple, Counts] = {}


def count(config: Any, setup: Setup) -> Counts:
    """Parameters of the model of `config` (built on the meta device: nothing allocated), and what trains."""
    lora = setup.lora.model_dump_json() if setup.method == "lora" and setup.lora is not None else None
    key = (config.to_json_string(use_diff=False), setup.method, lora, setup.new_tokens)
    if key not in _COUNTS:
        _COUNTS[key] = _count(config, setup)
    return _COUNTS[key]


def _count(config: Any, setup: Setup) -> Counts:
    model = _meta_model(config)
    linears = _linears(model)
    head = model.get_output_embeddings()
    n_params = sum({id(p): p.numel() for p in model.parameters()}.values())
    extra = _adapter_params(model, setup, linears) if setup.method == "lora" else 0
    return Counts(
        n_params=n_params + extra,
        trainable=extra if setup.method == "lora" else n_params,
        linear=sum(i * o for _, i, o in linears),
        head=head.weight.numel() if head is not None else 0,
        layers=int(getattr(config, "num_hidden_layers", 1)),
        hidden=int(getattr(config, "hidden_size", 0)),
        vocab=int(config.vocab_size),
    )


# ---------------------------------------------------------------- activations, measured on a narrow replica
def _narrow(config: Any, layers: int) -> tuple[Any, int]:
    """A copy of `config` with `layers` layers, a tiny vocabulary and widths divided by k (the head size kept)."""
    widths = {k: getattr(config, k, None) for k in WIDTH_KEYS}
    widths = {k: v for k, v in widths.items() if isinstance(v, int) and v > 0}
    heads = widths.get("num_attention_heads", 1)
    k = 1
    for cand in (64, 32, 16, 8, 4, 2):
        if heads % cand == 0 and all(v % cand == 0 for v in widths.values()) and widths["hidden_size"] // cand >= 64:
            k = cand
            break
    small = copy.deepcopy(config)
    for key, value in widths.items():
        setattr(small, key, value // k)
    small.num_hidden_layers = layers
    small.vocab_size = PROBE_VOCAB
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        if hasattr(small, key):
            setattr(small, key, None)
    for key in ("max_position_embeddings", "n_positions"):
        if getattr(small, key, None):
            setattr(small, key, max(getattr(small, key), PROBE_CONTEXT))
    return small, k


def _saved_bytes(model: Any, batch: int, context: int, autocast: torch.dtype | None) -> int:
    """Bytes of the tensors autograd saves (parameters excluded) in one forward + loss."""
    from components.training.loop import token_loss

    seen: dict[int, int] = {}
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen[s.data_ptr()] = max(seen.get(s.data_ptr(), 0), s.nbytes())
        return t

    x = torch.randint(0, PROBE_VOCAB, (batch, context + 1), generator=torch.Generator().manual_seed(0))
    amp = torch.autocast("cpu", dtype=autocast) if autocast else torch.autocast("cpu", enabled=False)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), amp:
        logits = model(input_ids=x[:, :-1], use_cache=False).logits
        token_loss(logits, x[:, 1:])
    return sum(seen.values())


_PROBES: dict[tuple, tuple[float, float]] = {}


def _per_layer(config: Any, setup: Setup, context: int) -> tuple[float, float]:
    """(bytes per layer, bytes outside the layers) that one sequence of `context` tokens saves, at full width."""
    lora = setup.lora.model_dump_json() if setup.lora is not None else None
    key = (config.to_json_string(), setup.method, setup.weights, setup.autocast, setup.attention, lora, context)
    if key not in _PROBES:
        _PROBES[key] = _measure(config, setup, context)
    return _PROBES[key]


def _measure(config: Any, setup: Setup, context: int) -> tuple[float, float]:
    from transformers import AutoModelForCausalLM

    sizes, k = {}, 1
    for layers in (1, 2):
        small, k = _narrow(config, layers)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(small, attn_implementation=setup.attention)
        model = model.to(setup.weights if setup.weights != torch.float16 else torch.bfloat16).train()
        if setup.method == "lora":
            from components.training.lora import add_lora

            model = add_lora(model, setup.lora, 0)
        amp = torch.bfloat16 if setup.autocast is not None else None
        for batch in (1, 2):
            sizes[layers, batch] = _saved_bytes(model, batch, context, amp)
    per_seq = {n: sizes[n, 2] - sizes[n, 1] for n in (1, 2)}
    layer = per_seq[2] - per_seq[1]
    return layer * k, max(0, per_seq[1] - layer) * k


def activations(config: Any, setup: Setup) -> tuple[float, str | None]:
    """Bytes of saved activations for the whole micro-batch (and a note when the generic formula was used)."""
    try:
        layer, other = _activation_probe(config, setup)
    except Exception as e:  # noqa: BLE001 - any architecture the replica cannot mimic: the generic formula
        act = 2 if setup.autocast else 4
        h = int(getattr(config, "hidden_size", 0) or 4096)
        i = int(getattr(config, "intermediate_size", None) or 4 * h)
        layer = setup.context * (14 * h + 4 * i) * act
        other = setup.context * 4 * h * act
        note = f"activations from the generic formula (the layer replica failed: {type(e).__name__})"
    else:
        note = None
    layers = int(getattr(config, "num_hidden_layers", 1))
    hidden_bytes = 2 if setup.weights in (torch.bfloat16, torch.float16) else 4
    kept = layers * setup.context * config.hidden_size * hidden_bytes + layer if setup.checkpointing else layers * layer
    return setup.batch_size * (kept + other), note


def _activation_probe(config: Any, setup: Setup) -> tuple[float, float]:
    if setup.attention == "sdpa":  # saves O(T) per layer: a short probe, scaled
        t = min(setup.context, SDPA_PROBE_CONTEXT)
        layer, other = _per_layer(config, setup, t)
        return layer * setup.context / t, other * setup.context / t
    if setup.context <= PROBE_CONTEXT:
        return _per_layer(config, setup, setup.context)
    t1, t2 = PROBE_CONTEXT // 2, PROBE_CONTEXT
    (l1, _), (l2, o2) = _per_layer(config, setup, t1), _per_layer(config, setup, t2)
    quad = max(0.0, (l2 / t2 - l1 / t1) / (t2 - t1))  # per-token bytes = lin + quad * T
    lin = l1 / t1 - quad * t1
    t = setup.context
    return lin * t + quad * t * t, o2 / t2 * t


# ---------------------------------------------------------------- the plan
def weight_bytes(c: Counts, setup: Setup) -> float:
    size = torch.finfo(setup.weights).bits // 8
    if setup.quantization:
        frozen = c.n_params - (c.trainable if setup.method == "lora" else 0)
        return c.linear * QUANT_BYTES[setup.quantization] + (frozen - c.linear) * 2 + c.trainable * 4
    adapters = c.trainable * 4 if setup.method == "lora" else 0  # peft keeps adapters in fp32
    return (c.n_params - (c.trainable if setup.method == "lora" else 0)) * size + adapters


def estimate(config: Any, setup: Setup, available: float | None = None, limit: str = "") -> Plan:
    """The plan for `setup` on the model of `config` (its vocab_size: the tokenizer's, if larger)."""
    c = count(config, setup)
    tbytes = 4 if setup.method == "lora" or setup.quantization else torch.finfo(setup.weights).bits // 8
    weights = weight_bytes(c, setup)
    grads = c.trainable * tbytes
    optimizer = 2 * c.trainable * tbytes
    acts, note = activations(config, setup)
    amp = 2 if setup.autocast is not None else 4
    loss = setup.batch_size * setup.context * c.vocab * (amp + 12)
    copies = (c.linear + c.head) * 2 if setup.autocast is not None and setup.weights == torch.float32 else 0
    snapshot = (c.trainable * tbytes + optimizer) if setup.snapshots and setup.device == "cpu" else 0
    parts = {
        "weights": weights,
        "gradients": grads,
        "optimizer": optimizer,
        "activations": acts,
        "logits": loss,
        "autocast copies": copies,
        "checkpoint copy": snapshot,
    }
    peak = (weights + optimizer + max(acts + loss + copies, grads, snapshot)) * (1 + SLACK)
    return Plan(setup, parts, peak, available, limit, c.n_params, c.trainable, [note] if note else [])


def device_memory(setup: Setup, limit_gb: float | None) -> tuple[float | None, str]:
    """(bytes the run may use, where that number comes from)."""
    if limit_gb is not None:
        return limit_gb * GIB, f"{setup.key}.memory_gb"
    if setup.device == "cuda" and torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info()
        return float(free), f"free on {torch.cuda.get_device_name()}"
    import psutil

    return float(psutil.virtual_memory().available), "available RAM"


# ---------------------------------------------------------------- what would fit
def alternatives(setup: Setup) -> list[tuple[str, Setup]]:
    """Settings that lower the peak, one kind at a time, then all of them together."""
    from components.core.config import LoraConfig

    k, out = setup.key, []
    if not setup.checkpointing:
        out.append((f"{k}.gradient_checkpointing=true", replace(setup, checkpointing=True)))
    b, acc = setup.batch_size, setup.grad_accum
    while b > 1:
        b, acc = b // 2, acc * 2
        out.append((f"{k}.batch_size={b} {k}.grad_accum={acc}", replace(setup, batch_size=b, grad_accum=acc)))
    lora = setup if setup.method == "lora" else None
    if k == "sft" and setup.method == "full":
        frozen = torch.bfloat16 if setup.autocast == torch.bfloat16 else setup.weights  # model.dtype auto
        lora = replace(setup, method="lora", lora=setup.lora or LoraConfig(), weights=frozen)
        out.append(("sft.method=lora", lora))
    if lora is not None and lora.quantization is None and setup.device == "cuda":
        name = "sft.method=lora sft.quantization=4bit" if setup.method == "full" else "sft.quantization=4bit"
        out.append((name, replace(lora, quantization="4bit")))
    elif setup.method == "full" and setup.weights == torch.float32 and setup.device == "cuda":
        out.append(("model.dtype=bf16", replace(setup, weights=torch.bfloat16)))
    if len(out) < 2:
        return out
    last = {name.split("=")[0]: (name, alt) for name, alt in out}  # the strongest of each kind
    names = " ".join(dict.fromkeys(" ".join(n for n, _ in last.values()).split()))
    best = out[-1][1] if out[-1][1].method == "lora" else setup
    best = replace(best, checkpointing=True, batch_size=1, grad_accum=setup.batch_size * setup.grad_accum)
    return [*out, (names, best)]


def announce(text: str, progress: bool) -> None:
    """Log a block of text on the main process (and show it on stderr when the stage shows progress)."""
    from components.training import distributed as dd

    if dd.is_main():
        log.info(text)
        if progress:
            print(text, file=sys.stderr, flush=True)


def check(config: Any, setup: Setup, limit_gb: float | None, progress: bool = False) -> Plan | None:
    """Estimate, print the plan, and stop a run that cannot fit (StageError with the settings that would).
    None when no estimate can be made for this model (said in the log; the run goes on)."""
    available, limit = device_memory(setup, limit_gb)
    try:
        plan = estimate(config, setup, available, limit)
    except Exception as e:  # noqa: BLE001 - an architecture the meta-device count cannot build: no plan, no veto
        announce(f"memory plan: not available for this model ({type(e).__name__}: {e})", progress)
        return None
    announce(plan.table(), progress)
    if plan.fits:
        return plan
    fitting = []
    for name, alt in alternatives(setup):
        other = estimate(config, alt, available, limit)
        if other.fits:
            fitting.append(f"{name} ({gib(other.peak)})")
    hint = "; ".join(fitting[:4]) if fitting else "none of LoRA, 4-bit, a smaller batch or checkpointing is enough"
    raise StageError(
        f"{setup.key}: this run needs about {gib(plan.peak)} at its peak (weights {gib(plan.parts['weights'])}, "
        f"gradients {gib(plan.parts['gradients'])}, optimizer {gib(plan.parts['optimizer'])}, activations "
        f"{gib(plan.parts['activations'] + plan.parts['logits'])}) but {gib(available)} is {limit}; "
        f"settings that fit: {hint}"
    )

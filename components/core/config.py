"""params.yaml, parsed once and validated: the single source of every setting.

Every section is a pydantic model that forbids unknown keys. `load_params` collects every
problem in the file and raises one `ConfigError` that names each key (with a "did you mean"
for misspellings) and says what to change. The mechanics of reading the file, and each stage's
view of the settings (`stage_config`, `config_hash`, ...), live in components/core/params.py.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, create_model, model_validator

from components.core.data_config import IndexConfig, IngestConfig, PreprocessConfig
from components.core.params import read_yaml, validate
from components.core.section import Section
from components.core.stages import BY_NAME, STAGES, TABLE

# A field named "register" shadows BaseModel.register (an ABC helper we never use).
warnings.filterwarnings("ignore", message='Field name "register"', category=UserWarning)


# ---------------------------------------------------------------- model
class ModelConfig(Section):
    """The model: built from config (arch and shape keys), or an existing checkpoint (`init_from`)."""

    arch: Literal["gpt2", "llama"] | None = "gpt2"
    """Architecture built from config when pretraining from scratch. With init_from: null, or the checkpoint's
    model_type (any other value is an error naming it; so are n_layer, n_embd, n_head, n_kv_head)."""
    n_layer: int | None = Field(default=4, ge=1, le=256)
    n_embd: int | None = Field(default=256, ge=8)
    n_head: int | None = Field(default=4, ge=1)
    n_kv_head: int | None = Field(default=None, ge=1)
    """llama only: key/value heads (grouped-query attention); default = n_head."""
    context_length: int = Field(default=128, ge=8, le=131_072)
    """Tokens per training sequence (and the model's position limit when built from scratch)."""
    dropout: float = Field(default=0.0, ge=0, lt=1)
    """Dropout of a model built from config (with init_from it must be 0: the checkpoint keeps its own)."""
    init_from: str | None = None
    """Start from an existing causal LM instead of from scratch: a local checkpoint folder (HF format,
    safetensors) or `hf:ORG/NAME[@REVISION]` from the Hugging Face Hub (downloaded into the HF cache when
    HF_HUB_OFFLINE=0; offline it must be cached). Any architecture AutoModelForCausalLM loads; its tokenizer and
    chat template are used unchanged (README: "Start from an open model")."""
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """dtype the weights load in (pretrain and sft). auto: weights that train in fp32 (master weights; `precision`
    autocasts the math to bf16 where the device runs it natively), weights that stay frozen (a LoRA base) in the
    dtype the math runs in (bf16 with precision auto on CUDA or an AVX512-BF16/AMX CPU, else fp32). bf16/fp16:
    that dtype for every weight, trained ones too (half the weight, gradient and optimizer memory; fp16 needs
    CUDA)."""

    @model_validator(mode="after")
    def _shapes(self) -> ModelConfig:
        if self.init_from is None:
            unset = [k for k in ("arch", "n_layer", "n_embd", "n_head") if getattr(self, k) is None]
            if unset:
                raise ValueError(f"{', '.join(unset)}: null needs init_from (a checkpoint that defines them)")
        if self.n_embd is not None and self.n_head is not None and self.n_embd % self.n_head:
            raise ValueError(f"n_head ({self.n_head}) must divide n_embd ({self.n_embd})")
        if self.n_kv_head is not None and self.init_from is None:
            if self.arch != "llama":
                raise ValueError("n_kv_head is only used by arch: llama")
            if self.n_head % self.n_kv_head:
                raise ValueError(f"n_kv_head ({self.n_kv_head}) must divide n_head ({self.n_head})")
        return self


# ---------------------------------------------------------------- training
class TrainConfig(Section):
    """Settings shared by pretrain and sft."""

    max_steps: int = Field(default=600, ge=1)
    """Optimizer steps."""
    batch_size: int = Field(default=16, ge=1)
    """Sequences per micro-batch (per device)."""
    grad_accum: int = Field(default=1, ge=1)
    """Micro-batches per optimizer step."""
    lr: float = Field(default=1e-3, gt=0, le=1)
    min_lr_ratio: float = Field(default=0.1, ge=0, le=1)
    """Cosine schedule floor, as a fraction of lr."""
    warmup_steps: int = Field(default=30, ge=0)
    weight_decay: float = Field(default=0.1, ge=0)
    beta1: float = Field(default=0.9, gt=0, lt=1)
    beta2: float = Field(default=0.95, gt=0, lt=1)
    grad_clip: float = Field(default=1.0, ge=0)
    """Max global grad norm (0 disables clipping)."""
    eval_every: int = Field(default=100, ge=1)
    """Steps between validation-loss evaluations."""
    eval_batches: int = Field(default=8, ge=1)
    checkpoint_every: int = Field(default=200, ge=1)
    """Steps between resumable checkpoints."""
    log_every: int = Field(default=10, ge=1)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """auto: bf16 autocast where the hardware supports it, else fp32."""
    compile: bool = False
    """torch.compile the model (first step slower, then faster)."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward to save memory on long contexts."""
    devices: int = Field(default=1, ge=1)
    """Data-parallel processes (torch.distributed: gloo on CPU, NCCL on CUDA)."""
    strategy: Literal["ddp", "fsdp"] = "ddp"
    """How to spread training over `devices`."""
    memory_gb: float | None = Field(default=None, gt=0)
    """Memory this run may use, in GiB (null: the device's: free GPU memory, or available RAM on CPU). The memory
    plan printed before training stops a run whose estimate exceeds it, naming settings that would fit."""

    @model_validator(mode="after")
    def _schedule(self) -> TrainConfig:
        if self.warmup_steps >= self.max_steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must be below max_steps ({self.max_steps})")
        return self


class PretrainConfig(TrainConfig):
    enabled: bool = True
    """false: skip pretraining; sft then starts from a freshly initialized model (the ULMFiT control), or, with
    model.init_from, straight from the base checkpoint (the control of continued pretraining)."""


class LoraConfig(Section):
    r: int = Field(default=16, ge=1)
    alpha: int = Field(default=32, ge=1)
    dropout: float = Field(default=0.0, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] | None = None
    """Module names to adapt, or all-linear (every linear layer but the output head). null: per architecture:
    gpt2 c_attn, c_proj, c_fc; llama q/k/v/o and MLP; any other model type peft's default for it (qwen2:
    q_proj, v_proj; gpt_neox: query_key_value; ...)."""
    dora: bool = False
    """Weight-decomposed LoRA (DoRA): adapters learn a magnitude and a direction; slower, often closer to full."""


class SftConfig(TrainConfig):
    method: Literal["full", "lora"] = "full"
    """full fine-tuning, or LoRA adapters through peft."""
    lora: LoraConfig = Field(default_factory=LoraConfig)
    quantization: Literal["4bit", "8bit"] | None = None
    """QLoRA: load the frozen base in 4 bits (NF4, double quantization) or 8 bits through bitsandbytes, then train
    LoRA adapters on it (peft's prepare_model_for_kbit_training). Needs a CUDA GPU and method: lora."""
    max_steps: int = Field(default=300, ge=1)
    lr: float = Field(default=5e-4, gt=0, le=1)
    warmup_steps: int = Field(default=10, ge=0)
    weight_decay: float = Field(default=0.0, ge=0)
    eval_every: int = Field(default=50, ge=1)
    checkpoint_every: int = Field(default=100, ge=1)
    packing: bool = False
    """Pack several examples into each row of the context (position ids restart per example, attention stays
    within each example): fewer pad tokens computed, more examples per second (bench/data_bench.py)."""

    @model_validator(mode="after")
    def _quantized(self) -> SftConfig:
        if self.quantization and self.method != "lora":
            raise ValueError(
                f"quantization: {self.quantization} freezes the base in {self.quantization}: only LoRA adapters can "
                "train on it; set method: lora (QLoRA) or quantization: null"
            )
        return self


# ---------------------------------------------------------------- evaluate / register
class EvaluateConfig(Section):
    max_new_tokens: int = Field(default=32, ge=1)
    batch_size: int = Field(default=32, ge=1)
    max_examples: int | None = Field(default=None, ge=1)
    """Cap on held-out instruction examples (None: all)."""
    num_samples: int = Field(default=20, ge=0)
    """Rows in the sample-generations table."""
    ppl_batches: int = Field(default=20, ge=1)
    """Validation batches for held-out perplexity."""
    bootstrap: int = Field(default=1000, ge=0)
    """Bootstrap resamples for confidence intervals (0 disables)."""
    confidence: float = Field(default=0.95, gt=0.5, lt=1)
    champion: bool = True
    """Also evaluate the registry's current champion (`models:/<register.model_name>@champion`), if any."""
    models: dict[str, str] = Field(default_factory=dict)
    """Other models for the same table: name -> local HF folder or MLflow URI (`models:/seedlm/3`)."""
    retrieval_max_new_tokens: int = Field(default=16, ge=1)
    """Generation length for the knowledge-cutoff questions (short answers): the rest of the context holds
    retrieved passages."""
    sets: dict[str, str] = Field(default_factory=dict)
    """Your own evaluation sets: name -> JSONL file (Alpaca, chat or ShareGPT rows; the last message is the
    reference). Scored like the held-out split; metrics `<name>/exact_match` etc. (the gate can use them); the
    report counts items duplicated in the SFT training data. Edited in place? `dvc repro -f evaluate`."""

    @model_validator(mode="after")
    def _set_names(self) -> EvaluateConfig:
        for name in self.sets:
            if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
                raise ValueError(f"evaluate.sets: bad name {name!r}: use letters, digits, _ . - (no /)")
        return self

    @model_validator(mode="after")
    def _model_names(self) -> EvaluateConfig:
        for name in self.models:
            if not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or name in RESERVED_EVAL_NAMES:
                raise ValueError(
                    f"evaluate.models: bad name {name!r}: use letters, digits, _ . - and none of "
                    f"{sorted(RESERVED_EVAL_NAMES)}"
                )
        return self


RESERVED_EVAL_NAMES = {"pretrain", "sft", "champion", "n_examples", "val_tokens", "compare", "sources", "control"}
RESERVED_EVAL_NAMES |= {"retrieval"}
RESERVED_EVAL_NAMES |= {"sets"}
"""Keys of metrics/evaluate.json that evaluate.models names may not take."""


class GateConfig(Section):
    metric: str = "exact_match"
    """The metric that decides champion vs challenger (higher is better); always checked for regression."""
    min: dict[str, float] = Field(default_factory=lambda: {"exact_match": 0.05})
    """Per-metric minimums the challenger must reach."""
    max_regression: dict[str, float] = Field(default_factory=lambda: {"exact_match": 0.0})
    """Per-metric largest allowed drop against the current champion. A drop counts only when it is
    significant: the bootstrap CI of (challenger - champion) lies below 0."""


class RegisterConfig(Section):
    model_name: str = Field(default="seedlm", pattern=r"^[A-Za-z0-9_.-]+$")
    """Registered model name in the MLflow registry."""
    gate: GateConfig = Field(default_factory=GateConfig)
    lora_format: Literal["merged", "adapter"] = "merged"
    """For LoRA runs: register the merged model or the adapter only (base referenced by hash)."""
    max_new_tokens: int = Field(default=32, ge=1)
    """Default generation length of the registered pyfunc model."""


class _OtherPaths(Section):
    """Where each stage writes, relative to the repo root (dvc.yaml reads these too). The stages' own output
    folders (raw, processed, pretrain, ...) come from the stage table, components/core/stages.py."""

    sources: str = "data/sources"
    """Put your own corpus and instruction files here: the ingest stage depends on this folder."""
    metrics: str = "metrics"
    """DVC metrics: <metrics>/<stage>.json."""
    plots: str = "plots"
    """DVC plots data: <plots>/<stage>_*.csv / .json."""
    checkpoints: str = ".seedlm/checkpoints"
    """Resumable training state (not a DVC output: it must survive a stage rerun)."""


Paths = create_model(
    "Paths",
    __base__=_OtherPaths,
    __doc__=_OtherPaths.__doc__,
    **{s.out: (str, Field(default=s.default_path, description=f"Output folder of the {s.name} stage.")) for s in TABLE},
)


# ---------------------------------------------------------------- orchestration (not a stage dependency)


class ScheduleConfig(Section):
    """One scheduled deployment of the pipeline (`python -m flows.deploy` creates `seedlm/<name>`)."""

    cron: str = Field(default="0 3 * * *", pattern=r"^\S+( \S+){4}$")
    """Cron expression (5 fields) for this deployment's runs."""
    timezone: str = "UTC"
    overrides: dict[str, Any] = Field(default_factory=dict)
    """params.yaml settings to change for this deployment's runs, dotted keys like `dvc exp run -S`
    (e.g. {"pretrain.max_steps": 2000}); applied to params.yaml in the run's workspace."""


class OrchestrationConfig(Section):
    """How scheduled runs are spread over Prefect work pools (see README, "Operating it")."""

    mode: Literal["local", "deployments"] = "local"
    """local: every stage runs inside the pipeline's flow run. deployments: each stage runs as a flow run of
    its own deployment (`seedlm-stage/<stage>`) on the pool in `pools`, sharing data through the DVC remote."""
    pools: dict[str, str] = Field(default_factory=lambda: {s.name: s.pool for s in TABLE})
    """Work pool of each stage's deployment."""
    pipeline_pool: str = "cpu"
    """Work pool of the pipeline deployments (they only orchestrate: a CPU worker is enough)."""
    schedules: dict[str, ScheduleConfig] = Field(default_factory=lambda: {"nightly": ScheduleConfig()})
    """Pipeline deployments by name, each with its cron schedule and parameter overrides."""
    dvc_remote: str = ""
    """DVC remote that carries stage data between workers ('' = the repo's default remote, if any)."""
    pull_outputs: bool = True
    """deployments mode: check every stage's outputs out into the pipeline's workspace too (false: only dvc.lock)."""
    timeouts: dict[str, int] = Field(default_factory=lambda: {s.name: s.timeout_s for s in TABLE})
    """Seconds a stage's flow run may take before it is cancelled and the pipeline fails."""
    retries: int = Field(default=2, ge=0, le=20)
    """Resubmissions of a stage whose flow run crashed (worker or machine lost); training resumes from
    its last checkpoint and continues the same MLflow run."""
    retry_delay_s: int = Field(default=30, ge=0)
    heartbeat_s: int = Field(default=60, ge=30)
    """Flow-run heartbeat interval on workers (PREFECT_FLOWS_HEARTBEAT_FREQUENCY) for zombie detection."""
    poll_s: float = Field(default=5.0, gt=0)
    """How often the pipeline polls a stage's flow run."""

    @model_validator(mode="after")
    def _stages(self) -> OrchestrationConfig:
        for name, table in (("pools", self.pools), ("timeouts", self.timeouts)):
            if set(table) != set(STAGES):
                raise ValueError(
                    f"{name} must name every stage exactly once: missing "
                    f"{sorted(set(STAGES) - set(table))}, unknown {sorted(set(table) - set(STAGES))}"
                )
        if any(v < 1 for v in self.timeouts.values()):
            raise ValueError("timeouts must be positive seconds")
        for name in self.schedules:
            if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
                raise ValueError(f"schedules: bad deployment name {name!r}: use letters, digits, _ . -")
        return self


class Params(Section):
    seed: int = Field(default=1337, ge=0)
    paths: Paths = Field(default_factory=Paths)
    ingest: IngestConfig = Field(default_factory=IngestConfig)
    preprocess: PreprocessConfig = Field(default_factory=PreprocessConfig)
    index: IndexConfig = Field(default_factory=IndexConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig)
    sft: SftConfig = Field(default_factory=SftConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    register: RegisterConfig = Field(default_factory=RegisterConfig)
    orchestration: OrchestrationConfig = Field(default_factory=OrchestrationConfig)

    @model_validator(mode="after")
    def _consistent(self) -> Params:
        known = GATE_METRICS | {f"{s}/{m}" for s in self.evaluate.sets for m in GATE_METRICS}
        if self.register.gate.metric not in known:
            raise ValueError(
                f"register.gate.metric must be one of {sorted(GATE_METRICS)} or <evaluate.sets name>/<one of them>"
            )
        for key in (*self.register.gate.min, *self.register.gate.max_regression):
            if key not in known:
                raise ValueError(
                    f"register.gate: unknown metric {key!r}; use one of {sorted(GATE_METRICS)} or "
                    "<evaluate.sets name>/<one of them>"
                )
        if self.model.init_from is None and self.preprocess.vocab_size < BPE_MIN_VOCAB:
            raise ValueError(
                f"preprocess.vocab_size ({self.preprocess.vocab_size}) is below {BPE_MIN_VOCAB}: a "
                f"byte-level BPE needs 256 byte tokens + 6 special tokens; raise it"
            )
        if self.sft.method == "lora" and not self.pretrain.enabled and self.model.init_from is None:
            raise ValueError(
                "sft.method: lora on a freshly initialized model trains adapters on noise; "
                "enable pretrain, set model.init_from, or use sft.method: full"
            )
        return self


GATE_METRICS = {"exact_match", "rougeL", "bleu", "chrf", "accuracy"}
BPE_MIN_VOCAB = 262
"""256 byte tokens + the 6 chat special tokens (components/data/chat.py)."""


# ---------------------------------------------------------------- loading (mechanics: components/core/params.py)
def parse_params(data: Any, source: str = "params.yaml") -> Params:
    return validate(Params, data, source)


def load_params(path: str | Path = "params.yaml", overrides: dict[str, Any] | None = None) -> Params:
    """Read and validate params.yaml; `overrides` maps dotted keys to values (like `dvc exp run -S`)."""
    path = Path(path)
    return parse_params(read_yaml(path, overrides), str(path))


# ---------------------------------------------------------------- each stage's view of the settings
def stage_output(params: Params, stage: str) -> Path:
    """The folder a stage writes (its DVC out)."""
    return Path(getattr(params.paths, BY_NAME[stage].out))


def section(params: Params, dotted: str) -> Any:
    node: Any = params
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def stage_config(params: Params, stage: str) -> dict[str, Any]:
    """The resolved settings a stage depends on, as plain data (saved beside its outputs)."""
    out = {}
    for key in BY_NAME[stage].params:
        value = section(params, key)
        out[key] = value.model_dump(mode="json") if isinstance(value, BaseModel) else value
    return out

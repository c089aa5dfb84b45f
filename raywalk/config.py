"""Typed, frozen, validated configuration (its keys are an interface: users, sweeps and tests address them).

A config is built from YAML, `--set section.key=value` overrides and sweep grid
points; every value is checked on construction and any error names the dotted
field, the value and the rule, before any work starts.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping, get_type_hints

import yaml


class ConfigError(ValueError):
    """An invalid configuration value; the message names the field and the rule."""


def _fail(name: str, value: Any, rule: str) -> None:
    raise ConfigError(f"{name}: {value!r} is invalid: {rule}")


def _check(cond: bool, name: str, value: Any, rule: str) -> None:
    if not cond:
        _fail(name, value, rule)


@dataclass(frozen=True)
class GraphConfig:
    n: int = 500
    """Number of vertices (= vocabulary size); a multiple of K, 8..100000."""
    K: int = 4
    """Number of equal-size blocks, 2..64: vertex v is in block v // (n / K), so the block of a token is
    read off its id."""
    p_in: float = 0.25
    """Base edge probability inside a block, in [0, 1]."""
    p_out: float = 0.03
    """Base edge probability across blocks, in [0, 1]."""
    n_jumpers_per_block: int = 2
    """Jumper vertices per block, 1..block_size."""
    r_scales: tuple[float, ...] = (0.5, 0.7, 0.9, 1.0, 1.1, 1.3, 1.5, 2.0)
    """Jump lengths as multiples of w (r = max(1, round(s*w))); positive, at least one."""

    def validate(self, p: str = "graph") -> None:
        _check(8 <= self.n <= 100_000, f"{p}.n", self.n, "must be in [8, 100000]")
        _check(2 <= self.K <= 64, f"{p}.K", self.K, "must be in [2, 64]")
        _check(self.n % self.K == 0, f"{p}.n", self.n, f"must be divisible by {p}.K={self.K}")
        for k in ("p_in", "p_out"):
            v = getattr(self, k)
            _check(0.0 <= v <= 1.0, f"{p}.{k}", v, "a probability must be in [0, 1]")
        bs = self.n // self.K
        _check(1 <= self.n_jumpers_per_block <= bs, f"{p}.n_jumpers_per_block",
               self.n_jumpers_per_block, f"must be in [1, block size {bs}]")
        _check(len(self.r_scales) >= 1, f"{p}.r_scales", list(self.r_scales), "needs at least one value")
        for s in self.r_scales:
            _check(s > 0, f"{p}.r_scales", list(self.r_scales), "every scale must be > 0")


@dataclass(frozen=True)
class CorpusConfig:
    walk_length: int = 256
    """Tokens per walk L; at least 2*w and at most 100000."""
    corpus_size: int = 200_000
    """Training walks; at least 100*n. The eval split has corpus_size // 9 walks."""
    shard_size: int = 8192
    """Walks per Parquet shard (and per generation task), 64..1000000; fixes the corpus whatever the parallelism."""

    def validate(self, p: str = "corpus") -> None:
        _check(2 <= self.walk_length <= 100_000, f"{p}.walk_length", self.walk_length, "must be in [2, 100000]")
        _check(1 <= self.corpus_size <= 100_000_000, f"{p}.corpus_size", self.corpus_size,
               "must be in [1, 100000000]")
        _check(64 <= self.shard_size <= 1_000_000, f"{p}.shard_size", self.shard_size, "must be in [64, 1000000]")


@dataclass(frozen=True)
class ModelConfig:
    d_model: int = 128
    """Residual stream width, 8..4096, divisible by n_heads."""
    n_layers: int = 4
    """Transformer blocks, 1..48."""
    n_heads: int = 1
    """Attention heads: 1, 2 or 4."""
    dropout: float = 0.0
    """Dropout probability in [0, 1)."""

    def validate(self, p: str = "model") -> None:
        _check(self.n_heads in (1, 2, 4), f"{p}.n_heads", self.n_heads, "must be 1, 2 or 4")
        _check(8 <= self.d_model <= 4096, f"{p}.d_model", self.d_model, "must be in [8, 4096]")
        _check(self.d_model % self.n_heads == 0, f"{p}.d_model", self.d_model,
               f"must be divisible by {p}.n_heads={self.n_heads}")
        _check(1 <= self.n_layers <= 48, f"{p}.n_layers", self.n_layers, "must be in [1, 48]")
        _check(0.0 <= self.dropout < 1.0, f"{p}.dropout", self.dropout, "must be in [0, 1)")


DATA_PATHS = ("auto", "resident", "stream")
TRACKERS = ("tensorboard", "mlflow")   # run.trackers' names; service/trackers.py says how each is installed
OPERATIONAL_TRAIN_KEYS = ("data", "data_budget", "compile")   # not part of the experiment id
# Keys raywalk once had and no longer reads: a user's config naming one is refused like any unknown key, but a
# config an older run recorded (result.json) still loads without them. All operational: no experiment id changes.
RETIRED_KEYS = {"run": ("preemption_check_steps",)}


@dataclass(frozen=True)
class TrainConfig:
    batch_size: int = 64
    """Global batch in sequences, split evenly across workers; 1..65536."""
    lr: float = 3.0e-4
    """Peak learning rate of AdamW, in (0, 1]."""
    weight_decay: float = 0.01
    """AdamW decoupled weight decay, in [0, 1]."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this; > 0."""
    warmup_frac: float = 0.1
    """Share of all steps spent in linear warmup, in [0, 1)."""
    min_lr_ratio: float = 0.1
    """Cosine floor as a fraction of the peak LR, in [0, 1]."""
    max_epochs: int = 50
    """Epochs at most (the gate may stop earlier), 1..50."""
    precision: str = "fp32"
    """Training matmuls: "fp32", or "bf16" (autocast, fp32 master weights; opt-in, ~1.5x on CPUs with bf16)."""
    data: str = "auto"
    """Epoch data path: "resident" (all windows in one tensor on the worker's device), "stream" (Ray Data), or "auto"."""
    data_budget: float = 0.5
    """auto keeps the windows resident when they take at most this share of the device's free memory, in (0, 1]."""
    compile: bool = False
    """torch.compile the training step (CUDA graphs on a GPU); first steps pay the compile time."""

    def validate(self, p: str = "train") -> None:
        _check(1 <= self.batch_size <= 65536, f"{p}.batch_size", self.batch_size, "must be in [1, 65536]")
        _check(0.0 < self.lr <= 1.0, f"{p}.lr", self.lr, "must be in (0, 1]")
        _check(0.0 <= self.weight_decay <= 1.0, f"{p}.weight_decay", self.weight_decay, "must be in [0, 1]")
        _check(self.grad_clip > 0, f"{p}.grad_clip", self.grad_clip, "must be > 0")
        _check(0.0 <= self.warmup_frac < 1.0, f"{p}.warmup_frac", self.warmup_frac, "must be in [0, 1)")
        _check(0.0 <= self.min_lr_ratio <= 1.0, f"{p}.min_lr_ratio", self.min_lr_ratio, "must be in [0, 1]")
        _check(1 <= self.max_epochs <= 50, f"{p}.max_epochs", self.max_epochs,
               "must be in [1, 50] (the study's training budget)")
        _check(self.precision in ("fp32", "bf16"), f"{p}.precision", self.precision, 'must be "fp32" or "bf16"')
        _check(self.data in DATA_PATHS, f"{p}.data", self.data, 'must be "auto", "resident" or "stream"')
        _check(0.0 < self.data_budget <= 1.0, f"{p}.data_budget", self.data_budget, "must be in (0, 1]")


@dataclass(frozen=True)
class GateConfig:
    sequences: int = 1000
    """Greedy sequences generated per evaluation, 1..100000."""
    edge: float = 0.95
    """Edge compliance (the share of generated steps that follow an edge of the graph) must be
    strictly above this, in [0, 1]."""
    rule: float = 0.80
    """Rule compliance (the share of rule checks met: in block B, r steps after visiting the jumper)
    must be strictly above this, in [0, 1]."""

    def validate(self, p: str = "gate") -> None:
        _check(1 <= self.sequences <= 100_000, f"{p}.sequences", self.sequences, "must be in [1, 100000]")
        for k in ("edge", "rule"):
            v = getattr(self, k)
            _check(0.0 <= v <= 1.0, f"{p}.{k}", v, "a threshold must be in [0, 1]")


@dataclass(frozen=True)
class RunConfig:
    workers: int = 1
    """Training workers (DDP ranks), 1..64; must divide train.batch_size."""
    storage: str = "results"
    """Storage root: a local path or a URI (s3://bucket/prefix) shared by the cluster."""
    max_failures: int = 3
    """Worker-group restarts allowed after failures (a crash, a node lost without notice), 0..1000."""
    max_preemptions: int = -1
    """Restarts allowed after spot preemptions (a node drained with notice), counted apart; -1: unlimited."""
    preemption_check_seconds: float = 5.0
    """Seconds between polls for a spot reclaim notice (each poll is a ~14 ms barrier), in [0, 3600]; 0 never polls."""
    cpus_per_worker: float = 1.0
    """CPUs reserved per training worker, in (0, 64]."""
    gpus_per_worker: float = 0.0
    """GPUs per training worker: 0 (CPU), a whole number up to 8, or a fraction below 1 with one worker."""
    deterministic: bool = True
    """Deterministic GPU kernels, so a resumed run on the same GPU model repeats an uninterrupted one."""
    accelerator_type: str = ""
    """GPU model every worker must have (Ray's accelerator type, e.g. "A10G"); "" takes any GPU."""
    trackers: tuple[str, ...] = ()
    """Where rank 0 also streams result.json's curves while training: any of tensorboard, mlflow."""

    def validate(self, p: str = "run") -> None:
        _check(1 <= self.workers <= 64, f"{p}.workers", self.workers, "must be in [1, 64]")
        _check(isinstance(self.storage, str) and self.storage.strip() != "", f"{p}.storage", self.storage,
               "must be a non-empty path or URI")
        _check(0 <= self.max_failures <= 1000, f"{p}.max_failures", self.max_failures, "must be in [0, 1000]")
        _check(-1 <= self.max_preemptions <= 1000, f"{p}.max_preemptions", self.max_preemptions,
               "must be in [-1, 1000] (-1: unlimited)")
        _check(0.0 <= self.preemption_check_seconds <= 3600, f"{p}.preemption_check_seconds",
               self.preemption_check_seconds, "must be in [0, 3600] (0: never)")
        _check(0 < self.cpus_per_worker <= 64, f"{p}.cpus_per_worker", self.cpus_per_worker, "must be in (0, 64]")
        g = self.gpus_per_worker
        _check(0 <= g <= 8, f"{p}.gpus_per_worker", g, "must be in [0, 8]")
        _check(g < 1 or g == int(g), f"{p}.gpus_per_worker", g, "above 1 must be a whole number of GPUs")
        _check(not (0 < g < 1 and self.workers > 1), f"{p}.gpus_per_worker", g,
               f"a fraction of a GPU with {p}.workers={self.workers} could put two ranks on one GPU, which NCCL "
               f"refuses: use 1 GPU per worker, or one worker")
        for t in self.trackers:
            _check(t in TRACKERS, f"{p}.trackers", list(self.trackers), f"each must be one of {', '.join(TRACKERS)}")
        _check(len(set(self.trackers)) == len(self.trackers), f"{p}.trackers", list(self.trackers),
               "names a tracker twice")
        _check(self.accelerator_type == "" or g > 0, f"{p}.accelerator_type", self.accelerator_type,
               f"needs {p}.gpus_per_worker > 0")


@dataclass(frozen=True)
class Config:
    seed: int = 42
    """Seed for graph, corpus, initialisation and shuffles; 0..2**31-1."""
    w: int = 64
    """Context window in tokens; jump lengths scale with it; 2..4096."""
    graph: GraphConfig = field(default_factory=GraphConfig)
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    gate: GateConfig = field(default_factory=GateConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self) -> None:
        _check(0 <= self.seed < 2**31, "seed", self.seed, "must be in [0, 2**31-1]")
        _check(2 <= self.w <= 4096, "w", self.w, "must be in [2, 4096]")
        for f in ("graph", "corpus", "model", "train", "gate", "run"):
            getattr(self, f).validate(f)
        L = self.corpus.walk_length
        _check(L >= 2 * self.w, "corpus.walk_length", L, f"must be >= 2*w = {2 * self.w}")
        _check(self.corpus.corpus_size >= 100 * self.graph.n, "corpus.corpus_size", self.corpus.corpus_size,
               f"must be >= 100*graph.n = {100 * self.graph.n}")
        _check(self.train.batch_size % self.run.workers == 0, "train.batch_size", self.train.batch_size,
               f"must be divisible by run.workers={self.run.workers}")
        _check(self.gate.sequences >= 1, "gate.sequences", self.gate.sequences, "must be >= 1")

    # ---- construction -------------------------------------------------

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Config":
        return _build(cls, d, "")

    @classmethod
    def from_recorded(cls, d: Mapping[str, Any]) -> "Config":
        """A config as a run recorded it, perhaps by an older raywalk (RETIRED_KEYS dropped)."""
        if isinstance(d, Mapping):
            d = {k: {kk: vv for kk, vv in v.items() if kk not in RETIRED_KEYS.get(k, ())}
                 if isinstance(v, Mapping) else v for k, v in d.items()}
        return cls.from_dict(d)

    @classmethod
    def load(cls, path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> "Config":
        data = read_yaml(path, "config file")
        if not isinstance(data, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping of sections")
        return cls.from_dict(apply_overrides(data, overrides))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["graph"]["r_scales"] = list(self.graph.r_scales)
        d["run"]["trackers"] = list(self.run.trackers)
        return d

    def replace(self, **dotted: Any) -> "Config":
        d = self.to_dict()
        for k, v in dotted.items():
            set_dotted(d, k, v)
        return Config.from_dict(d)

    # ---- identity -------------------------------------------------------

    def corpus_key(self) -> dict[str, Any]:
        """What the corpus depends on: same key => same corpus, reused."""
        d = self.to_dict()
        return {"seed": d["seed"], "w": d["w"], "graph": d["graph"], "corpus": d["corpus"]}

    def corpus_id(self) -> str:
        g, c = self.graph, self.corpus
        return f"n{g.n}_K{g.K}_w{self.w}_L{c.walk_length}_N{c.corpus_size}_s{self.seed}-{_digest(self.corpus_key())}"

    def experiment_id(self) -> str:
        """Readable prefix + hash of everything that changes the trained model.

        Every run key but workers (storage, failure budgets, resources, determinism, accelerator
        type, notice polls, trackers), and train.data / data_budget / compile, are operational and
        left out, so the same experiment is found again from anywhere (the data path a run took
        is recorded with it and kept on resume).
        """
        d = self.to_dict()
        d["run"] = {"workers": self.run.workers}
        for k in OPERATIONAL_TRAIN_KEYS:
            del d["train"][k]
        g, m = self.graph, self.model
        return f"n{g.n}_w{self.w}_d{m.d_model}_L{m.n_layers}_s{self.seed}-{_digest(d)}"


def read_yaml(path: str | Path, what: str) -> Any:
    """A YAML file's content, or ConfigError naming the file when it is missing or malformed."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} {str(path)!r} does not exist")
    try:
        return yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{what} {str(path)!r} is not valid YAML: {e}") from None


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:8]


# ---- strict dict -> dataclass ------------------------------------------------

def _coerce(name: str, typ: Any, value: Any) -> Any:
    if typ is bool:
        _check(isinstance(value, bool), name, value, "must be true or false")
        return value
    if typ is int:
        _check(isinstance(value, int) and not isinstance(value, bool), name, value, "must be an integer")
        return value
    if typ is float:
        if isinstance(value, str):   # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        _check(isinstance(value, (int, float)) and not isinstance(value, bool), name, value, "must be a number")
        return float(value)
    if typ is str:
        _check(isinstance(value, str), name, value, "must be a string")
        return value
    if typ == tuple[str, ...]:
        _check(isinstance(value, (list, tuple)), name, value, "must be a list of names")
        return tuple(_coerce(name, str, v) for v in value)
    if typ == tuple[float, ...]:
        _check(isinstance(value, (list, tuple)), name, value, "must be a list of numbers")
        return tuple(_coerce(name, float, v) for v in value)
    if dataclasses.is_dataclass(typ):
        _check(isinstance(value, Mapping), name, value, "must be a mapping of keys")
        return _build(typ, value, name + ".")
    raise TypeError(f"unsupported config type {typ} for {name}")


def _build(cls: type, d: Mapping[str, Any], prefix: str) -> Any:
    hints = get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    for k in d:
        if k not in known:
            raise ConfigError(f"{prefix}{k}: unknown key (allowed under {prefix.rstrip('.') or 'the top level'}: "
                              f"{', '.join(sorted(known))})")
    kwargs = {k: _coerce(prefix + k, hints[k], v) for k, v in d.items()}
    return cls(**kwargs)


def set_dotted(d: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    cur = d
    for p in parts[:-1]:
        nxt = cur.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"{key}: {p!r} is not a section")
        cur = nxt
    cur[parts[-1]] = value


def apply_overrides(data: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Apply `section.key=value` strings; values are parsed as YAML scalars/lists."""
    data = json.loads(json.dumps(data))
    for o in overrides:
        if "=" not in o:
            raise ConfigError(f"--set {o!r}: expected section.key=value")
        key, raw = o.split("=", 1)
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        set_dotted(data, key.strip(), value)
    return data


"""The structured config: every key a user can set, its type and default.

Hydra composes `conf/config.yaml` on top of these dataclasses, so an unknown key
or a value of the wrong type is rejected before anything runs. `checks.py` adds the
rules a type cannot express (ranges, combinations). Hydra itself is met only in this
package (compose.py) and by sweeps (sweep.py); everything else receives a plain
`Config` object.
Choices are Enums (str-valued, so they compare equal to their names): the schema
itself rejects a bad value, naming the valid ones. Each shipped job's own config
dataclass lives beside the job in jobs/. The comment beside each field is its meaning,
read by `--cfg job` and docs/config.md (launcher/config/meanings.py): keep it one line.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from launcher.jobs.base import Choice, CustomJob
from launcher.jobs.images import ImagesJob
from launcher.jobs.mnist1d import Mnist1dJob
from launcher.jobs.synthetic import SyntheticJob


def _choice(name: str, *values: str) -> type:
    return Choice(name, [(v, v) for v in values], module=__name__, qualname=name)


Resume = _choice("Resume", "auto", "never", "must")
Precision = _choice("Precision", "auto", "fp32", "bf16", "fp16")
TrainDevice = _choice("TrainDevice", "auto", "cpu", "cuda")
Optimizer = _choice("Optimizer", "adamw", "sgd")
Ramp = _choice("Ramp", "exp", "tf", "none")
ValidationMode = _choice("ValidationMode", "auto", "rank", "process", "inline", "off", "external")
Weights = _choice("Weights", "ema", "raw", "both")
Policy = _choice("Policy", "latest", "all")
Goal = _choice("Goal", "max", "min")
WandbMode = _choice("WandbMode", "offline", "online", "disabled")
ProgressMode = _choice("ProgressMode", "auto", "rich", "plain", "off")
OomPhase = _choice("OomPhase", "forward", "backward", "last_backward", "headroom")
Strategy = _choice("Strategy", "ddp", "fsdp")


@dataclass
class RunConfig:
    """run.*: where the run lives, its id, resume, seed and the stop signals."""
    dir: Optional[str] = None  # the run directory; null = <run.root>/<run.id>
    root: str = "runs"  # parent folder of run directories when run.dir is not set
    id: Optional[str] = None  # null = SLURM_JOB_ID, else TORCHELASTIC_RUN_ID, else a timestamp
    resume: Resume = Resume.auto  # auto: resume if a checkpoint loads; never: start fresh; must: refuse without one
    seed: int = 0  # global seed: same initial weights on every rank, per-rank seed = seed + rank
    allow_changes: bool = False  # resume even with changes that break exactness (config/history.py: FROZEN)
    stop_signals: List[str] = field(  # stop cleanly at the next step: checkpoint, exit 128+signal
        default_factory=lambda: ["SIGTERM", "SIGINT", "SIGUSR1"])


@dataclass
class TrainConfig:
    """train.*: the run's length, precision, strategy and the speed options of the step."""
    epochs: int = 60  # passes over the training set (train.max_steps caps it when > 0)
    max_steps: int = 0  # optimizer steps; 0 = epochs decide
    precision: Precision = Precision.auto  # auto: bf16 on a GPU that has it, else fp16 on a GPU, fp32 on CPU
    grad_clip: float = 0.0  # max grad norm; 0 = off
    log_every: int = 10  # optimizer steps between metrics.jsonl rows / progress lines / wandb points
    device: TrainDevice = TrainDevice.auto  # auto: this rank's GPU if there is one, else the CPU
    threads: int = 0  # CPU threads per training process; 0: OMP_NUM_THREADS, else cores split with the validator
    compile: bool = False  # torch.compile the forward (DDP-aware: compiles the DDP wrapper in place)
    channels_last: bool = False  # NHWC weights and inputs for conv nets (converted in the copy to the device)
    cudnn_benchmark: bool = True  # cuDNN times its conv algorithms once per input shape, keeps the fastest
    tf32: bool = True  # fp32 matmuls and convolutions on TF32 tensor cores (Ampere+; fp32 storage, ~10-bit mantissa)
    strategy: Strategy = Strategy.ddp  # ddp: replicated weights; fsdp: FSDP2 shards weights, grads, optimizer, EMA


@dataclass
class DataConfig:
    """data.*: the training loader (workers, pinning, prefetch)."""
    workers: int = 0  # DataLoader worker processes per rank
    pin_memory: bool = True  # only where a GPU is used
    persistent_workers: bool = True  # keep loader workers alive across epochs (with workers > 0)
    prefetch: int = 2  # batches each worker loads ahead (with workers > 0)


@dataclass
class DdpConfig:
    """ddp.*: DistributedDataParallel's bucket settings."""
    """DistributedDataParallel settings (used with 2+ training ranks)."""
    bucket_cap_mb: float = 25.0  # gradient bucket size; larger = fewer, bigger all-reduces
    gradient_as_bucket_view: bool = True  # grads are views into the buckets: no copy, less memory
    static_graph: bool = False  # same graph every step: lets DDP skip its per-step bookkeeping


@dataclass
class DistConfig:
    """dist.*: the process groups."""
    """Process groups."""
    timeout_s: float = 1800.0  # collective/rendezvous timeout of the process groups (tests shorten it)


@dataclass
class BatchConfig:
    """batch.*: the per-rank micro-batch and the optional fixed effective batch."""
    size: Any = 64  # per-rank micro-batch: an int or "auto"
    global_size: Optional[int] = None  # fixed effective batch; accumulation fills the rest


@dataclass
class AutobatchConfig:
    """autobatch.*: the batch probe and runtime out-of-memory recovery."""
    fraction: float = 0.9  # of device memory the chosen batch may peak at (the margin where memory is measured)
    margin: float = 0.05  # unmeasured memory (simulated limits): this far below the largest that ran; the resolution
    max: int = 4096  # largest micro-batch the probe tries
    max_probes: int = 10  # trial steps per rank at most
    max_retries: int = 3  # runtime OOM recoveries (halvings) before giving up; 0 = off


@dataclass
class OptimConfig:
    """optim.*: the optimizer."""
    name: Optimizer = Optimizer.adamw  # the optimizer (a resume cannot change it: its state would not fit)
    lr: float = 3e-3  # peak learning rate (after warmup)
    weight_decay: float = 0.01  # never applied to biases or norm weights
    momentum: float = 0.9  # sgd momentum / adamw beta1
    beta2: float = 0.999  # adamw beta2
    nesterov: bool = False  # sgd: Nesterov momentum
    eps: float = 1e-8  # adamw epsilon
    fused: Optional[bool] = None  # None = fused where torch supports it (CUDA)


@dataclass
class SchedConfig:
    """sched.*: the warmup, then cosine schedule."""
    warmup_steps: int = 0  # linear warmup length in optimizer steps, then cosine decay
    warmup_epochs: float = 0.0  # used when warmup_steps is 0
    min_lr: float = 0.0  # cosine floor, as a fraction of optim.lr
    warmup_momentum: Optional[float] = None  # YOLO-style: momentum rises from this
    warmup_bias_lr: Optional[float] = None  # YOLO-style: bias lr falls from this


@dataclass
class EmaConfig:
    """ema.*: the moving average of the weights."""
    enabled: bool = True  # keep an EMA of the weights (ddp: on rank 0; fsdp: each rank of its shards)
    decay: float = 0.9999  # target decay d (the ramp approaches it)
    ramp: Ramp = Ramp.exp  # exp: d*(1-exp(-n/tau)); tf: min(d, (1+n)/(10+n)); none: d from the start
    tau: Optional[float] = None  # exp ramp time constant in updates; null = auto: spans ~5% of the run at its end
    every: int = 1  # update every k optimizer steps


@dataclass
class ValidationConfig:
    """validation.*: who validates, how often, which weights, the queue and the metric."""
    mode: ValidationMode = ValidationMode.auto  # external: hand-off only; `launcher validate` elsewhere
    rank: int = -1  # which global rank validates with mode=rank (and auto on 2+ processes)
    every_steps: int = 0  # 0 = use every_epochs
    every_epochs: int = 1  # validate at the end of every k-th epoch (when every_steps is 0)
    weights: Weights = Weights.ema  # which weights each validation evaluates
    policy: Policy = Policy.latest  # latest: skip snapshots a newer one overtook; all: validate every one
    batch_size: Any = 1000  # an int or "auto"
    precision: Precision = Precision.auto  # the evaluation's autocast; auto: bf16/fp16 where the device has it
    metric: str = "acc"  # the job metric that decides best/ and early stopping
    goal: Goal = Goal.max  # whether a larger or a smaller validation.metric is better
    queue: int = 2  # most unclaimed snapshots kept with policy=latest
    drain_timeout_s: float = 300.0  # at the end, how long training waits for the validator to finish
    device: str = "auto"  # the validator's device: auto | cpu | cuda | cuda:<n>
    share_gpu: bool = False  # mode=rank, one process more than GPUs on a node: the validator shares the last GPU
    gpu_share: float = 0.15  # of a GPU the validator shares with a trainer (one GPU, share_gpu): left it by the batch probe
    workers: int = -1  # evaluation DataLoader processes, persistent; -1: data.workers, at least 2 on a GPU


@dataclass
class EarlyStopConfig:
    """early_stop.*: when the validator asks training to stop."""
    patience: int = 0  # validations without improvement; 0 = off
    min_delta: float = 0.0  # smallest change that counts as an improvement
    window: int = 1  # sliding average over this many validations


@dataclass
class CheckpointConfig:
    """checkpoint.*: how often to save, retention, the bounded waits."""
    every_steps: int = 200  # and at every validation step and the end; 0 = only those
    keep_last: int = 3  # checkpoints kept (plus the best and those not validated yet)
    drain_timeout_s: float = 300.0  # the end, a stop or a restart waits this long for the save in flight


@dataclass
class WandbConfig:
    """logger.wandb.*: the wandb run."""
    mode: WandbMode = WandbMode.offline  # offline: a local run, `wandb sync` uploads it; online: live
    project: str = "launcher"  # wandb project
    entity: Optional[str] = None  # wandb entity (team or user); null = your default
    name: Optional[str] = None  # wandb run name; null = the run directory's name
    group: Optional[str] = None  # wandb group, e.g. to gather the runs of a sweep
    tags: List[str] = field(default_factory=list)  # wandb tags, e.g. [baseline,ema]


@dataclass
class TelemetryConfig:
    """logger.telemetry.*: NVML sampling of the node's GPUs."""
    every_s: float = 10.0  # NVML sampling period; 0 = off


@dataclass
class LoggerConfig:
    """logger.*: progress display, wandb, GPU telemetry."""
    wandb: WandbConfig = field(default_factory=WandbConfig)
    progress: ProgressMode = ProgressMode.auto  # auto: a rich bar on a terminal, plain lines otherwise
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)


@dataclass
class DebugConfig:
    """Real fault injection for tests and demos; all off by default."""
    simulate_oom_above: Any = None  # int, or a list with one limit per rank
    simulate_oom_at_step: Optional[int] = None  # one OOM in this step (from 1), on simulate_oom_rank, in simulate_oom_phase
    simulate_oom_phase: OomPhase = OomPhase.backward  # where: backward = the step's first; headroom = too little memory reported
    simulate_oom_rank: int = -1  # the training rank of debug.simulate_oom_at_step (-1: the last)
    nan_loss_at_step: Optional[int] = None  # the loss of this step (from 1) is NaN on training rank nan_loss_rank
    nan_loss_rank: int = -1  # the training rank that gets debug.nan_loss_at_step's NaN (-1: the last)
    handoff_oom_at_step: Optional[int] = None  # the hand-off of this step raises an OOM (skipped, recorded)
    fail_at_step: Optional[int] = None  # os._exit at this step (its checkpoints written first), once per run
    step_delay_s: float = 0.0  # sleep after each step: a short run stays alive long enough to signal it
    val_delay_s: float = 0.0  # sleep this long in every validation, to test asynchrony
    checkpoint_write_delay_s: float = 0.0  # a background checkpoint waits this long written but not visible (kill it then)
    fail_at_start: Optional[int] = None  # SIGKILL this global rank before it joins the group, first attempt only


@dataclass
class Config:
    """The whole config: `job` (a job's own dataclass, picked by `job=<name>`) and one section per component."""
    job: Any = MISSING
    run: RunConfig = field(default_factory=RunConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    ddp: DdpConfig = field(default_factory=DdpConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    autobatch: AutobatchConfig = field(default_factory=AutobatchConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sched: SchedConfig = field(default_factory=SchedConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    early_stop: EarlyStopConfig = field(default_factory=EarlyStopConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)


JOBS = {"mnist1d": Mnist1dJob, "synthetic": SyntheticJob, "custom": CustomJob, "images": ImagesJob}  # job=<name>


def validation_mode(mode: str, world_size: int) -> str:
    """What `validation.mode=auto` means for `world_size` processes (the one place that says it): the
    last rank validates with N >= 2 (`rank`), a local child process with N == 1 (`process`)."""
    if mode == "auto":
        return "rank" if world_size >= 2 else "process"
    return str(mode)


def register() -> None:
    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=Config)
    for name, node in JOBS.items():
        cs.store(group="job", name=f"{name}_schema", node=node)


def get(cfg: Config, key: str) -> Any:
    obj: Any = cfg
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def flat_defaults(node: Any = None, prefix: str = "") -> List[tuple]:
    """(key, type, default) for every leaf of the schema (docs/config.md comes from meanings.py instead)."""
    node = node if node is not None else Config
    rows = []
    for f in fields(node):
        key = f"{prefix}{f.name}"
        default = f.default_factory() if callable(f.default_factory) else f.default  # type: ignore[misc]
        if is_dataclass(default):
            rows += flat_defaults(type(default), key + ".")
        else:
            rows.append((key, str(f.type), default))
    return rows

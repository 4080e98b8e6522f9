"""The one typed config tree of an opd run.

Frozen dataclasses with a comment on every field. Each stage owns its
sections beside its code (rollout/config.py: student, teacher, data, rollout;
learner/config.py: learner, loss, and the table of losses); this module
defines the driver's own sections (train, eval, reward, log, run, placement),
composes them all into `Config`, and owns the front end and the cross-section
checks. `load_config(path, overrides)` reads a YAML file, applies dotted
overrides (`learner.lr=1e-5`, values parsed as YAML scalars), and builds the
tree. Unknown keys, wrong types and bad values are all collected and raised
together as one `ConfigError` that names each key, the bad value and what is
valid, before any actor starts.

Each component receives its own sub-config (`cfg.rollout`, `cfg.learner`, ...),
never the root.

    python -m cluster.config configs/demo.yaml train.steps=5   # print resolved
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

# The stages' own sections, composed below (and re-exported: cluster/, tests,
# bench and recipes import every section from this module).
from learner.config import LOSSES, LearnerConfig, LossConfig  # noqa: F401
from rollout.config import (  # noqa: F401
    SECTION_NAMES,
    CpuConfig,
    DataConfig,
    RolloutConfig,
    StudentConfig,
    TeacherConfig,
    non_negative,
    parse_cpu_list,
    positive,
)


class ConfigError(ValueError):
    """All problems found in a config, one per line. Pickles (crosses Ray)."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__(self._render())

    def _render(self) -> str:
        n = len(self.problems)
        head = f"{n} problem{'s' if n != 1 else ''} in the config:"
        return "\n".join([head] + [f"  - {p}" for p in self.problems])

    def __reduce__(self):
        return (ConfigError, (self.problems,))


# --------------------------------------------------------------------------
# The tree
# --------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class TrainConfig:
    # Optimizer steps of the run.
    steps: int = 20
    # Prompts per step (each sampled rollout.samples_per_prompt times).
    prompts_per_step: int = 8
    # sync: sample with the current weights, then train (strictly on-policy).
    # async: sample step k+1 while step k trains (bounded policy lag).
    mode: Literal["sync", "async"] = "sync"
    # Async only: the oldest policy version a trained sample may come from,
    # counted in steps behind the learner.
    max_policy_lag: int = 1
    # Who writes the completions: "student" (on-policy, the samplers) or
    # "teacher" (off-policy, teacher_server /v1/generate: sequence-level KD).
    sample_from: Literal["student", "teacher"] = "student"
    # Split each step's prompts into this many chunks and score chunk i on the
    # teacher while the samplers generate chunk i+1 (sampling and scoring run
    # on different machines/processes, so they overlap). 1 = sample everything,
    # then score everything. More chunks overlap more but give each vLLM
    # generate call a smaller batch.
    rollout_chunks: int = 1

    def problems(self) -> list[str]:
        out = positive(self, "steps", "prompts_per_step", "max_policy_lag", "rollout_chunks")
        if self.rollout_chunks > self.prompts_per_step:
            out.append(f"train.rollout_chunks: {self.rollout_chunks} chunks of {self.prompts_per_step} prompts per "
                       f"step would leave chunks empty; use at most train.prompts_per_step")
        return out


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    # Evaluate every N steps (and before the first and after the last); 0 = never.
    every_steps: int = 5
    # Held-out prompts per evaluation.
    num_prompts: int = 32
    # Completions per held-out prompt.
    samples_per_prompt: int = 1
    # Sampling temperature of the completions that are graded (eval/accuracy;
    # 0 = greedy). eval/reverse_kl is always measured on completions sampled at
    # temperature 1 against the teacher at temperature 1, whatever this says;
    # at a value other than 1 the graded completions are a second pass.
    temperature: float = 1.0
    # How eval/accuracy scores a completion: "exact" (stripped completion ==
    # stripped `answer`), "last_number" (the completion's last number vs the
    # answer, numerically), "boxed" (the last \boxed{...} vs the answer), or
    # "package.module:function" called as function(completion: str, record:
    # dict) -> float in [0, 1] (cluster/task_fns.py). null: "exact" on records
    # that have an `answer`; without answers no accuracy is logged.
    grader: str | None = None

    def problems(self) -> list[str]:
        out = non_negative(self, "every_steps", "temperature") + positive(self, "num_prompts",
                                                                          "samples_per_prompt")
        if self.grader is not None:
            from cluster.task_fns import resolve_grader

            try:
                resolve_grader(self.grader)
            except ValueError as e:
                out.append(str(e))
        return out


@dataclasses.dataclass(frozen=True)
class RewardConfig:
    # A task reward beside the distillation signal: "package.module:function"
    # called once per sampled completion as function(completion: str, record:
    # dict) -> float (cluster/task_fns.py). null = no reward.
    fn: str | None = None
    # Weight of the reward advantage in loss.kind=reverse_kl: the per-token
    # advantage is loss.kl_coef * (lp_teacher - lp_sampler) + coef * (R - b),
    # R the completion's reward (the same for all its tokens), b the mean
    # reward of the prompt's samples (the group baseline). 0 = the reward is
    # computed and logged (reward/mean, reward/std) but not trained on.
    # loss.kl_coef=0 with coef > 0 is plain RL with a group baseline.
    coef: float = 0.0

    def problems(self) -> list[str]:
        out = []
        if self.fn is not None:
            from cluster.task_fns import resolve_reward

            try:
                resolve_reward(self.fn)
            except ValueError as e:
                out.append(str(e))
        elif self.coef != 0.0:
            out.append(f"reward.coef: {self.coef} but reward.fn is null; set reward.fn to a "
                       "\"package.module:function\" that scores a completion, or reward.coef=0")
        if not (self.coef == self.coef and abs(self.coef) != float("inf")):
            out.append(f"reward.coef: {self.coef} is not a finite number")
        return out


@dataclasses.dataclass(frozen=True)
class WandbConfig:
    # online | offline | disabled | auto (online when WANDB_API_KEY is set or
    # a login exists, else offline; `wandb sync <run.dir>/wandb/offline-run-*`).
    mode: Literal["auto", "online", "offline", "disabled"] = "auto"
    # wandb project.
    project: str = "opd"
    # wandb entity (team); null = the default of the logged-in user.
    entity: str | None = None
    # Run name; null = the basename of run.dir.
    name: str | None = None
    # Log a table of sampled completions with per-token advantages every N steps (0 = never).
    table_every_steps: int = 10
    # Completions in that table.
    table_samples: int = 4

    def problems(self) -> list[str]:
        return non_negative(self, "table_every_steps", "table_samples")


@dataclasses.dataclass(frozen=True)
class LogConfig:
    # Weights & Biases settings.
    wandb: WandbConfig = WandbConfig()
    # Print a progress line every N steps.
    print_every_steps: int = 1

    def problems(self) -> list[str]:
        return positive(self, "print_every_steps")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    # Run directory: metrics.jsonl, checkpoints/, the final export, the
    # resolved config, wandb's offline files.
    dir: str = "runs/opd"
    # Seed of everything (prompt order, sampling, init of the learner's RNG).
    seed: int = 0
    # Continue from the latest checkpoint in run.dir (same as --resume).
    resume: bool = False
    # Checkpoint every N steps (0 = only at the end and on SIGTERM).
    save_every_steps: int = 10
    # Checkpoints kept (older ones are deleted after a newer one is complete).
    keep_checkpoints: int = 2
    # Export the final student in Hugging Face format to <run.dir>/final
    # (sharded safetensors in the training dtype, config, generation config,
    # tokenizer: loads in transformers and vLLM).
    export_final: bool = True
    # Also export every N steps to <run.dir>/exports/step_NNNNNNNN (0 = off;
    # all are kept; the last step's export is final/ when export_final).
    export_every_steps: int = 0

    def problems(self) -> list[str]:
        return non_negative(self, "save_every_steps", "export_every_steps") + positive(self, "keep_checkpoints")


@dataclasses.dataclass(frozen=True)
class PlacementConfig:
    # Ray address to join; null = RAY_ADDRESS, or a new local cluster ("local" too).
    ray_address: str | None = None
    # CPUs of a local cluster started by the driver (null = all of them).
    local_num_cpus: int | None = None
    # How bundles of one role spread over nodes (a Ray placement strategy).
    strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    # GPUs per sampler engine bundle and per learner rank; 0 = CPU-only run;
    # null = 1 when the cluster has GPUs, else 0.
    gpus_per_bundle: float | None = None
    # Custom Ray resource that sampler bundles require (e.g. a node label), or null.
    sampler_resource: str | None = None
    # Custom Ray resource that learner bundles require, or null.
    learner_resource: str | None = None


@dataclasses.dataclass(frozen=True)
class Config:
    # The model being trained.
    student: StudentConfig = StudentConfig()
    # The frozen model that scores the student's tokens.
    teacher: TeacherConfig = TeacherConfig()
    # Prompt sources.
    data: DataConfig = DataConfig()
    # Sampling (vLLM sampler actors).
    rollout: RolloutConfig = RolloutConfig()
    # Training (DeepSpeed learner actors).
    learner: LearnerConfig = LearnerConfig()
    # The distillation objective.
    loss: LossConfig = LossConfig()
    # An optional task reward added to the objective.
    reward: RewardConfig = RewardConfig()
    # The loop.
    train: TrainConfig = TrainConfig()
    # Held-out evaluation.
    eval: EvalConfig = EvalConfig()
    # Logging.
    log: LogConfig = LogConfig()
    # Run directory, seed, checkpoints.
    run: RunConfig = RunConfig()
    # Ray cluster and placement.
    placement: PlacementConfig = PlacementConfig()
    # Settings used only where a role runs on CPU (tests, the demo); GPU runs
    # can ignore them.
    cpu: CpuConfig = CpuConfig()

    def problems(self) -> list[str]:
        """Required keys and cross-section checks (each section checks its own
        fields; a section missing from the input is not built, so required
        keys are checked here)."""
        out = []
        if not self.student.model:
            out.append("student.model: required; set it to a local Hugging Face model directory or a hub id "
                       "(e.g. student.model=Qwen/Qwen3-1.7B)")
        if not self.data.train:
            out.append("data.train: required; set it to a JSONL or Parquet file of prompts, or a directory "
                       "written by datasets' save_to_disk (e.g. data.train=/data/prompts.jsonl)")
        # With teacher.routes the top-level teacher needs a server only when it
        # scores records (unrouted=default) or a route shares its server.
        t = self.teacher
        if t.url is None and not t.model and (not t.routes or t.unrouted == "default"
                                              or any(r.url is None and not r.model for r in t.routes)):
            out.append("teacher: set either teacher.url (a running teacher_server) or teacher.model "
                       "(the driver starts one); both are null")
        out += self._teacher_route_problems()
        loss = LOSSES[self.loss.kind]
        if loss.needs_topk and self.teacher.top_k <= 0:
            out.append(f"loss.kind={self.loss.kind} needs the teacher's top-k support: set teacher.top_k "
                       f"to K > 0 (e.g. teacher.top_k=20); it is {self.teacher.top_k}")
        # Only the sampled-token reverse-KL estimator is restricted: it needs
        # the student's own samples (on teacher samples lp_sampler is the
        # teacher's, so the advantage lp_teacher - lp_sampler is 0).
        if self.train.sample_from not in loss.sample_from:
            out.append(f"loss.kind={self.loss.kind} with train.sample_from={self.train.sample_from}: the "
                       "sampled-token estimator needs the student's own samples (on teacher samples its advantage "
                       "is 0); for off-policy reverse KL use loss.kind=reverse_kl_topk with teacher.top_k > 0, or "
                       "sample from the student")
        if self.train.sample_from == "teacher" and self.train.mode == "async":
            out.append("train.mode=async overlaps student sampling with training; with "
                       "train.sample_from=teacher there is no student sampling: use train.mode=sync")
        if self.train.sample_from == "teacher" and self.teacher.backend in ("vllm", "sglang"):
            out.append(f"train.sample_from=teacher samples through opd's teacher_server (/v1/generate); "
                       f"teacher.backend={self.teacher.backend} only scores: use teacher.backend=opd (or auto) "
                       f"with opd's server, or train.sample_from=student")
        out += self._temperature_and_reward_problems()
        if self.data.max_prompt_tokens + self.rollout.max_new_tokens > self.student.max_model_len:
            out.append(f"data.max_prompt_tokens ({self.data.max_prompt_tokens}) + rollout.max_new_tokens "
                       f"({self.rollout.max_new_tokens}) exceeds student.max_model_len "
                       f"({self.student.max_model_len}); raise student.max_model_len or lower one of them")
        if self.teacher.url is None and (self.data.max_prompt_tokens + self.rollout.max_new_tokens
                                         > self.teacher.max_model_len):
            out.append(f"data.max_prompt_tokens + rollout.max_new_tokens "
                       f"({self.data.max_prompt_tokens + self.rollout.max_new_tokens}) exceeds "
                       f"teacher.max_model_len ({self.teacher.max_model_len})")
        out += self._gpu_placement_problems()
        return out

    def _gpu_placement_problems(self) -> list[str]:
        """placement.gpus_per_bundle against the samplers: a sampler's bundle
        (and actor) holds gpus_per_bundle x rollout.tensor_parallel_size GPUs
        (cluster/placement.py), and each engine worker and learner rank uses one."""
        g, tp = self.placement.gpus_per_bundle, self.rollout.tensor_parallel_size
        if g is None or g == 0:
            return []
        if g < 0:
            return [f"placement.gpus_per_bundle: {g} is negative; use 0 (a CPU-only run), 1, a fraction "
                    "below 1 (roles share a GPU), or null (1 when the cluster has GPUs, else 0)"]
        if g > 1:
            return [f"placement.gpus_per_bundle: {g} GPUs per bundle, but a learner rank and each sampler engine "
                    "worker use one GPU (the rest would idle, and Ray refuses fractions above 1); use 1 (or a "
                    "fraction below 1 to share GPUs), and rollout.tensor_parallel_size for bigger samplers"]
        out = []
        if g < 1 and tp > 1:
            out.append(f"placement.gpus_per_bundle={g} with rollout.tensor_parallel_size={tp}: each of a "
                       f"sampler's {tp} engine workers needs a GPU of its own, but its bundle would hold "
                       f"{g * tp:g}; use placement.gpus_per_bundle=1 (or rollout.tensor_parallel_size=1)")
        if g < 1 and self.rollout.gpu_memory_utilization > g:
            out.append(f"rollout.gpu_memory_utilization ({self.rollout.gpu_memory_utilization}) exceeds "
                       f"placement.gpus_per_bundle ({g}): a sampler shares its GPU, but vLLM would claim "
                       f"{self.rollout.gpu_memory_utilization:.0%} of its memory; set "
                       f"rollout.gpu_memory_utilization <= {g}")
        return out

    def _teacher_route_problems(self) -> list[str]:
        """Several teachers and the teacher's own prompt against the rest of
        the run (rollout/teacher_routes.py)."""
        out = []
        t = self.teacher
        specs = [("teacher", t.prompt, t.system_prompt)] + [
            (f"teacher.routes[{i}]", r.prompt or t.prompt, r.system_prompt if r.system_prompt is not None
             else t.system_prompt) for i, r in enumerate(t.routes)]
        if self.train.sample_from == "teacher" and (t.routes or any(p != "student" for _, p, _ in specs)):
            out.append("train.sample_from=teacher: the teacher writes the completions from the student's prompt, "
                       "so teacher.routes and a teacher.prompt other than student do not apply; sample from the "
                       "student, or use one teacher with teacher.prompt=student")
        if not self.data.apply_chat_template:
            for key, p, system in specs:
                if p.startswith("field:") and system is not None:
                    out.append(f"{key}.system_prompt: the teacher's prompt ({p}) is rendered as the student's is, "
                               "without a chat template (data.apply_chat_template=false), so it has no place for "
                               "a system message; set data.apply_chat_template=true or drop the system prompt")
        on_policy_pg = self.loss.kind == "reverse_kl" and self.train.sample_from == "student"
        t_roll = self.rollout.temperature
        for i, r in enumerate(t.routes):
            if on_policy_pg and t_roll > 0 and r.temperature is not None and r.temperature > 0 \
                    and r.temperature != t_roll:
                out.append(f"teacher.routes[{i}].temperature ({r.temperature}) differs from rollout.temperature "
                           f"({t_roll}) with loss.kind=reverse_kl: every teacher is held to the rule of "
                           f"teacher.temperature (the student would learn a rescaled teacher); set it to {t_roll} "
                           "or null")
        return out

    def _temperature_and_reward_problems(self) -> list[str]:
        """The temperature rule (docs/method.md, "Temperatures")
        and the reward's requirements.

        reverse_kl trains the distribution the samplers draw from,
        q_T = softmax(logits / T) with T = rollout.temperature, toward the
        teacher as scored, softmax(teacher logits / T') with T' =
        teacher.temperature. At T' = T its fixed point is student logits =
        teacher logits (+ a constant), i.e. the student equals the teacher at
        every temperature, T = 1 included (the method samples and scores at
        1, as tinker-cookbook does); at T' != T it is a rescaled teacher
        (student logits = T / T' x the teacher's), so that is refused. The
        top-k losses and sft fit the student at T = 1 to their target (the
        teacher at T', or the given tokens); rollout.temperature only chooses
        the states, any value (greedy included) is coherent, and T' != 1 is
        the deliberate choice of a tempered target."""
        out = []
        on_policy_pg = self.loss.kind == "reverse_kl" and self.train.sample_from == "student"
        t_roll, t_teach = self.rollout.temperature, self.teacher.temperature
        if on_policy_pg and t_roll == 0:
            out.append("rollout.temperature: 0 (greedy) with loss.kind=reverse_kl: on-policy distillation needs "
                       "samples from the student's distribution, and greedy decoding has none (no importance "
                       "ratio, no sampled KL); use rollout.temperature > 0 (1.0, as in the method)")
        elif on_policy_pg and t_teach != t_roll and t_teach > 0:  # teacher.temperature <= 0 is reported by its section
            out.append(f"teacher.temperature ({t_teach}) differs from rollout.temperature ({t_roll}) with "
                       f"loss.kind=reverse_kl: the advantage lp_teacher - lp_sampler compares the student sampled "
                       f"at rollout.temperature with the teacher scored at teacher.temperature, and at different "
                       f"temperatures the student learns a rescaled teacher (logits -> {t_roll / t_teach:.3g} x the "
                       f"teacher's); set teacher.temperature={t_roll} (the method samples and scores at 1.0)")
        if self.reward.coef != 0.0:
            if self.loss.kind != "reverse_kl":
                out.append(f"reward.coef: {self.reward.coef} with loss.kind={self.loss.kind}: the reward advantage "
                           "enters the policy-gradient loss only; use loss.kind=reverse_kl (with loss.kl_coef=0 "
                           "for plain RL) or reward.coef=0")
            if self.rollout.samples_per_prompt < 2:
                out.append(f"reward.coef: {self.reward.coef} with rollout.samples_per_prompt="
                           f"{self.rollout.samples_per_prompt}: the baseline is the mean reward of a prompt's "
                           "samples, so one sample per prompt makes every reward advantage 0; use "
                           "rollout.samples_per_prompt >= 2")
        return out


# --------------------------------------------------------------------------
# Field checks
# --------------------------------------------------------------------------

# positive / non_negative (rollout/config.py) name a field by its section's
# dotted key, registered here from the tree.

def _register_sections(cls: type, prefix: str) -> None:
    SECTION_NAMES[cls] = prefix or "config"
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        t = hints[f.name]
        if dataclasses.is_dataclass(t):
            _register_sections(t, f"{prefix}.{f.name}" if prefix else f.name)


_register_sections(Config, "")


# --------------------------------------------------------------------------
# Building the tree from untyped data
# --------------------------------------------------------------------------

def _type_name(t: Any) -> str:
    origin = typing.get_origin(t)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(t))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(t))
    if origin is tuple:
        return "a list"
    if t is type(None):
        return "null"
    return getattr(t, "__name__", str(t))


def _convert(value: Any, t: Any, key: str, problems: list[str]) -> Any:
    """Convert one YAML value to type `t`; on failure append a problem and
    return a sentinel."""
    origin = typing.get_origin(t)
    if dataclasses.is_dataclass(t):
        if not isinstance(value, dict):
            problems.append(f"{key}: expected a mapping (section), got {_show(value)}")
            return _BAD
        return _build(t, value, key, problems)
    if origin is Literal:
        allowed = typing.get_args(t)
        if value in allowed and type(value) in {type(a) for a in allowed}:
            return value
        problems.append(f"{key}: {_show(value)} is not valid; valid values are "
                        + ", ".join(repr(a) for a in allowed))
        return _BAD
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(t)
        if value is None:
            if type(None) in args:
                return None
            problems.append(f"{key}: null is not allowed; expected {_type_name(t)}")
            return _BAD
        sub: list[str] = []
        for a in args:
            if a is type(None):
                continue
            sub = []
            out = _convert(value, a, key, sub)
            if not sub:
                return out
        problems.append(f"{key}: {_show(value)} is not {_type_name(t)}")
        return _BAD
    if origin is dict:   # free-form arguments passed on as given (rollout.engine_args)
        if not isinstance(value, dict):
            problems.append(f"{key}: expected a mapping of names to values, got {_show(value)}")
            return _BAD
        for k, v in value.items():
            if not isinstance(k, str) or not k.isidentifier():
                problems.append(f"{key}: {_show(k, 40)} is not a valid name (letters, digits and '_')")
                return _BAD
            if not _plain(v):
                problems.append(f"{key}.{k}: {_show(v)} is not plain data (a number, string, boolean, null, "
                                "or a list or mapping of those)")
                return _BAD
        return dict(value)
    if origin is tuple:
        args = typing.get_args(t)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool) and args and args[-1] is Ellipsis:
            value = [value]  # a single stop string is a one-element list
        if not isinstance(value, (list, tuple)):
            problems.append(f"{key}: expected a list, got {_show(value)}")
            return _BAD
        if args and args[-1] is Ellipsis:
            elem_types = [args[0]] * len(value)
        else:
            if len(value) != len(args):
                problems.append(f"{key}: expected a list of {len(args)} values, got {len(value)}: {_show(list(value))}")
                return _BAD
            elem_types = list(args)
        out = tuple(_convert(v, et, f"{key}[{i}]", problems) for i, (v, et) in enumerate(zip(value, elem_types, strict=True)))
        # One bad element makes the whole field bad: the section keeps its
        # default, so its own checks never see the sentinel.
        return _BAD if any(v is _BAD for v in out) else out
    if t is bool:
        if isinstance(value, bool):
            return value
        problems.append(f"{key}: {_show(value)} is not a boolean; use true or false")
        return _BAD
    if t is int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, int) and not isinstance(value, bool):
            if _INT_MIN <= value <= _INT_MAX:
                return value
            problems.append(f"{key}: {_show(value, 40)} is out of range; valid integers are "
                            f"{_INT_MIN} .. {_INT_MAX}")
            return _BAD
        problems.append(f"{key}: {_show(value)} is not an integer")
        return _BAD
    if t is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                return float(value)
            except OverflowError:  # an int beyond float range
                problems.append(f"{key}: {_show(value, 40)} is too large for a float")
                return _BAD
        if isinstance(value, str):  # YAML reads 1e-5 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        problems.append(f"{key}: {_show(value)} is not a number")
        return _BAD
    if t is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            with contextlib.suppress(ValueError):  # ints over 4300 digits do not convert
                return str(value)
        problems.append(f"{key}: {_show(value)} is not a string")
        return _BAD
    raise TypeError(f"config field {key} has an unsupported type {t!r}")


def _plain(v: Any, depth: int = 0) -> bool:
    """JSON-like data (what YAML's plain scalars, lists and mappings load as)."""
    if depth > 20:
        return False
    if v is None or isinstance(v, (bool, int, float, str)):
        return True
    if isinstance(v, list):
        return all(_plain(x, depth + 1) for x in v)
    if isinstance(v, dict):
        return all(isinstance(k, str) and _plain(x, depth + 1) for k, x in v.items())
    return False


def _show(value: Any, limit: int = 200) -> str:
    """repr() for a problem message: never raises (ints over 4300 digits, deep
    nesting) and is cut at `limit` characters."""
    try:
        text = repr(value)
    except (ValueError, RecursionError):
        text = f"<{type(value).__name__} too large to print>"
    return text if len(text) <= limit else text[:limit] + "..."


# Config integers (steps, seeds, sizes) fit in 64 bits; larger ones are typos.
_INT_MIN, _INT_MAX = -2**63, 2**63 - 1


class _Bad:
    def __repr__(self) -> str:
        return "<invalid>"


_BAD = _Bad()


# Keys that moved, to the key that holds the setting now.
MOVED = {
    "rollout.kv_cache_gib": "cpu.sampler_kv_cache_gib",
    "rollout.cpu_threads_bind": "cpu.sampler_threads",
    "teacher.kv_cache_gib": "cpu.teacher_kv_cache_gib",
    "learner.cpu_threads": "cpu.learner_threads",
}


def _build(cls: type, data: dict, prefix: str, problems: list[str]):
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for k in data:
        if k not in fields:
            k = k if isinstance(k, str) else _show(k, 40)
            key = f"{prefix}.{k}" if prefix else k
            if key in MOVED:
                problems.append(f"{key}: moved to {MOVED[key]}; set that key instead")
                continue
            problems.append(f"{key}: unknown key; valid keys {'of ' + prefix if prefix else 'at the top level'} "
                            f"are {', '.join(sorted(fields))}")
    kwargs = {}
    for name in fields:
        if name not in data:
            continue
        key = f"{prefix}.{name}" if prefix else name
        v = _convert(data[name], hints[name], key, problems)
        if v is not _BAD:
            kwargs[name] = v
    obj = cls(**kwargs)
    # Bad fields hold their (valid) defaults here, so the section's own checks
    # still run and every problem is reported at once.
    if hasattr(obj, "problems") and cls is not Config:
        problems.extend(obj.problems())
    return obj


def _walk_sections(cfg) -> list:
    out = [cfg]
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v):
            out.extend(_walk_sections(v))
    return out


def _parse_scalar(text: str) -> Any:
    try:
        return yaml.safe_load(text) if text != "" else ""
    except (yaml.YAMLError, ValueError, TypeError, AttributeError, RecursionError):
        # Not a YAML scalar (or a tagged one its constructor refuses, e.g. `!!float x`,
        # or nesting past the recursion limit): keep the text; the field's type check
        # then reports it.
        return text


def apply_overrides(data: dict, overrides: list[str], problems: list[str]) -> dict:
    """Apply `a.b.c=value` overrides to a nested dict (values parsed as YAML)."""
    for ov in overrides:
        if "=" not in ov:
            problems.append(f"override {ov!r}: expected dotted.key=value (e.g. learner.lr=1e-5)")
            continue
        key, text = ov.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            problems.append(f"override {ov!r}: empty key segment in {key!r}")
            continue
        node = data
        ok = True
        for i, p in enumerate(parts[:-1]):
            nxt = node.get(p)
            if nxt is None:
                nxt = node[p] = {}
            if not isinstance(nxt, dict):
                problems.append(f"override {ov!r}: {'.'.join(parts[:i + 1])} is a value, not a section")
                ok = False
                break
            node = nxt
        if ok:
            node[parts[-1]] = _parse_scalar(text)
    return data


def config_from_dict(data: dict | None, overrides: list[str] | None = None) -> Config:
    """Build and validate the tree; raise ConfigError with every problem."""
    problems: list[str] = []
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError([f"the config must be a mapping at the top level, got {type(data).__name__}"])
    import copy

    try:
        data = copy.deepcopy(data)
    except RecursionError as e:
        raise ConfigError(["the config nests deeper than Python's recursion limit; it cannot be a valid "
                           "opd config (sections are at most 3 levels deep)"]) from e
    data = apply_overrides(data, list(overrides or []), problems)
    cfg = _build(Config, data, "", problems)
    # Cross-section checks run too (fields that failed above hold their
    # defaults), so the user sees every problem in one go.
    problems.extend(cfg.problems())
    if problems:
        raise ConfigError(problems)
    return cfg


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Load `path` (YAML; None = all defaults) with dotted overrides."""
    data: Any = {}
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise ConfigError([f"config file {str(p)!r} does not exist (paths are relative to {Path.cwd()})"])
        try:
            data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except (yaml.YAMLError, ValueError, TypeError, AttributeError, RecursionError) as e:
            # ValueError includes UnicodeDecodeError and refused tagged scalars (`!!int x`).
            raise ConfigError([f"{p}: not valid YAML: {type(e).__name__}: {str(e)[:500]}"]) from e
    return config_from_dict(data, overrides)


def to_dict(cfg) -> dict:
    """The resolved tree as plain data (tuples become lists), for logging."""
    def conv(v):
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, tuple):
            return [conv(x) for x in v]
        return v

    return conv(cfg)


def replace(cfg: Config, overrides: list[str]) -> Config:
    """A new validated tree: `cfg` with dotted overrides applied."""
    return config_from_dict(to_dict(cfg), overrides)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    path = argv[0] if argv and "=" not in argv[0] else None
    overrides = argv[1:] if path else argv
    try:
        cfg = load_config(path, overrides)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 2
    print(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The driver's side of several teachers (`teacher.routes`) and of the
teacher's own prompt (`teacher.prompt`): rollout/teacher_routes.py holds the
logic; this module resolves the routes' models, checks every teacher's
tokenizer, builds the teacher prefixes, and starts the servers that routes
ask the driver to serve.

cluster/train.py calls, in order:

    plan = TeacherPlan.prepare(cfg, student_tok, student_path, data_cfg, records)
        # before Ray: route models resolved, tokenizers checked on disk,
        # every record's teacher and prefix set (PromptDataError: exit 2),
        # running route servers (url) waited for and their tokenizers checked
    plan.start(run_dir, uses_gpus, teardown, kv_cache_gib=..., kv_seqs=...)
        # after the placement groups: a server per route with `model` and
        # no `url` (cluster/teacher_proc.py, as the default teacher's)
    teacher = plan.scorer(default_client, default_handle, teardown)
        # the plain client (one teacher, the student's prompt) or a TeacherSet

The top-level teacher's own server stays with cluster/train.py; when routes
cover every record and none shares its server, it is not started
(`plan.default_needed`).
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
from pathlib import Path

from cluster.config import Config, ConfigError
from cluster.models import ResolvedModel, resolve_model
from rollout.teacher_routes import (
    DEFAULT,
    PrefixRenderer,
    TeacherSet,
    TeacherSpec,
    assign_teachers,
    custom_teachers,
    server_configs,
    teacher_specs,
)


@dataclasses.dataclass
class TeacherPlan:
    cfg: Config
    specs: list[TeacherSpec]
    servers: dict  # server name -> TeacherConfig
    models: dict[str, ResolvedModel]  # route server name -> its model (driver-started routes)
    handles: dict = dataclasses.field(default_factory=dict)  # route server name -> TeacherHandle or Future

    @property
    def default_needed(self) -> bool:
        """Whether the top-level teacher's server is used (scores records, or a route shares it)."""
        return DEFAULT in self.servers

    def route_gpus(self, uses_gpus: bool) -> int:
        """GPUs of the route servers the driver starts."""
        return sum(self.servers[n].tensor_parallel_size for n in self.models) if uses_gpus else 0

    @classmethod
    def prepare(cls, cfg: Config, student_tok, student_path: str, apply_chat_template: bool,
                records: list, run_dir: Path) -> "TeacherPlan":
        from transformers import AutoTokenizer

        from cluster.teacher_proc import start_teacher
        from rollout.teacher_client import TeacherClient, check_tokenizers
        from teacher_server.protocol import load_tokenizer_info

        tcfg = cfg.teacher
        specs = teacher_specs(tcfg)
        servers = server_configs(tcfg, specs)
        plan = cls(cfg, specs, servers, {})
        if not custom_teachers(tcfg):
            return plan
        problems: list[str] = []
        resolved: dict[str, ResolvedModel] = {}

        def model_of(key: str, spec: str) -> ResolvedModel | None:
            if key not in resolved:
                try:
                    resolved[key] = resolve_model(spec, key)
                except ConfigError as e:
                    problems.extend(e.problems)
                    return None
            return resolved[key]

        for name, scfg in servers.items():
            if name != DEFAULT and not scfg.url:
                key = next(s.key for s in specs if s.name == name)
                m = model_of(f"{key}.model", scfg.model)
                if m is not None:
                    plan.models[name] = m
        renderers = {}
        tokenizers: dict[str, object] = {}
        for s in specs:
            if s.cfg.prompt == "student":
                continue
            key = "teacher" if s.server == DEFAULT else s.key
            if not s.cfg.model:
                if s.cfg.prompt == "own_template":
                    problems.append(f"{s.key}.prompt=own_template renders the record with the teacher's chat "
                                    f"template, but {key} names only a url; set {key}.model to the teacher's "
                                    f"model (a directory or hub id) as the source of its tokenizer")
                    continue
                tok = None  # field:NAME with no teacher model: the student's template
            else:
                m = model_of(f"{key}.model", s.cfg.model)
                if m is None:
                    continue
                if m.path not in tokenizers:
                    # The prefix is rendered with this tokenizer and scored as the
                    # student's ids: both must map ids the same way.
                    check_tokenizers(student_tok, load_tokenizer_info(m.path), student_path, s.cfg.model)
                    tokenizers[m.path] = AutoTokenizer.from_pretrained(m.path)
                tok = tokenizers[m.path]
            if tok is None:
                tok = tokenizers.setdefault(student_path, AutoTokenizer.from_pretrained(student_path))
            renderers[s.name] = PrefixRenderer(s.cfg.prompt, s.cfg.system_prompt, tok, apply_chat_template, s.key)
        if problems:
            raise ConfigError(problems)
        counts = assign_teachers(records, tcfg, specs, renderers)
        if tcfg.routes:
            print("[opd] teachers by " + str(tcfg.route_by) + ": "
                  + ", ".join(f"{n} {counts.get(n, 0)} records" for n in (s.name for s in specs)), flush=True)
        # Running route servers: up, and sharing the student's tokenizer, before Ray starts.
        for name, scfg in servers.items():
            if name != DEFAULT and scfg.url:
                print(f"[opd] starting teacher {name} ({scfg.url})", flush=True)
                plan.handles[name] = start_teacher(scfg, None, run_dir)
                with TeacherClient.from_config(scfg, scfg.url) as probe:
                    probe.check_tokenizer(student_tok, student_name=student_path)
                    print(f"[opd] teacher {name}: {probe.describe()}", flush=True)  # what its backend found
        return plan

    def start(self, run_dir: Path, uses_gpus: bool, teardown: list, **start_kwargs) -> None:
        """Start the route servers the driver serves, on a side thread (as the
        default teacher's); each one's stop goes to `teardown` at once."""
        from cluster.teacher_proc import start_teacher
        from rollout.weight_sync import concrete_dtype

        if not self.models:
            return
        ex = cf.ThreadPoolExecutor(max_workers=len(self.models), thread_name_prefix="opd-teacher-start")
        for name, m in self.models.items():
            scfg = dataclasses.replace(self.servers[name], dtype=concrete_dtype(self.servers[name].dtype, uses_gpus))
            print(f"[opd] starting teacher {name} ({m.path})", flush=True)
            fut = ex.submit(start_teacher, scfg, m.path, Path(run_dir) / f"teacher_{name}",
                            num_gpus=scfg.tensor_parallel_size if uses_gpus else 0, model_ref=m, **start_kwargs)
            self.handles[name] = fut

            def stop(fut=fut) -> None:
                try:
                    handle = fut.result()
                except BaseException:  # noqa: BLE001 - it failed (start_teacher cleaned up)
                    return
                handle.stop()

            teardown.append(stop)
        ex.shutdown(wait=False)

    def failed_fast(self) -> None:
        """Raise the start error of a route server that already failed."""
        for h in self.handles.values():
            if isinstance(h, cf.Future) and h.done() and h.exception() is not None:
                h.result()

    def scorer(self, default_client, default_handle, teardown: list):
        """What the loop scores with: `default_client` (one teacher, the
        student's prompt: unchanged) or a TeacherSet of a client per teacher."""
        from rollout.teacher_client import TeacherClient, TeacherError

        if not custom_teachers(self.cfg.teacher):
            return default_client
        clients, limits = {}, {}
        for s in self.specs:
            h = default_handle if s.server == DEFAULT else self.handles[s.server]
            h = h.result() if isinstance(h, cf.Future) else h
            if s.name == DEFAULT and default_client is not None:
                client = default_client
            else:
                client = TeacherClient.from_config(dataclasses.replace(s.cfg, api_key_file=h.api_key_file), h.url)
                teardown.append(client.close)
            clients[s.name] = client
            if h.self_started:
                limits[s.name] = s.cfg.max_model_len
            else:
                try:
                    limits[s.name] = client.model_info().max_model_len
                except (TeacherError, AttributeError):
                    pass  # the server refuses a too-long sequence itself (a per-sequence error)
        teachers = TeacherSet(clients, limits)
        teardown.append(teachers.close)
        return teachers


def default_needed(tcfg) -> bool:
    """Whether the top-level teacher's server is used: it scores records (no
    routes, or teacher.unrouted=default) or a route shares it."""
    return DEFAULT in server_configs(tcfg, teacher_specs(tcfg))

"""Several teachers, each scoring its own records, and the teacher's own prompt.

`teacher.routes` maps the values of one record field (`teacher.route_by`,
e.g. `data_source`) to teachers: `data_source: math` -> teacher A, `code` ->
teacher B. Each route overrides what differs from the top-level teacher
(`teacher.*`, the "default" teacher): its url or model, backend, API key,
temperature, prompt, system prompt. A value that no route lists is refused at
start-up (`teacher.unrouted=error`), or scored by the default teacher
(`unrouted=default`).

`teacher.prompt` chooses what the teacher scores the student's completion
after. The completion token ids are always the student's own (the teacher and
the student share one tokenizer: the tokenizer check); only the prefix
changes, so the returned logprobs align with the completion tokens as they
are:
  * `student`: the student's prompt ids (no prefix of its own);
  * `own_template`: the record's `prompt` / `messages` rendered with the
    teacher's chat template (the tokenizer of the teacher's model);
  * `field:NAME`: the record's field NAME (text, or messages) as the prompt,
    e.g. a question with its reference solution: privileged context that the
    student never sees.
`teacher.system_prompt` adds a system message to the latter two.

Who calls what, in order (the driver, cluster/train.py, then cluster/stages.py):

    specs = teacher_specs(cfg.teacher)      # the teachers and their settings
    assign_teachers(records, cfg.teacher, specs, renderers)   # at start-up, every
        # train and eval record: its teacher and teacher prefix, or one
        # PromptDataError naming every bad record (exit 2, before any actor)
    teachers = TeacherSet({name: TeacherClient}, max_model_len)
    teachers.score(sequences, teachers=names)   # one call per step, split by
        # teacher (concurrently), merged back in input order

With one teacher and `teacher.prompt=student` the driver uses the plain
TeacherClient, as before: nothing here runs.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

from rollout.config import TeacherConfig
from rollout.prompts import PromptDataError, PromptRecord
from rollout.teacher_client import ScoreResult

# The name of the top-level teacher (teacher.*) in metrics and messages.
DEFAULT = "default"


@dataclasses.dataclass(frozen=True)
class TeacherSpec:
    """One teacher of the run."""

    name: str  # DEFAULT or the route's name
    key: str  # its settings' config key ("teacher", "teacher.routes[1]"), for messages
    cfg: TeacherConfig  # the top-level settings with this teacher's overrides (routes cleared)
    server: str  # the teacher whose server it scores on: its own name, or DEFAULT when it names neither url nor model


def teacher_specs(tcfg: TeacherConfig) -> list[TeacherSpec]:
    """The teachers that score records: the default one when it scores any
    (no routes, or unrouted=default), then each route in order."""
    base = dataclasses.replace(tcfg, route_by=None, routes=())
    out = []
    if not tcfg.routes or tcfg.unrouted == "default":
        out.append(TeacherSpec(DEFAULT, "teacher", base, DEFAULT))
    for i, r in enumerate(tcfg.routes):
        own = r.url is not None or bool(r.model)
        over: dict[str, Any] = {"url": r.url, "model": r.model} if own else {}
        for f in ("api_key_file", "temperature", "prompt", "system_prompt", "backend"):
            if getattr(r, f) is not None and hasattr(base, f):
                over[f] = getattr(r, f)
        out.append(TeacherSpec(r.name, f"teacher.routes[{i}]", dataclasses.replace(base, **over),
                               r.name if own else DEFAULT))
    return out


def server_configs(tcfg: TeacherConfig, specs: Sequence[TeacherSpec]) -> dict[str, TeacherConfig]:
    """{server name: its settings} of the servers the run scores on: DEFAULT's
    (the top-level teacher.*) when a teacher uses it, and each route's own."""
    out: dict[str, TeacherConfig] = {}
    for s in specs:
        if s.server == DEFAULT:
            out.setdefault(DEFAULT, dataclasses.replace(tcfg, route_by=None, routes=()))
        else:
            out[s.name] = s.cfg
    return out


def custom_teachers(tcfg: TeacherConfig) -> bool:
    """Whether the run needs this module: several teachers or a teacher prompt
    other than the student's."""
    return bool(tcfg.routes) or tcfg.prompt != "student"


# --------------------------------------------------------------------------
# Routing and prefixes (start-up, on the driver)
# --------------------------------------------------------------------------

def _field(record: PromptRecord, name: str) -> Any:
    """A record's field by its name in the data (reserved ones included)."""
    if name == "prompt":
        return record.text
    if name in ("messages", "answer"):
        return getattr(record, name)
    return record.metadata.get(name)


def route_of(record: PromptRecord, tcfg: TeacherConfig, table: Mapping[str, str]) -> str:
    """The name of the teacher of `record`; ValueError naming the record, the
    value and the keys to fix when it has none."""
    field = tcfg.route_by
    value = _field(record, field)
    if value is None:
        if tcfg.unrouted == "default":
            return DEFAULT
        raise ValueError(f"{record.where}: no field {field!r} (teacher.route_by) to pick its teacher; add it to "
                         f"the record, or set teacher.unrouted=default to have the top-level teacher score it")
    key = value if isinstance(value, str) else str(value) if isinstance(value, int) and not isinstance(value, bool) \
        else None
    if key is None:
        raise ValueError(f"{record.where}: field {field!r} (teacher.route_by) is {type(value).__name__} "
                         f"{value!r}; a route value must be a string or an integer")
    if key in table:
        return table[key]
    if tcfg.unrouted == "default":
        return DEFAULT
    raise ValueError(f"{record.where}: {field}={key!r} has no teacher: teacher.routes lists "
                     f"{sorted(table)}; add {key!r} to the values of a route (teacher.routes[i].values), or set "
                     f"teacher.unrouted=default to have the top-level teacher score it")


class PrefixRenderer:
    """Builds one teacher's prefix ids from a record (teacher.prompt other
    than student). `tokenizer`: the teacher's (its chat template; its token
    ids are the student's, checked at start-up); `apply_chat_template`: how
    text prompts are rendered for the student (data.apply_chat_template)."""

    def __init__(self, spec: str, system_prompt: str | None, tokenizer, apply_chat_template: bool, key: str):
        self.spec, self.system_prompt, self.tokenizer, self.key = spec, system_prompt, tokenizer, key
        self.field = spec[len("field:"):].strip() if spec.startswith("field:") else None
        # own_template always renders with the template; a field as the student's prompt is.
        self.templated = self.field is None or apply_chat_template
        if self.templated and not getattr(tokenizer, "chat_template", None):
            raise PromptDataError([
                f"{key}.prompt={spec} renders the teacher's prompt with its chat template, but the tokenizer "
                f"{getattr(tokenizer, 'name_or_path', '?')} has none; use a teacher tokenizer with a chat "
                f"template" + (", or data.apply_chat_template=false" if self.field is not None else "")])

    def __call__(self, record: PromptRecord) -> list[int]:
        """The prefix ids of `record`; ValueError naming the record when its
        field is missing or malformed."""
        if self.field is None:
            msgs = record.messages if record.messages is not None else [{"role": "user", "content": record.text}]
        else:
            value = _field(record, self.field)
            if isinstance(value, str) and value:
                if not self.templated:
                    ids = list(self.tokenizer(value, add_special_tokens=True)["input_ids"])
                    return self._nonempty(ids, record)
                msgs = [{"role": "user", "content": value}]
            elif isinstance(value, list) and value and all(
                    isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                    for m in value):
                if not self.templated:
                    raise ValueError(f"{record.where}: field {self.field!r} ({self.key}.prompt) holds messages, "
                                     f"which need a chat template, but data.apply_chat_template is false; give "
                                     f"text, or set data.apply_chat_template=true")
                msgs = value
            else:
                got = "missing" if value is None else f"{type(value).__name__} {str(value)[:60]!r}"
                raise ValueError(f"{record.where}: field {self.field!r} ({self.key}.prompt={self.spec}) must be "
                                 f"non-empty text or a list of {{'role', 'content'}} messages; it is {got}")
        if self.system_prompt is not None:
            if msgs and msgs[0].get("role") == "system":
                msgs = [{"role": "system", "content": f"{self.system_prompt}\n\n{msgs[0]['content']}"}] + list(msgs[1:])
            else:
                msgs = [{"role": "system", "content": self.system_prompt}] + list(msgs)
        try:
            text = self.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        except Exception as e:  # noqa: BLE001 - jinja templates raise anything (e.g. role order)
            raise ValueError(f"{record.where}: the teacher's chat template ({self.key}.prompt={self.spec}) failed "
                             f"on this record: {type(e).__name__}: {e}") from e
        return self._nonempty(list(self.tokenizer(text, add_special_tokens=False)["input_ids"]), record)

    def _nonempty(self, ids: list[int], record: PromptRecord) -> list[int]:
        if not ids:
            raise ValueError(f"{record.where}: the teacher's prompt ({self.key}.prompt={self.spec}) renders to no "
                             f"tokens")
        return ids


def assign_teachers(records: Sequence[PromptRecord], tcfg: TeacherConfig, specs: Sequence[TeacherSpec],
                    renderers: Mapping[str, PrefixRenderer]) -> dict[str, int]:
    """Set `record.teacher` (with routes) and `record.teacher_prefix_ids`
    (a teacher with a prompt of its own: `renderers[name]`) on every record;
    raise one PromptDataError naming every record without a teacher or whose
    teacher prompt cannot be built. Returns {teacher name: records}."""
    table = {v: r.name for r in tcfg.routes for v in r.values}
    names = {s.name for s in specs}
    problems: list[str] = []
    counts: dict[str, int] = {}
    for rec in records:
        try:
            name = route_of(rec, tcfg, table) if tcfg.routes else DEFAULT
            assert name in names, (name, names)
            render = renderers.get(name)
            rec.teacher = name if tcfg.routes else None
            rec.teacher_prefix_ids = render(rec) if render is not None else None
            counts[name] = counts.get(name, 0) + 1
        except ValueError as e:
            problems.append(str(e))
    if problems:
        raise PromptDataError(problems)
    return counts


# --------------------------------------------------------------------------
# Scoring with several teachers
# --------------------------------------------------------------------------

class TeacherSet:
    """One TeacherClient per teacher (`clients`, by name). `score` splits a
    call by teacher, runs the teachers' parts concurrently, and merges the
    ScoreResults back in input order (a sequence that failed stays None with
    its error, as with one client). A sequence longer than its teacher's
    `max_model_len` (when known) fails alone, with a message naming it,
    without being sent. Thread-safe."""

    def __init__(self, clients: Mapping[str, Any], max_model_len: Mapping[str, int] | None = None):
        if not clients:
            raise ValueError("TeacherSet needs at least one teacher")
        self.clients = dict(clients)
        self.max_model_len = dict(max_model_len or {})
        self._pool: cf.ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    @property
    def default(self):
        """The client of the top-level teacher (or the only one): /v1/generate."""
        return self.clients.get(DEFAULT) or next(iter(self.clients.values()))

    def generate(self, *args, **kwargs):
        return self.default.generate(*args, **kwargs)

    def score(self, sequences: Sequence[tuple[Sequence[int], int]], top_k: int | None = None,
              temperature: float | None = None, teachers: Sequence[str | None] | None = None,
              labels: Sequence[str] | None = None) -> ScoreResult:
        """Teacher log-probs of tokens start.. of each (token_ids, start), each
        sequence scored by teacher `teachers[i]` (None: the default teacher).
        top_k / temperature: None = each teacher's own (teacher.top_k, its
        temperature). `labels[i]` names sequence i in errors (e.g. the record).
        Metrics: the clients' teacher/* counters summed, teacher/latency_s the
        wall time of the whole call, and per teacher teacher/<name>/tokens and
        teacher/<name>/latency_s (with several teachers)."""
        t0 = time.monotonic()
        n = len(sequences)
        names = [DEFAULT if teachers is None or teachers[i] is None else teachers[i] for i in range(n)]
        groups: dict[str, list[int]] = {}
        errors: dict[int, str] = {}
        for i, name in enumerate(names):
            if name not in self.clients:
                raise ValueError(f"no teacher named {name!r}; teachers: {sorted(self.clients)}")
            limit = self.max_model_len.get(name)
            ids, start = sequences[i]
            if limit is not None and len(ids) > limit:
                where = f"{labels[i]}: " if labels is not None else ""
                errors[i] = (f"{where}the teacher's prompt ({start} tokens) + the completion ({len(ids) - start}) "
                             f"is {len(ids)} tokens, more than teacher {name!r}'s max_model_len {limit}; shorten "
                             f"the record's teacher prompt, or serve the teacher with a larger max_model_len")
                continue
            groups.setdefault(name, []).append(i)
        results = self._run({name: [sequences[i] for i in idx] for name, idx in groups.items()}, top_k, temperature)
        out_lp: list[Any] = [None] * n
        has_topk = any(r.top_ids is not None for r in results.values())
        out_ids: list[Any] | None = [None] * n if has_topk else None
        out_tlp: list[Any] | None = [None] * n if has_topk else None
        metrics: dict[str, float] = {}
        for name, idx in groups.items():
            res = results[name]
            for j, i in enumerate(idx):
                out_lp[i] = res.logprobs[j]
                if has_topk and res.top_ids is not None:
                    out_ids[i], out_tlp[i] = res.top_ids[j], res.top_logprobs[j]
            for j, why in res.errors:
                errors[idx[j]] = why if len(self.clients) == 1 else f"teacher {name!r}: {why}"
            for k, v in self._keys(name, res.metrics).items():
                metrics[k] = metrics.get(k, 0) + v
            if len(self.clients) > 1:
                metrics[f"teacher/{name}/tokens"] = res.metrics.get("teacher/tokens_scored", 0)
                metrics[f"teacher/{name}/latency_s"] = res.metrics.get("teacher/latency_s", 0.0)
        metrics["teacher/failed_sequences"] = len(errors)
        metrics["teacher/latency_s"] = time.monotonic() - t0
        return ScoreResult(out_lp, out_ids, out_tlp, sorted(errors.items()), metrics)

    def _run(self, parts: dict[str, list], top_k, temperature) -> dict[str, ScoreResult]:
        """Each teacher's part, concurrently (each client has its own event
        loop; a thread per part only waits on it). The first error raised
        (e.g. TeacherUnavailableError) is re-raised once the parts are done."""
        if len(parts) <= 1:
            return {name: self.clients[name].score(seqs, top_k=top_k, temperature=temperature)
                    for name, seqs in parts.items()}
        with self._lock:
            if self._pool is None:
                self._pool = cf.ThreadPoolExecutor(max_workers=len(self.clients), thread_name_prefix="opd-teachers")
        futs = {name: self._pool.submit(self.clients[name].score, seqs, top_k=top_k, temperature=temperature)
                for name, seqs in parts.items()}
        cf.wait(futs.values())
        return {name: f.result() for name, f in futs.items()}

    def _keys(self, name: str, metrics: dict[str, float]) -> dict[str, float]:
        """One client's metrics as this set reports them: with several
        teachers, a teacher's per-replica keys carry its name
        (`teacher/<name>/replica<i>/*`); the other keys are summed over teachers."""
        if len(self.clients) == 1:
            return metrics
        return {(f"teacher/{name}/{k.split('/', 1)[1]}" if k.startswith("teacher/replica") else k): v
                for k, v in metrics.items()}

    def metrics(self) -> dict[str, float]:
        """The clients' cumulative counters, summed (per-replica keys per teacher)."""
        out: dict[str, float] = {}
        for name, c in self.clients.items():
            for k, v in self._keys(name, c.metrics()).items():
                out[k] = out.get(k, 0) + v
        return out

    def close(self) -> None:
        for c in self.clients.values():
            c.close()
        if self._pool is not None:
            self._pool.shutdown(wait=False)

    def __repr__(self) -> str:
        return f"TeacherSet({', '.join(f'{k}={v!r}' for k, v in self.clients.items())})"


def per_teacher_kl(names: Sequence[str], sampler_lp: Sequence[Sequence[float]],
                   teacher_lp: Sequence[Sequence[float]], prefix: str = "teacher") -> dict[str, float]:
    """{`prefix`/<name>/reverse_kl: mean lp_sampler - lp_teacher over that
    teacher's tokens} (the per-teacher share of teacher/reverse_kl)."""
    sums: dict[str, list[float]] = {}
    for name, s_lp, t_lp in zip(names, sampler_lp, teacher_lp, strict=True):
        acc = sums.setdefault(name, [0.0, 0])
        acc[0] += sum(s - t for s, t in zip(s_lp, t_lp, strict=True))
        acc[1] += len(t_lp)
    return {f"{prefix}/{name}/reverse_kl": s / max(1, k) for name, (s, k) in sums.items()}

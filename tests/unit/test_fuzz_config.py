"""Property-based fuzzing of the config loader: whatever the
YAML data, overrides or file bytes, `config_from_dict` / `load_config` return a
valid `Config` or raise `ConfigError` whose problems are non-empty strings that
each name a key; never another exception.

    .venv/bin/python -m pytest tests/unit/test_fuzz_config.py -x -q

The strategies draw keys mostly from the real tree (so values reach every type
conversion: Literal, unions, tuples, bool/int/float/str) and values from YAML's
scalar space (huge ints, nan/inf, tagged scalars, anchors, deep nesting).
`test_found_by_fuzzing` pins the inputs that crashed the loader before the fixes
in cluster/config.py (`_show`, the 64-bit int range, float overflow, YAML
constructor errors, deep nesting).
"""

from __future__ import annotations

import dataclasses
import math
import pickle
import typing

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from cluster.config import Config, ConfigError, config_from_dict, load_config, to_dict

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _tree(cls, prefix: str = "") -> dict[str, list[str]]:
    """section path -> its field names, for every section of the tree ("" = top level)."""
    hints = typing.get_type_hints(cls)
    out = {prefix: [f.name for f in dataclasses.fields(cls)]}
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out.update(_tree(hints[f.name], f"{prefix}.{f.name}" if prefix else f.name))
    return out


SECTIONS = _tree(Config)
ALL_KEYS = sorted({f"{s}.{n}" if s else n for s, names in SECTIONS.items() for n in names})
TOP_LEVEL = set(SECTIONS[""])

YAML_TEXTS = ["1e-5", "1e400", "-.inf", ".nan", "~", "null", "true", "no", "[1, 2]", "[0.9, 0.99]", "{a: 1}",
              "!!float abc", "!!int abc", "!!timestamp x", "!!binary ~~~", "!!python/name:os.system", "&a [*a]",
              "*undefined", "'quoted'", "\"unterminated", "[" * 300, "9" * 5000, "0x1F", "0o17", "1_000",
              "2001-12-14", "reverse_kl", "async", "PACK", "gloo", ": :", "- a\n- b", "\x00", "\t", ""]

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(min_value=-2**70, max_value=2**70),
    st.integers(4400, 4500).map(lambda d: 10**d), st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
    st.sampled_from(["reverse_kl", "jsd", "sync", "async", "float32", "bfloat16", "teacher", "student", "auto",
                     "tiny:student", "tiny:teacher", "PACK", "nccl", "gloo", "cosine", "token"]),
    st.sampled_from([0, 1, 2, 3, -1, 0.5, 1.0, 1e-5, 2**63, -2**63 - 1, 1e300]),
)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
    st.text(max_size=6) | st.sampled_from(ALL_KEYS), inner, max_size=4), max_leaves=12)


@st.composite
def config_data(draw) -> dict:
    """A nested dict shaped like the tree: real section/field names mostly, some
    unknown keys, values of any type (sections sometimes replaced by a scalar)."""
    # Mostly with the required keys, so that valid trees are reached too.
    data: dict = ({"student": {"model": "org/m"}, "teacher": {"model": "org/t"}, "data": {"train": "t.jsonl"}}
                  if draw(st.integers(0, 3)) else {})
    for section in draw(st.lists(st.sampled_from(sorted(TOP_LEVEL)), max_size=6, unique=True)):
        if draw(st.integers(0, 9)) == 0:
            data[section] = draw(values)  # a section that is not a mapping
            continue
        names = SECTIONS.get(section, [])
        node = dict(data.get(section, {}))
        for name in draw(st.lists(st.sampled_from(names) | st.text(max_size=6), max_size=5, unique=True)):
            sub = f"{section}.{name}"
            if sub in SECTIONS and draw(st.booleans()):
                node[name] = {n: draw(values) for n in draw(st.lists(st.sampled_from(SECTIONS[sub]), max_size=3,
                                                                     unique=True))}
            else:
                node[name] = draw(values)
        data[section] = node
    if draw(st.integers(0, 4)) == 0:
        data[draw(st.text(max_size=6) | st.integers())] = draw(values)
    return data


override_keys = st.sampled_from(ALL_KEYS) | st.text(max_size=15) | st.sampled_from(
    ["", ".", "learner..lr", "learner.lr.x", "student", "log.wandb.mode", " learner.lr"])
override_values = st.sampled_from(YAML_TEXTS) | st.text(max_size=20) | st.integers().map(str) | st.floats().map(repr)
overrides = st.lists(st.one_of(st.builds(lambda k, v: f"{k}={v}", override_keys, override_values),
                               st.text(max_size=20)), max_size=5)


def names_a_key(problem: str) -> bool:
    """A problem starts with the key it is about: a section path of the tree, an
    unknown key (followed by ': unknown key'), an override, or the whole config."""
    head = problem.split(":")[0].split("=")[0].split(" ")[0].split("[")[0].split(".")[0]
    return (head in TOP_LEVEL or problem.startswith(("override ", "the config"))
            or ": unknown key" in problem or head.startswith(("data", "loss", "train")))


def check_outcome(fn) -> None:
    try:
        cfg = fn()
    except ConfigError as e:
        assert e.problems, "a ConfigError must carry at least one problem"
        for p in e.problems:
            assert isinstance(p, str) and p.strip(), e.problems
            assert names_a_key(p), f"problem does not name a key: {p!r}"
        again = pickle.loads(pickle.dumps(e))  # crosses Ray actor boundaries
        assert again.problems == e.problems
        return
    assert isinstance(cfg, Config)
    # A resolved config is itself a valid input that resolves to the same tree.
    assert repr(to_dict(config_from_dict(to_dict(cfg)))) == repr(to_dict(cfg))


@SETTINGS
@given(data=config_data(), ovs=overrides)
@example(data={}, ovs=["learner.lr=" + "9" * 400])
@example(data={"learner": {"lr": 10**400}}, ovs=[])
def test_config_from_dict_never_crashes(data, ovs):
    check_outcome(lambda: config_from_dict(data, ovs))


@SETTINGS
@given(data=st.dictionaries(st.text(max_size=8), values, max_size=4) | values, ovs=overrides)
def test_arbitrary_top_level_never_crashes(data, ovs):
    # Not even shaped like the tree: lists, scalars, unknown keys at the top.
    check_outcome(lambda: config_from_dict(data, ovs))


@settings(max_examples=150, deadline=None)
@given(raw=st.binary(max_size=200) | st.text(max_size=200).map(str.encode)
       | st.lists(st.sampled_from(["student:", "  model: x", "learner:", "  lr: 1e-5", "  lr: !!float x", "- 1",
                                   "train: {steps: 9999999999999999999999999}", "&a x: *a", "{", "\t", "\xff",
                                   "rollout:\n  stop: [a, b]"]), max_size=6).map(lambda ls: "\n".join(ls).encode()),
       ovs=overrides)
def test_load_config_file_never_crashes(tmp_path_factory, raw, ovs):
    path = tmp_path_factory.mktemp("cfg") / "config.yaml"
    path.write_bytes(raw)

    def load():
        try:
            return load_config(path, ovs)
        except ConfigError as e:
            # File-level problems start with the file's path: accept that as the key.
            e.problems = [p.replace(str(path), "the config") for p in e.problems]
            raise

    check_outcome(load)


@pytest.mark.parametrize("data,ovs,needle", [
    ({}, ["learner.lr=" + "9" * 400], "learner.lr"),             # was OverflowError (int -> float)
    ({"learner": {"lr": 10**400}}, [], "learner.lr"),              # was OverflowError
    ({}, ["learner.lr=!!float abc"], "learner.lr"),                # was ValueError from yaml's constructor
    ({}, ["train.steps=!!int abc"], "train.steps"),                # was ValueError
    ({}, ["run.seed=!!timestamp x"], "run.seed"),                  # was AttributeError
    ({}, ["train.steps=" + "9" * 5000], "train.steps"),            # was ValueError (int str digits limit)
    ({"student": {"model": 10**5000}}, [], "student.model"),       # was ValueError in str()
    ({"train": {"steps": 2**64}}, [], "train.steps"),              # now: outside the 64-bit range
    ({"train": {"steps": True}}, [], "train.steps"),
    ({"teacher": {"temperature": 0}}, [], "teacher.temperature"),  # was ZeroDivisionError in the temperature rule
    ({10**5000: 1}, [], "unknown key"),                            # was ValueError formatting the key
])
def test_found_by_fuzzing(data, ovs, needle):
    with pytest.raises(ConfigError) as ei:
        config_from_dict(data, ovs)
    assert any(needle in p for p in ei.value.problems), ei.value.problems
    assert all(len(p) < 1000 for p in ei.value.problems), "problem messages are cut, not 5000-digit dumps"


def test_deeply_nested_data_is_a_config_error():
    deep: list = []
    for _ in range(5000):
        deep = [deep]
    with pytest.raises(ConfigError, match="nests deeper"):
        config_from_dict({"rollout": {"stop": deep}})


def test_valid_edge_values_still_load():
    # The range check must not refuse legitimate values.
    required = ["student.model=org/m", "teacher.model=org/t", "data.train=t.jsonl"]
    cfg = config_from_dict({"run": {"seed": 2**63 - 1}, "learner": {"lr": "1e-5"}}, ["train.steps=3.0"] + required)
    assert cfg.run.seed == 2**63 - 1 and math.isclose(cfg.learner.lr, 1e-5) and cfg.train.steps == 3
    # Nesting past YAML's recursion limit (was a RecursionError): the text is kept as a string.
    assert config_from_dict({}, ["student.model=" + "[" * 2000, "data.train=t", "teacher.model=t"]).student.model == "[" * 2000

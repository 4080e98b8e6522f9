"""The student init's cache keys and its teacher-trace cache (recipes/carry_sft.py)."""

import pytest

from recipes.carry_sft import StudentRecipe, cached_traces


def test_traces_key_is_shared_by_inits_that_differ_only_in_the_student():
    base = StudentRecipe(spec="student-1l", n0=4096, seed=0, schedule="cosine", lr=1e-3, batch_size=256)
    same_data = [StudentRecipe(spec="student", n0=4096, seed=0, schedule="cosine", lr=1e-3, batch_size=256),
                 StudentRecipe(spec="student-1l", n0=4096, seed=0, schedule="constant", lr=3e-3, batch_size=64,
                               epochs=2, points=1)]
    other_data = [StudentRecipe(spec="student-1l", n0=8192, seed=0),
                  StudentRecipe(spec="student-1l", n0=4096, seed=1),
                  StudentRecipe(spec="student-1l", n0=4096, seed=0, temperature=0.5)]
    assert {r.traces_key("t") for r in same_data} == {base.traces_key("t")}
    assert base.traces_key("t") != base.traces_key("other-teacher")
    assert len({r.traces_key("t") for r in other_data} | {base.traces_key("t")}) == 4
    # The models themselves keep distinct keys; one pass keeps the key it had before `epochs` existed.
    assert len({r.key("t") for r in [base, *same_data]}) == 3
    assert StudentRecipe(epochs=1).key("t") == StudentRecipe().key("t") != StudentRecipe(epochs=2).key("t")


def test_cached_traces_sample_once_and_reload_the_same_traces(tmp_path):
    calls = []

    def sample():
        calls.append(1)
        return [{"prompt": f"{i}=", "answer": str(i * 7)} for i in range(5)]

    path = tmp_path / "sub" / "traces.jsonl"
    first, gen_s = cached_traces(path, sample, log=lambda *_: None)
    again, gen_s2 = cached_traces(path, sample, log=lambda *_: None)
    assert calls == [1]
    assert again == first and gen_s2 == gen_s >= 0
    assert not [p for p in path.parent.iterdir() if p.name != path.name]   # no temporary file left behind


def test_a_failed_sampling_leaves_no_cache_file(tmp_path):
    def sample():
        raise KeyboardInterrupt

    path = tmp_path / "traces.jsonl"
    with pytest.raises(KeyboardInterrupt):
        cached_traces(path, sample, log=lambda *_: None)
    assert not path.exists()


@pytest.mark.parametrize("bad, match", [({"epochs": 0}, "epochs=0"), ({"schedule": "linear"}, "schedule='linear'")])
def test_a_bad_init_recipe_fails_before_any_trace_is_sampled(tmp_path, bad, match):
    from recipes.carry_sft import train_student

    # No teacher exists at the path: the recipe must be refused before it is read.
    with pytest.raises(ValueError, match=match):
        train_student(StudentRecipe(**bad), tmp_path / "no-teacher", tmp_path / "out", log=lambda *_: None)

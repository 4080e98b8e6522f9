"""Pure logic of chunked rollouts (cluster/loop.py): how a step's prompts are
split and how the chunks' metrics combine. The driver runs with chunks in
tests/e2e/test_cluster.py."""

import pytest

from cluster.config import ConfigError, load_config
from cluster.loop import chunk_seed, merge_chunk_metrics, split_records


@pytest.mark.parametrize("n,chunks", [(1, 1), (7, 1), (7, 2), (7, 3), (8, 4), (5, 9)])
def test_split_records_is_contiguous_near_equal_and_complete(n, chunks):
    recs = list(range(n))
    parts = split_records(recs, chunks)
    assert [x for p in parts for x in p] == recs
    assert len(parts) == min(chunks, n)
    assert all(parts)
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_chunk_seeds_keep_step_seed_for_the_first_chunk_and_differ():
    assert chunk_seed(1234, 0) == 1234
    seeds = {chunk_seed(1234, i) for i in range(8)}
    assert len(seeds) == 8
    assert all(0 <= s < 2**31 for s in seeds)


def test_merge_chunk_metrics_sums_counts_weights_averages_and_recomputes_rates():
    a = {"rollout/completions": 4, "rollout/completion_tokens": 40, "rollout/mean_completion_len": 10.0,
         "rollout/finished_frac": 1.0, "rollout/tokens_per_s": 40.0, "time/sample_s": 1.0,
         "teacher/tokens_scored": 40, "teacher/reverse_kl": 1.0, "teacher/mean_logprob": -1.0,
         "time/teacher_s": 2.0, "teacher/tokens_per_s": 20.0, "teacher/retries": 1}
    b = {"rollout/completions": 12, "rollout/completion_tokens": 60, "rollout/mean_completion_len": 5.0,
         "rollout/finished_frac": 0.5, "rollout/tokens_per_s": 20.0, "time/sample_s": 3.0,
         "teacher/tokens_scored": 60, "teacher/reverse_kl": 2.0, "teacher/mean_logprob": -3.0,
         "time/teacher_s": 2.0, "teacher/tokens_per_s": 30.0, "teacher/retries": 2}
    m = merge_chunk_metrics([a, b])
    assert m["rollout/completions"] == 16 and m["rollout/completion_tokens"] == 100
    assert m["rollout/mean_completion_len"] == pytest.approx(100 / 16)
    assert m["rollout/finished_frac"] == pytest.approx((4 * 1.0 + 12 * 0.5) / 16)
    assert m["time/sample_s"] == pytest.approx(4.0) and m["time/teacher_s"] == pytest.approx(4.0)
    assert m["rollout/tokens_per_s"] == pytest.approx(100 / 4.0)
    assert m["teacher/tokens_per_s"] == pytest.approx(100 / 4.0)
    # Token-weighted: the merged KL is that of all 100 tokens together.
    assert m["teacher/reverse_kl"] == pytest.approx((40 * 1.0 + 60 * 2.0) / 100)
    assert m["teacher/mean_logprob"] == pytest.approx((40 * -1.0 + 60 * -3.0) / 100)
    assert m["teacher/retries"] == 3


def test_rollout_chunks_config_is_validated(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("student:\n  model: org/s\nteacher:\n  model: org/t\ndata:\n  train: t.jsonl\ntrain:\n  prompts_per_step: 4\n")
    assert load_config(cfg, ["train.rollout_chunks=4"]).train.rollout_chunks == 4
    with pytest.raises(ConfigError, match="rollout_chunks"):
        load_config(cfg, ["train.rollout_chunks=5"])
    with pytest.raises(ConfigError, match="rollout_chunks"):
        load_config(cfg, ["train.rollout_chunks=0"])

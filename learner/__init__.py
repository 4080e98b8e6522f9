"""The learner stage: DeepSpeed training of the student on scored rollout batches.

- `losses.py`: the distillation objectives (reverse_kl, *_topk, jsd, sft), pure torch.
- `batching.py`: rank split, token-budget micro-batches, collation (pure).
- `worker.py`: `LearnerWorker`, one DeepSpeed rank (a Ray actor).
- `group.py`: `LearnerGroup`, all ranks as one (what the driver holds).
- `checkpoint.py`: the learners' checkpoint shards (meta.json) and the shared fsync/atomic-write helpers;
  the run's checkpoint protocol (staging, commit, `latest`, retention) is cluster/checkpoint.py.
- `weight_sender.py`: the sending side of weight sync (gloo on CPU, vLLM NCCL on GPU).

Never imports vllm at module level (weight_sender's NCCL path imports it lazily).
"""

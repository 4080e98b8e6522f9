"""learner/worker.disable_dropout: the learner scores the function vLLM
samples from (vLLM never applies dropout), while training in train mode.

    .venv/bin/python -m pytest tests/unit/test_dropout.py -q
"""

from __future__ import annotations

import torch

from learner.worker import disable_dropout


def _tiny_models():
    from transformers import GPT2Config, GPT2LMHeadModel, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    qwen = Qwen2ForCausalLM(Qwen2Config(vocab_size=64, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                        num_key_value_heads=1, intermediate_size=64, attention_dropout=0.5))
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=64, n_layer=2, n_head=2, n_positions=32,
                                      bos_token_id=0, eos_token_id=0))
    return {"qwen2 (attention_dropout)": qwen, "gpt2 (resid/embd/attn_pdrop, nn.Dropout)": gpt2}


def test_train_mode_forward_is_the_eval_forward_after_disable_dropout():
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    for name, model in _tiny_models().items():
        model.eval()
        with torch.no_grad():
            want = model(ids).logits
        model.train()
        with torch.no_grad():
            noisy = model(ids).logits
        assert not torch.equal(noisy, want), f"{name}: dropout is not active in train mode, the test proves nothing"
        changed = disable_dropout(model)
        assert changed, name
        assert model.training
        with torch.no_grad():
            for _ in range(2):
                assert torch.equal(model(ids).logits, want), name
        assert disable_dropout(model) == []  # nothing left to change

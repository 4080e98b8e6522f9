"""Benchmark: memory and time of the learner's log-prob step (logits ->
log-probs of the sampled token and the teacher's top-k -> loss -> backward
into the logits), the plain way against `learner.logprobs.gathered_logprobs`.

    .venv/bin/python -m bench.logprob_memory                           # CPU, Qwen's 151936 vocabulary
    python -m bench.logprob_memory --device cuda --tokens 4096 32768 --chunk-mb 64 256 1024   # GPU: torch.cuda peak

plain   = what the learner did before: index the completion rows out of the
          logits, .float(), log_softmax over the vocabulary, gather (autograd
          keeps the float32 log-softmax and makes float32 gradients of it);
chunked = gathered_logprobs: a float32 chunk at a time, one logsumexp per row
          saved, the gradient written straight into the logits' dtype.
Both start from the same bf16 logits (the model's output, which needs its own
gradient either way). Each (variant, size) runs in a fresh process; the
memory column is its peak above the moment the logits existed (CPU: peak RSS,
ru_maxrss; GPU: torch.cuda.max_memory_allocated). Values and gradients of the
two agree (printed as max abs differences).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _plain(logits_B_L_V, pos_B_T, ids_B_T_K, temperature):
    import torch

    rows = torch.arange(logits_B_L_V.shape[0], device=logits_B_L_V.device)[:, None]
    x = logits_B_L_V[rows, pos_B_T].float()
    return torch.log_softmax(x / temperature if temperature != 1.0 else x, dim=-1).gather(-1, ids_B_T_K)


def _chunked(logits_B_L_V, pos_B_T, ids_B_T_K, temperature, chunk_mb: int = 64):
    from learner.logprobs import completion_logprobs

    return completion_logprobs(logits_B_L_V, pos_B_T, ids_B_T_K, temperature, chunk_bytes=chunk_mb << 20)


def child(variant: str, tokens: int, vocab: int, topk: int, device: str, temperature: float) -> dict:
    """One measurement in this (fresh) process. `variant`: plain, or
    chunked-<MiB> (gathered_logprobs with chunk_bytes = MiB << 20)."""
    import functools

    import torch

    torch.manual_seed(0)
    B = 4
    L = tokens // B
    T = L - L // 4  # a quarter of each row is prompt
    # Drawn in bf16 directly: a float32 temporary would set the process's peak
    # RSS (ru_maxrss) before the measurement starts.
    logits = torch.empty(B, L, vocab, device=device, dtype=torch.bfloat16).normal_(0.0, 2.0).requires_grad_()
    pos = (torch.arange(T, device=device) + (L - T - 1))[None].expand(B, T)
    ids = torch.randint(0, vocab, (B, T, 1 + topk), device=device)
    w = torch.randn(B, T, 1 + topk, device=device)
    fn = _plain if variant == "plain" else functools.partial(_chunked, chunk_mb=int(variant.split("-")[1]))
    # Warm up on a small input (kernel loading, allocator) so the timing below
    # is of the work, not of the process's first call.
    small = torch.zeros(1, 8, vocab, device=device, dtype=torch.bfloat16, requires_grad=True)
    fn(small, torch.arange(1, 7, device=device)[None], ids[:1, :6], temperature).sum().backward()
    del small
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20
    else:
        base = _rss_mib()
    t0 = time.perf_counter()
    lp = fn(logits, pos, ids, temperature)
    loss = (lp * w).sum()
    loss.backward()
    if device == "cuda":
        torch.cuda.synchronize()
    secs = time.perf_counter() - t0
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    g = logits.grad.float()
    return {"variant": variant, "tokens": B * T, "padded_tokens": B * L, "vocab": vocab, "topk": topk,
            "extra_mib": peak - base, "logits_mib": logits.numel() * 2 / 2**20, "seconds": secs,
            "lp_sum": float(lp.double().sum()), "lp_first": lp[0, :4, 0].double().tolist(),
            "grad_abs_sum": float(g.abs().sum()), "grad_first": g[0, L - T - 1, :4].tolist()}


def run(variant, tokens, vocab, topk, device, temperature) -> dict:
    cmd = [sys.executable, "-m", "bench.logprob_memory", "--child", variant, "--tokens", str(tokens),
           "--vocab", str(vocab), "--topk", str(topk), "--device", device, "--temperature", str(temperature)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:
        return {"variant": variant, "tokens": tokens, "error": (out.stderr or out.stdout)[-400:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096], help="padded tokens per micro-batch")
    ap.add_argument("--vocab", type=int, default=151936, help="151936 = Qwen2/Qwen3")
    ap.add_argument("--topk", type=int, nargs="+", default=[0, 20], help="teacher top-k ids scored besides the token")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--chunk-mb", type=int, nargs="+", default=[16, 64],
                    help="gathered_logprobs chunk sizes to measure (learner defaults: 16 on CPU, 64 on CUDA)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.tokens[0], args.vocab, args.topk[0], args.device, args.temperature)))
        return 0
    variants = ["plain"] + [f"chunked-{c}" for c in args.chunk_mb]
    rows = []
    for topk in args.topk:
        for tokens in args.tokens:
            res = {v: run(v, tokens, args.vocab, topk, args.device, args.temperature) for v in variants}
            rows.append(res)
            print("#", json.dumps(res), flush=True)
    print(f"\nlog-prob step (forward + backward into bf16 logits), vocab {args.vocab}, device {args.device}, "
          f"temperature {args.temperature}; MiB = peak above the logits; ratios = plain / chunked")
    print(f"{'tokens':>8}{'top-k':>7}{'logits MiB':>12}{'variant':>14}{'MiB':>9}{'mem ratio':>11}"
          f"{'s':>8}{'time ratio':>12}{'|dlp|':>10}{'|dgrad|':>10}")
    for res in rows:
        p = res["plain"]
        for v in variants:
            c = res[v]
            if "error" in c:
                print(f"{c['tokens']:>8}{'':>7}{'':>12}{v:>14}  error: {c['error']!r}")
                continue
            if "error" in p:
                print(f"{c['padded_tokens']:>8}{c['topk']:>7}{c['logits_mib']:>12.0f}{v:>14}{c['extra_mib']:>9.0f}"
                      f"{'-':>11}{c['seconds']:>8.2f}")
                continue
            dlp = max(abs(a - b) for a, b in zip(p["lp_first"], c["lp_first"], strict=True))
            dg = max(abs(a - b) for a, b in zip(p["grad_first"], c["grad_first"], strict=True))
            print(f"{c['padded_tokens']:>8}{c['topk']:>7}{c['logits_mib']:>12.0f}{v:>14}{c['extra_mib']:>9.0f}"
                  f"{p['extra_mib'] / max(c['extra_mib'], 1e-9):>10.1f}x{c['seconds']:>8.2f}"
                  f"{p['seconds'] / c['seconds']:>11.2f}x{dlp:>10.1e}{dg:>10.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

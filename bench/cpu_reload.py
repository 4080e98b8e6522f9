"""Benchmark: what loading new weights into a live vLLM CPU engine costs, with
no transport at all, next to one memcpy of the same bytes, per GEMM layout
(rollout.cpu_gemm): why bench/weight_sync.py is far from 3x the copy floor
with vLLM's default layout, and what the plain layout costs in generation.

    .venv/bin/python -m bench.cpu_reload                          # student-25m, teacher-100m
    .venv/bin/python -m bench.cpu_reload --models student-25m --rounds 3

Two engines per model (an in-process `vllm.LLM`, fp32, enforce_eager), each in
its own subprocess, alternating over the rounds:

* `onednn` - vLLM's CPU default and opd's (`rollout.cpu_gemm=onednn`): every
  linear layer's weight is re-packed into a oneDNN GEMM handler after loading
  (the plain weight is dropped). A new set of weights therefore has to go
  through vLLM's layerwise reload (`initialize_layerwise_reload` +
  `load_weights` + `finalize_layerwise_reload`), which re-materializes the
  layers and re-packs every linear weight: what opd_gloo/opd_shm receivers do.
* `plain` - `rollout.cpu_gemm=plain`: the engine is loaded through opd's
  "opd_cpu_plain_gemm" model loader (rollout/weight_receiver.py), so the
  linears multiply with `torch.nn.functional.linear` on their plain weight
  and `model.load_weights` copies new ones in place, with no reload (the
  receivers then replay those copies, rollout/copy_plan.py; not timed here).

Per engine: seconds to load one full set of weights (median over 5), the
memcpy floor of the same bytes, and seconds for one generate of 128 prompts x
32 tokens (the price of the plain layout). After an update with perturbed
weights each engine's prompt logprobs are compared with transformers' (both
layouts load correctly). Not used by the trainer: this only measures the
trade-off.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def _child(mode: str, name: str) -> dict:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    import torch

    from bench.weight_sync import copy_floor_s
    from cluster.tiny_models import build_model

    path = str(build_model(name))
    from transformers import AutoModelForCausalLM
    from vllm import LLM, SamplingParams
    from vllm.model_executor.model_loader.reload import finalize_layerwise_reload, initialize_layerwise_reload

    from rollout.weight_receiver import PLAIN_GEMM_LOAD_FORMAT

    extra = {"load_format": PLAIN_GEMM_LOAD_FORMAT} if mode == "plain" else {}
    llm = LLM(path, dtype="float32", enforce_eager=True, max_model_len=256, seed=0, **extra)
    prompts = [{"prompt_token_ids": [5 + (i % 50), 6, 7, 8]} for i in range(128)]
    sp = SamplingParams(temperature=1.0, max_tokens=32, ignore_eos=True, seed=0)
    llm.generate(prompts[:8], sp, use_tqdm=False)
    gen = []
    for _ in range(3):
        t = time.perf_counter()
        llm.generate(prompts, sp, use_tqdm=False)
        gen.append(time.perf_counter() - t)

    model = llm.llm_engine.model_executor.driver_worker.worker.model_runner.model
    model_config = llm.llm_engine.model_config
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)

    def load(state: dict) -> None:
        with torch.no_grad():
            if mode == "plain":
                model.load_weights(list(state.items()))
            else:
                initialize_layerwise_reload(model)
                model.load_weights(list(state.items()))
                finalize_layerwise_reload(model, model_config)

    state = {k: v.clone() for k, v in hf.state_dict().items()}
    nbytes = sum(v.numel() * v.element_size() for v in state.values())
    loads = []
    for _ in range(5):
        t = time.perf_counter()
        load(state)
        loads.append(time.perf_counter() - t)
    floor = copy_floor_s(nbytes, 5)

    # Correctness of each layout after an update: perturbed weights, prompt logprobs vs transformers.
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=g))
    load({k: v.clone() for k, v in hf.state_dict().items()})
    ids = list(range(5, 21))
    out = llm.generate([{"prompt_token_ids": ids}], SamplingParams(max_tokens=1, prompt_logprobs=0),
                       use_tqdm=False)[0]
    got = [next(iter(d.values())).logprob for d in out.prompt_logprobs[1:]]
    with torch.no_grad():
        lp = torch.log_softmax(hf(torch.tensor([ids])).logits[0, :-1], -1)
    want = [lp[i, ids[i + 1]].item() for i in range(len(ids) - 1)]
    return {"mode": mode, "model": name, "mib": nbytes / 2**20, "load_s": statistics.median(loads),
            "floor_s": floor, "generate_s": statistics.median(gen),
            "max_abs_logprob_diff": max(abs(a - b) for a, b in zip(got, want))}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["student-25m", "teacher-100m"])
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds of (onednn, plain)")
    ap.add_argument("--child", nargs=2, metavar=("MODE", "MODEL"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(_child(*args.child)), flush=True)
        return

    results: dict[tuple[str, str], list[dict]] = {}
    for name in args.models:
        for r in range(args.rounds):
            for mode in ("onednn", "plain"):
                print(f"[cpu_reload] {name} {mode} round {r + 1}/{args.rounds}", flush=True)
                proc = subprocess.run([sys.executable, "-m", "bench.cpu_reload", "--child", mode, name],
                                      capture_output=True, text=True)
                line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
                if proc.returncode != 0 or line is None:
                    sys.exit(f"[cpu_reload] {name} {mode} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
                results.setdefault((name, mode), []).append(json.loads(line[len("RESULT "):]))

    def med(rows, key):
        return statistics.median(x[key] for x in rows)

    print(f"\nvLLM CPU weight load without transport, fp32, median of {args.rounds} rounds "
          f"({os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f})")
    print(f"{'model':<14}{'MiB':>8}{'layout':>8}{'load s':>9}{'memcpy s':>10}{'load/memcpy':>12}"
          f"{'generate s':>12}{'gen/onednn':>11}{'max|dlogp|':>12}")
    for name in args.models:
        base_gen = med(results[(name, "onednn")], "generate_s")
        for mode in ("onednn", "plain"):
            rows = results[(name, mode)]
            load, floor, gen = med(rows, "load_s"), med(rows, "floor_s"), med(rows, "generate_s")
            print(f"{name:<14}{rows[0]['mib']:>8.1f}{mode:>8}{load:>9.4f}{floor:>10.4f}{load / floor:>11.1f}x"
                  f"{gen:>12.3f}{gen / base_gen:>10.2f}x{max(x['max_abs_logprob_diff'] for x in rows):>12.1e}")


if __name__ == "__main__":
    main()

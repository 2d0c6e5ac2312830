#!/usr/bin/env python3
"""Side-by-side reference for dsv4-bench (shared/design/BENCHMARKS.md "Side by side"): the same preset in Hugging Face
transformers DeepseekV4 (eager attention), same batch and sequence, forward and forward+backward, median of N steps
after a warm-up. Prints one line per measurement in the format of `dsv4-bench model`.

  CPU, FP32:  tests/ref/.venv/bin/python tests/ref/bench/hf_bench.py --preset tiny --batch 2 --seq 128 --threads 1
              build/bin/dsv4-bench model --preset tiny --batch 2 --seq 128 --threads 1
  GPU, BF16:  python3 tests/ref/bench/hf_bench.py --preset proxy-2b --batch 1 --seq 4096 --device cuda --dtype bf16

Presets mirror src/model/config.cpp (model_preset); MTP is not built by transformers, so compare with dsv4's
forward+backward knowing dsv4 also runs its MTP block (see the FLOP line dsv4-bench prints).
"""
import argparse
import statistics
import time

import torch
import transformers
from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

CSA, HCA, SWA = "compressed_sparse_attention", "heavily_compressed_attention", "sliding_attention"


def v4_proxy(dim, layers, heads, q_lora, groups, o_lora, experts, inter, index_heads, index_dim, index_topk):
    """The proxies of shared/design/BENCHMARKS.md, as src/model/config.cpp's proxy(): V4's shape rules (head_dim 512,
    64 rope dims, window 128, CSA 4 / HCA 128, 3 hash layers, top-6, vocab 129280), SWA, SWA, then CSA/HCA."""
    kinds = [SWA, SWA] + [CSA if i % 2 == 0 else HCA for i in range(2, layers)]
    return dict(vocab_size=129280, hidden_size=dim, num_hidden_layers=layers, num_attention_heads=heads, head_dim=512,
                qk_rope_head_dim=64, partial_rotary_factor=64 / 512, q_lora_rank=q_lora, o_groups=groups,
                o_lora_rank=o_lora, sliding_window=128, layer_types=kinds, compress_rates={CSA: 4, HCA: 128},
                n_routed_experts=experts, num_experts_per_tok=6, moe_intermediate_size=inter,
                index_n_heads=index_heads, index_head_dim=index_dim, index_topk=index_topk,
                mlp_layer_types=["hash_moe"] * 3 + ["moe"] * (layers - 3),
                rope_parameters={"main": {"rope_type": "default", "rope_theta": 10000.0},
                                 "compress": {"rope_type": "yarn", "rope_theta": 160000.0, "factor": 16.0,
                                              "original_max_position_embeddings": 65536, "beta_fast": 32.0,
                                              "beta_slow": 1.0, "attention_factor": 1.0}})


def preset(name):
    if name == "tiny":
        return dict(vocab_size=2048, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, head_dim=32,
                    qk_rope_head_dim=8, partial_rotary_factor=8 / 32, q_lora_rank=32, o_groups=2, o_lora_rank=16,
                    sliding_window=8, layer_types=[SWA, CSA, HCA, CSA],
                    compress_rates={CSA: 4, HCA: 8}, n_routed_experts=8, num_experts_per_tok=2,
                    moe_intermediate_size=32, index_n_heads=2, index_head_dim=16, index_topk=2,
                    mlp_layer_types=["hash_moe"] * 3 + ["moe"],
                    rope_parameters={"main": {"rope_type": "default", "rope_theta": 10000.0},
                                     "compress": {"rope_type": "yarn", "rope_theta": 160000.0, "factor": 4.0,
                                                  "original_max_position_embeddings": 64, "beta_fast": 32.0,
                                                  "beta_slow": 1.0, "attention_factor": 1.0}})
    if name == "small":
        return v4_proxy(256, 6, 4, 128, 2, 64, 16, 128, 4, 64, 16)
    if name == "proxy-2b":
        return v4_proxy(2048, 8, 16, 512, 4, 512, 32, 1024, 16, 128, 512)
    raise SystemExit(f"unknown preset {name}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    a = ap.parse_args()
    dev = torch.device(a.device)
    dtype = torch.float32 if a.dtype == "fp32" else torch.bfloat16
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    cfg = DeepseekV4Config(**preset(a.preset), num_nextn_predict_layers=0)
    cfg._attn_implementation = "eager"
    model = DeepseekV4ForCausalLM(cfg).to(device=dev, dtype=dtype).train()
    n_params = sum(p.numel() for p in model.parameters())
    ids = torch.randint(0, cfg.vocab_size, (a.batch, a.seq), device=dev)
    fwd, step = [], []
    for i in range(a.warmup + a.steps):
        sync()
        t0 = time.perf_counter()
        with torch.no_grad():
            model(input_ids=ids, labels=ids, use_cache=False)
        sync()
        f = time.perf_counter() - t0
        t0 = time.perf_counter()
        model.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        sync()
        fb = time.perf_counter() - t0
        if i >= a.warmup:
            fwd.append(f)
            step.append(fb)
    tokens = a.batch * a.seq
    f, s = statistics.median(fwd), statistics.median(step)
    print(f"hf-transformers preset={a.preset} batch={a.batch} seq={a.seq} steps={a.steps} (median) "
          f"device={dev} dtype={a.dtype} params={n_params / 1e9:.3f}B threads={torch.get_num_threads()} "
          f"torch={torch.__version__} transformers={transformers.__version__}")
    if dev.type == "cuda":
        print(f"  gpu={torch.cuda.get_device_name()} peak_memory={torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
    print(f"  forward          {f * 1e3:9.3f} ms/step {f / tokens * 1e6:9.2f} us/token {tokens / f:10.1f} tokens/s")
    print(f"  forward+backward {s * 1e3:9.3f} ms/step {s / tokens * 1e6:9.2f} us/token {tokens / s:10.1f} tokens/s")


if __name__ == "__main__":
    main()

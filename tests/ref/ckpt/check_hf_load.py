#!/usr/bin/env python3
"""Peer check of dsv4's checkpoint I/O against Hugging Face transformers (DeepseekV4, FP32, eager, CPU).

Writes two fixtures into tests/fixtures/ckpt/ (or --out-dir), which tests/model/test_checkpoint_hf.cpp reads:

1. dsv4 -> transformers: runs
       dsv4-make-tiny --preset tiny --seed 1 --format hf --std 0.25 --full-random --out TMP
   loads TMP with DeepseekV4ForCausalLM.from_pretrained (no missing / unexpected / mismatched keys allowed, and every
   parameter and buffer must equal the file's tensor bit for bit), runs a forward on fixed input ids and writes
       dsv4_tiny_hf_logits.safetensors   input_ids I64 [B,S], logits F32 [B,S,V]
   with the sha256 of every file dsv4 wrote in the metadata. The C++ test writes the same checkpoint with
   make_tiny_checkpoint, loads it with dsv4 and compares its logits (max abs error <= 1e-4).

2. transformers -> dsv4: builds a small random DeepseekV4ForCausalLM (every tensor re-drawn by the rules of
   tests/ref/model/gen_model_fixtures.py), save_pretrained()s it to
       hf_saved_tiny/                    config.json, generation_config.json, model.safetensors (as transformers writes
                                         them: its reverse-converted names, per-expert tensors, "dtype": "float32")
   reloads it with from_pretrained (bit-identical parameters) and writes the logits of that reloaded model:
       hf_saved_tiny.logits.safetensors  input_ids I64 [B,S], logits F32 [B,S,V]
   The C++ test loads hf_saved_tiny/ with dsv4 and compares logits (max abs error <= 1e-4).

Inputs are chosen so that every top-k decision (indexer, learned router) has a relative margin >= 1e-4 (a port that
differs from torch by FP32 rounding must make the same choices); inputs that fail the check are skipped,
deterministically. Each fixture is < 1 MB.

  tests/ref/.venv/bin/python tests/ref/ckpt/check_hf_load.py --make-tiny build-ckpt/bin/dsv4-make-tiny
  tests/ref/.venv/bin/python tests/ref/ckpt/check_hf_load.py --make-tiny ... --verify   # regenerate, byte-compare
"""

from __future__ import annotations

import argparse
import filecmp
import glob
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile

import torch
from safetensors.torch import load_file

HERE = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.abspath(os.path.join(HERE, "..", "..", ".."))
sys.path.insert(0, os.path.join(REPO_ROOT, "tests", "ref", "model"))

import gen_model_fixtures as gmf  # noqa: E402  (write_safetensors, randomize, Probes, versions, margins)
from transformers import DeepseekV4Config, DeepseekV4ForCausalLM  # noqa: E402

GENERATOR = "tests/ref/ckpt/check_hf_load.py"
DEFAULT_OUT = os.path.join(REPO_ROOT, "tests", "fixtures", "ckpt")
CSA, HCA, SWA = gmf.CSA, gmf.HCA, gmf.SWA

# dsv4 -> transformers: the tiny preset as dsv4-make-tiny writes it.
MAKE_TINY_ARGS = ["--preset", "tiny", "--seed", "1", "--format", "hf", "--std", "0.25", "--full-random"]
TINY_BATCH, TINY_SEQ = 2, 16  # S > sliding window 8; CSA 4 entries > index_topk 2; HCA 2 entries

# transformers -> dsv4: a small config of its own (vocab 64 keeps the fixture small).
SAVED_SPEC = {
    "seed": 3000,
    "expert_gain": 1.5,
    "router_bias_std": 0.3,
    "batch": 2,
    "seq": 19,
    "hf": dict(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=16,
        partial_rotary_factor=0.5,
        q_lora_rank=16,
        o_groups=2,
        o_lora_rank=8,
        n_routed_experts=4,
        num_experts_per_tok=2,
        n_shared_experts=1,
        moe_intermediate_size=16,
        layer_types=[SWA, CSA, HCA],
        mlp_layer_types=["hash_moe", "moe", "moe"],
        compress_rates={CSA: 4, HCA: 8},
        sliding_window=4,
        index_n_heads=2,
        index_head_dim=16,
        index_topk=2,
        hc_mult=4,
        hc_sinkhorn_iters=20,
        hc_eps=1e-6,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        compress_rope_theta=160000.0,
        max_position_embeddings=128,
        rope_parameters={
            "rope_type": "yarn",
            "factor": 4.0,
            "original_max_position_embeddings": 32,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
        },
        scoring_func="sqrtsoftplus",
        routed_scaling_factor=1.5,
        swiglu_limit=1.0,
        num_nextn_predict_layers=0,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=1,
    ),
}


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_tensors(d: str) -> dict:
    out = {}
    for f in sorted(glob.glob(os.path.join(d, "*.safetensors"))):
        out.update(load_file(f))
    return out


def load_eager(d: str) -> DeepseekV4ForCausalLM:
    model, info = DeepseekV4ForCausalLM.from_pretrained(
        d, dtype=torch.float32, attn_implementation="eager", experts_implementation="eager", output_loading_info=True
    )
    bad = {k: v for k, v in info.items() if v}
    assert not bad, f"{d}: transformers reports {bad}"
    assert model.config._attn_implementation == "eager" and model.config._experts_implementation == "eager"
    return model.eval()


def margins_ok(model, input_ids) -> tuple[bool, dict]:
    """Forward with gen_model_fixtures' probes; True when every top-k margin is >= TOPK_REL_GAP."""
    probes = gmf.Probes(model, input_ids)
    with torch.no_grad():
        out = model(input_ids=input_ids, use_cache=False)
    probes.remove()
    report = {"indexer": {}, "router": {}}
    ok = True
    for i, rec in probes.indexer.items():
        report["indexer"][f"layer{i}"] = {"pruning_queries": rec["pruning_queries"], "min_rel_gap": rec["min_rel_gap"]}
        ok &= rec["pruning_queries"] > 0 and rec["min_rel_gap"] >= gmf.TOPK_REL_GAP
    for i, rec in probes.router.items():
        if rec["kind"] == "learned":
            report["router"][f"layer{i}"] = {"min_rel_gap": rec["min_rel_gap"]}
            ok &= rec["min_rel_gap"] >= gmf.TOPK_REL_GAP
    return ok, report, out.logits.detach()


def pick_inputs(model, vocab: int, batch: int, seq: int, seed: int):
    for attempt in range(50):
        gen = torch.Generator().manual_seed(seed + attempt)
        ids = torch.randint(0, vocab, (batch, seq), generator=gen, dtype=torch.int64)
        ok, report, logits = margins_ok(model, ids)
        if ok:
            report["input_seed"] = seed + attempt
            return ids, logits, report
        print(f"input seed {seed + attempt} rejected (top-k margin)", file=sys.stderr)
    raise RuntimeError("no input with reproducible top-k margins")


def dsv4_to_transformers(make_tiny: str, out_dir: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = os.path.join(tmp, "tiny_hf")
        cmd = [make_tiny] + MAKE_TINY_ARGS + ["--out", ckpt]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        model = load_eager(ckpt)
        state = model.state_dict()
        files = file_tensors(ckpt)
        assert set(state) == set(files), set(state) ^ set(files)
        for k, v in files.items():
            assert state[k].dtype == v.dtype and torch.equal(state[k], v), f"{k} differs after loading"
        ids, logits, report = pick_inputs(model, model.config.vocab_size, TINY_BATCH, TINY_SEQ, seed=100)
        shas = {os.path.basename(f): sha256(f) for f in sorted(glob.glob(os.path.join(ckpt, "*")))}
    meta = {
        "generator": GENERATOR,
        "versions": json.dumps(gmf.versions(), sort_keys=True),
        "command": "dsv4-make-tiny " + " ".join(MAKE_TINY_ARGS) + " --out DIR",
        "checkpoint_sha256": json.dumps(shas, sort_keys=True),
        "margins": json.dumps(report, sort_keys=True),
        "what": "transformers DeepseekV4ForCausalLM (FP32, eager) logits of the dsv4-written transformers-layout tiny "
        "checkpoint for input_ids",
    }
    path = os.path.join(out_dir, "dsv4_tiny_hf_logits.safetensors")
    gmf.write_safetensors(path, {"input_ids": ids, "logits": logits.float().contiguous()}, meta)
    return {"fixture": path, "tensors": len(files), "max_abs_logit": float(logits.abs().max()), **report}


def transformers_to_dsv4(out_dir: str) -> dict:
    spec = SAVED_SPEC
    torch.manual_seed(spec["seed"])
    gen = torch.Generator().manual_seed(spec["seed"])
    cfg = DeepseekV4Config(**json.loads(json.dumps(spec["hf"])))
    cfg._attn_implementation = "eager"
    cfg._experts_implementation = "eager"
    model = DeepseekV4ForCausalLM(cfg).to(torch.float32)
    gmf.randomize(model, spec, gen)
    saved = os.path.join(out_dir, "hf_saved_tiny")
    shutil.rmtree(saved, ignore_errors=True)
    model.save_pretrained(saved)
    for f in os.listdir(saved):
        os.chmod(os.path.join(saved, f), 0o644)  # transformers creates the shard 0600
    back = load_eager(saved)
    ref = model.state_dict()
    for k, v in back.state_dict().items():
        assert torch.equal(v, ref[k]), f"{k} changed through save_pretrained / from_pretrained"
    ids, logits, report = pick_inputs(back, cfg.vocab_size, spec["batch"], spec["seq"], seed=spec["seed"] + 1)
    meta = {
        "generator": GENERATOR,
        "versions": json.dumps(gmf.versions(), sort_keys=True),
        "margins": json.dumps(report, sort_keys=True),
        "what": "transformers DeepseekV4ForCausalLM (FP32, eager) logits of hf_saved_tiny/ (written by save_pretrained) "
        "for input_ids",
    }
    path = os.path.join(out_dir, "hf_saved_tiny.logits.safetensors")
    gmf.write_safetensors(path, {"input_ids": ids, "logits": logits.float().contiguous()}, meta)
    names = sorted(load_file(os.path.join(saved, "model.safetensors")).keys())
    return {"fixture": path, "checkpoint": saved, "names": len(names), "max_abs_logit": float(logits.abs().max()), **report}


def generate(make_tiny: str, out_dir: str) -> dict:
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    os.makedirs(out_dir, exist_ok=True)
    summary = {"dsv4_to_transformers": dsv4_to_transformers(make_tiny, out_dir),
               "transformers_to_dsv4": transformers_to_dsv4(out_dir)}
    for root, _, files in os.walk(out_dir):
        for f in files:
            size = os.path.getsize(os.path.join(root, f))
            assert size < (1 << 20), f"fixture {f} is {size} bytes (limit 1 MB)"
    return summary


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--make-tiny", required=True, help="path of the dsv4-make-tiny binary")
    ap.add_argument("--out-dir", default=DEFAULT_OUT)
    ap.add_argument("--verify", action="store_true", help="regenerate into a temp dir and byte-compare with --out-dir")
    args = ap.parse_args()
    if args.verify:
        with tempfile.TemporaryDirectory() as tmp:
            generate(args.make_tiny, tmp)
            cmp = filecmp.dircmp(tmp, args.out_dir)
            diffs = []

            def walk(c, prefix=""):
                diffs.extend(prefix + f for f in c.diff_files + c.left_only + c.right_only)
                for name, sub in c.subdirs.items():
                    walk(sub, prefix + name + "/")

            walk(cmp)
            # shallow=False content comparison of the common files
            for root, _, files in os.walk(tmp):
                for f in files:
                    a = os.path.join(root, f)
                    b = os.path.join(args.out_dir, os.path.relpath(a, tmp))
                    if os.path.exists(b) and not filecmp.cmp(a, b, shallow=False):
                        diffs.append(os.path.relpath(a, tmp))
            print(json.dumps({"verify": "ok" if not diffs else "differ", "files": sorted(set(diffs))}, indent=1))
            return 1 if diffs else 0
    print(json.dumps(generate(args.make_tiny, args.out_dir), indent=1, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())

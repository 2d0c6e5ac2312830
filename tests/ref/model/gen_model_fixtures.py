#!/usr/bin/env python3
"""Model-parity fixtures: tiny random DeepSeek-V4 models run through Hugging Face transformers.

For every config below this writes, into tests/fixtures/model/ (or --out-dir):

  <name>.safetensors   every state-dict entry of DeepseekV4ForCausalLM under its transformers name (FP32; the
                       int64 buffer mlp.gate.tid2eid as int64), "input_ids" (int64 [B,S]), "labels" (int64 [B,S],
                       NOT shifted: ForCausalLMLoss shifts inside, logit t is scored against labels[t+1]),
                       "logits" (FP32 [B,S,V]), "loss" (FP32 [1]), "grad.<param>" (FP32) for every parameter that
                       gets a gradient from loss.backward(), and "debug.*" intermediates (see README.md).
                       The safetensors metadata names the generator and the package versions.
  <name>.config.json   the exact DeepseekV4Config.to_dict() the model was built from (json, sorted keys).

Everything is FP32, eager attention, eager experts, CPU, one thread, deterministic algorithms. Runs in seconds.

  tests/ref/.venv/bin/python tests/ref/model/gen_model_fixtures.py            # (re)write the fixtures
  tests/ref/.venv/bin/python tests/ref/model/gen_model_fixtures.py --verify   # regenerate to a temp dir, byte-compare

The script asserts that every code path it is meant to cover is really exercised (see "Checks" in README.md); when
a margin check fails for a seed (a top-k decision or a clamp too close to its boundary for an FP32 port to
reproduce) it moves to the next seed, deterministically.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import math
import os
import shutil
import sys
import tempfile

import numpy as np
import safetensors
import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import load_file

from transformers import DeepseekV4Config, DeepseekV4ForCausalLM
from transformers.models.deepseek_v4 import modeling_deepseek_v4 as mdv4

GENERATOR = "tests/ref/model/gen_model_fixtures.py"
REPO_ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
DEFAULT_OUT = os.path.join(REPO_ROOT, "tests", "fixtures", "model")

# Margins an FP32 port must be able to reproduce (its values differ from torch's by ~1e-6 relative).
TOPK_REL_GAP = 1e-4  # k-th vs (k+1)-th candidate of every top-k (indexer, learned router), relative to score scale
CLAMP_GAP = 1e-4  # distance of every SwiGLU pre-activation from the clamp boundaries (+-limit)

CSA, HCA, SWA = "compressed_sparse_attention", "heavily_compressed_attention", "sliding_attention"

# ----------------------------------------------------------------------------------------------------------------
# Configs. Between them: sliding-only, CSA (indexer top-k pruning) and HCA layers; S not a multiple of any rate;
# hash-routed and learned-routed MoE; clamps firing in routed and shared experts; random mHC; sinks; router bias;
# labels with -100 (config b). Config b also moves every eps / theta / rate / width off the defaults so that a port
# that hard-codes a value or threads the wrong one shows up.
# ----------------------------------------------------------------------------------------------------------------
CONFIGS = [
    {
        "name": "dsv4_tiny_a",
        "seed": 1000,
        "batch": 2,
        "seq": 27,  # 27 % 4 = 3, 27 % 8 = 3; CSA sees up to 6 entries (> index_topk 2), HCA up to 3
        "labels": "input_ids",
        "expert_gain": 1.0,  # std of routed/shared gate & up pre-activations ~ gain (inputs are RMS-normalized)
        "router_bias_std": 0.3,
        "hf": dict(
            vocab_size=96,
            hidden_size=48,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=32,
            partial_rotary_factor=0.25,  # rope dim 8
            q_lora_rank=32,
            o_groups=2,
            o_lora_rank=16,
            n_routed_experts=6,
            num_experts_per_tok=2,
            n_shared_experts=1,
            moe_intermediate_size=24,
            layer_types=[SWA, CSA, HCA, CSA],
            mlp_layer_types=["hash_moe", "hash_moe", "moe", "moe"],
            compress_rates={CSA: 4, HCA: 8},
            sliding_window=8,
            index_n_heads=8,
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
                "original_max_position_embeddings": 64,
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
    },
    {
        "name": "dsv4_tiny_b",
        "seed": 2000,
        "batch": 3,
        "seq": 37,  # 37 % 4 = 1, 37 % 16 = 5; CSA sees up to 9 entries (> index_topk 3), HCA up to 2
        "labels": "input_ids_with_ignore",
        "expert_gain": 2.5,
        "router_bias_std": 0.3,
        "hf": dict(
            vocab_size=80,
            hidden_size=32,
            num_hidden_layers=5,
            num_attention_heads=8,
            num_key_value_heads=1,
            head_dim=32,
            partial_rotary_factor=0.5,  # rope dim 16
            q_lora_rank=24,
            o_groups=4,
            o_lora_rank=8,
            n_routed_experts=8,
            num_experts_per_tok=3,
            n_shared_experts=1,
            moe_intermediate_size=16,
            layer_types=[HCA, CSA, SWA, CSA, HCA],
            mlp_layer_types=["hash_moe", "moe", "moe", "moe", "moe"],
            compress_rates={CSA: 4, HCA: 16},
            sliding_window=6,
            index_n_heads=6,
            index_head_dim=32,
            index_topk=3,
            hc_mult=4,
            hc_sinkhorn_iters=7,
            hc_eps=1e-3,
            rms_norm_eps=1e-5,
            rope_theta=500.0,
            compress_rope_theta=1000.0,
            max_position_embeddings=256,
            rope_parameters={
                "rope_type": "yarn",
                "factor": 8.0,
                "original_max_position_embeddings": 32,
                "beta_fast": 16.0,
                "beta_slow": 2.0,
            },
            scoring_func="sqrtsoftplus",
            routed_scaling_factor=2.5,
            swiglu_limit=3.0,
            num_nextn_predict_layers=0,
            tie_word_embeddings=False,
            bos_token_id=0,
            eos_token_id=1,
        ),
    },
]

# Parameters that legitimately get no gradient from the LM loss (suffixes of the parameter name). The indexer
# output is torch.topk indices, which are not differentiable, so nothing upstream of them inside the indexer is
# reached. (tid2eid and e_score_correction_bias are buffers, not parameters.)
NO_GRAD_SUFFIXES = (
    "self_attn.compressor.indexer.kv_proj.weight",
    "self_attn.compressor.indexer.gate_proj.weight",
    "self_attn.compressor.indexer.position_bias",
    "self_attn.compressor.indexer.kv_norm.weight",
    "self_attn.compressor.indexer.q_b_proj.weight",
    "self_attn.compressor.indexer.scorer.weights_proj.weight",
)


class CheckFailed(Exception):
    """A margin check failed for this seed: try the next one."""


def write_safetensors(path: str, tensors: dict, metadata: dict) -> None:
    """Byte-deterministic safetensors writer. safetensors.torch.save_file keeps __metadata__ in a Rust HashMap, so
    its key order (and the file bytes) change from run to run; here the header is JSON with sorted keys, tensors are
    laid out in sorted-name order, and the header is space-padded to a multiple of 8 (as the format allows)."""
    dtypes = {torch.float32: "F32", torch.int64: "I64"}
    header, blobs, offset = {"__metadata__": dict(sorted(metadata.items()))}, [], 0
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous()
        data = t.numpy().tobytes()  # little-endian on every platform torch supports here
        header[name] = {"dtype": dtypes[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    with open(path, "wb") as f:
        f.write(len(hb).to_bytes(8, "little"))
        f.write(hb)
        for data in blobs:
            f.write(data)
    back = load_file(path)  # the reference reader must agree
    assert back.keys() == tensors.keys() and all(torch.equal(back[k], tensors[k]) for k in tensors)
    assert sys.byteorder == "little"


def versions() -> dict:
    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "safetensors": safetensors.__version__,
        "numpy": np.__version__,
    }


# ----------------------------------------------------------------------------------------------------------------
# Deterministic re-initialization (independent of HF's _init_weights and its module order).
# ----------------------------------------------------------------------------------------------------------------
def randomize(model: DeepseekV4ForCausalLM, spec: dict, gen: torch.Generator) -> None:
    cfg = model.config
    D, I, E, k, V = cfg.hidden_size, cfg.moe_intermediate_size, cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.vocab_size
    gain = spec["expert_gain"]

    def normal(shape, std, mean=0.0):
        return torch.randn(shape, generator=gen, dtype=torch.float32) * std + mean

    def uniform(shape, lo, hi):
        return torch.rand(shape, generator=gen, dtype=torch.float32) * (hi - lo) + lo

    entries = dict(model.named_parameters())
    entries.update(dict(model.named_buffers()))
    persistent = set(model.state_dict().keys())
    with torch.no_grad():
        for name in sorted(persistent):
            t = entries[name]
            shape = tuple(t.shape)
            if name.endswith("mlp.gate.tid2eid"):
                rows = [torch.randperm(E, generator=gen)[:k] for _ in range(V)]
                t.copy_(torch.stack(rows).to(t.dtype))  # k distinct experts per token id
            elif name.endswith("mlp.gate.e_score_correction_bias"):
                t.copy_(normal(shape, spec["router_bias_std"]))
            elif name.endswith("norm.weight"):  # every weighted RMSNorm (layer, q_a, kv, compressor, indexer, final)
                t.copy_(normal(shape, 0.1, 1.0))
            elif name.endswith("self_attn.sinks"):
                t.copy_(normal(shape, 1.0))
            elif name.endswith("position_bias"):
                t.copy_(normal(shape, 1.0))
            elif name.endswith(("attn_hc.fn", "ffn_hc.fn", "hc_head.hc_fn")):
                # the input is RMS-normalized over N*D, so this makes the mixes ~N(0,1)
                t.copy_(normal(shape, 1.0 / math.sqrt(shape[1])))
            elif name.endswith(("attn_hc.base", "ffn_hc.base", "hc_head.hc_base")):
                t.copy_(normal(shape, 1.0))
            elif name.endswith(("attn_hc.scale", "ffn_hc.scale", "hc_head.hc_scale")):
                t.copy_(uniform(shape, 0.5, 1.5))
            elif name.endswith("mlp.experts.gate_up_proj"):  # [E, 2I, D]
                t.copy_(normal(shape, gain / math.sqrt(D)))
            elif name.endswith("mlp.experts.down_proj"):  # [E, D, I]
                t.copy_(normal(shape, 1.0 / math.sqrt(I)))
            elif name.endswith(("shared_experts.gate_proj.weight", "shared_experts.up_proj.weight")):
                t.copy_(normal(shape, gain / math.sqrt(D)))
            elif name == "model.embed_tokens.weight":
                t.copy_(normal(shape, 1.0))
            elif name.endswith(".weight") and len(shape) == 2:  # every other Linear (incl. lm_head, routers)
                t.copy_(normal(shape, 1.0 / math.sqrt(shape[1])))
            else:
                raise RuntimeError(f"no init rule for state-dict entry {name} {shape}: new in this transformers?")


# ----------------------------------------------------------------------------------------------------------------
# Probes: hooks that record what the forward did, for the path checks and the debug tensors.
# ----------------------------------------------------------------------------------------------------------------
class Probes:
    def __init__(self, model: DeepseekV4ForCausalLM, input_ids: torch.Tensor):
        self.model = model
        self.cfg = model.config
        self.input_ids = input_ids
        self.handles = []
        self.clamp = {}  # "layers.i.routed"/"layers.i.shared" -> counts
        self.clamp_min_gap = math.inf
        self.indexer = {}  # layer -> dict(topk, scores)
        self.router = {}  # layer -> dict(kind, indices, weights, ...)
        self.hc = []  # (name, pre, post, comb)
        self.layer_out = {}
        self.masks_are_tensors = []
        layers = model.model.layers
        for i, layer in enumerate(layers):
            self._probe_experts(i, layer.mlp.experts)
            self._probe_shared(i, layer.mlp.shared_experts)
            self._probe_router(i, layer.mlp.gate)
            comp = layer.self_attn.compressor
            if isinstance(comp, mdv4.DeepseekV4CSACompressor):
                self._probe_indexer(i, comp.indexer)
            self._probe_hc(f"layers.{i}.attn_hc", layer.attn_hc)
            self._probe_hc(f"layers.{i}.ffn_hc", layer.ffn_hc)
            self.handles.append(layer.register_forward_hook(self._layer_hook(i)))
            self.handles.append(layer.self_attn.register_forward_pre_hook(self._attn_pre_hook, with_kwargs=True))
        self._probe_head(model.model.hc_head)

    def remove(self):
        for h in self.handles:
            h.remove()
        for layer in self.model.model.layers:
            layer.mlp.experts.__dict__.pop("_apply_gate", None)

    def _count(self, key, gate, up):
        lim = self.cfg.swiglu_limit
        c = self.clamp.setdefault(key, {"gate_above": 0, "up_above": 0, "up_below": 0, "gate_total": 0})
        c["gate_above"] += int((gate > lim).sum())
        c["up_above"] += int((up > lim).sum())
        c["up_below"] += int((up < -lim).sum())
        c["gate_total"] += gate.numel()
        gap = min(float((gate - lim).abs().min()), float((up - lim).abs().min()), float((up + lim).abs().min()))
        self.clamp_min_gap = min(self.clamp_min_gap, gap)

    def _probe_experts(self, i, experts):
        orig = experts._apply_gate  # bound method; the eager forward calls self._apply_gate(gate_up)

        def counting(gate_up, _orig=orig, _key=f"layers.{i}.mlp.experts"):
            g, u = gate_up.detach().chunk(2, dim=-1)
            self._count(_key, g, u)
            return _orig(gate_up)

        experts._apply_gate = counting

    def _probe_shared(self, i, mlp):
        store = {}
        key = f"layers.{i}.mlp.shared_experts"
        self.handles.append(mlp.gate_proj.register_forward_hook(lambda m, a, o: store.__setitem__("g", o.detach())))

        def up_hook(m, a, o):
            self._count(key, store.pop("g"), o.detach())

        self.handles.append(mlp.up_proj.register_forward_hook(up_hook))

    def _probe_router(self, i, gate):
        def hook(m, args, out):
            logits, weights, indices = (t.detach() for t in out)
            rec = {"weights": weights, "indices": indices, "logits": logits}
            if isinstance(m, mdv4.DeepseekV4HashRouter):
                rec["kind"] = "hash"
                ids = args[1].reshape(-1)
                assert torch.equal(indices, m.tid2eid[ids]), "hash router did not use tid2eid[input_ids]"
            else:
                rec["kind"] = "learned"
                scores = m.score_fn(logits)
                biased = scores + m.e_score_correction_bias
                srt = biased.sort(dim=-1, descending=True).values
                k = m.top_k
                gap = (srt[:, k - 1] - srt[:, k]) / (1.0 + srt.abs().max())
                rec["min_rel_gap"] = float(gap.min())
                unbiased = scores.topk(k, dim=-1).indices.sort(-1).values
                rec["bias_changed_tokens"] = int((unbiased != indices.sort(-1).values).any(-1).sum())
                rec["tokens"] = indices.shape[0]
            self.router[i] = rec

        self.handles.append(gate.register_forward_hook(hook))

    def _probe_indexer(self, i, indexer):
        store = {}
        self.handles.append(
            indexer.scorer.register_forward_hook(lambda m, a, o: store.__setitem__("scores", o.detach()))
        )

        def hook(m, args, out):
            position_ids = args[2]
            scores = store.pop("scores")  # [B, S, T] before the causal mask
            B, S, T = scores.shape
            visible = ((position_ids + 1) // m.compress_rate).expand(B, S)  # entries w < (t+1)//m are visible
            k = min(m.index_topk, T)
            min_gap = math.inf
            pruning_queries = 0
            scale = 1.0 + float(scores.abs().max())
            for b in range(B):
                for t in range(S):
                    n = int(visible[b, t])
                    if n > m.index_topk:
                        pruning_queries += 1
                        s = scores[b, t, :n].sort(descending=True).values
                        min_gap = min(min_gap, float(s[m.index_topk - 1] - s[m.index_topk]) / scale)
                        chosen = set(out[b, t].tolist())
                        assert -1 not in chosen and all(c < n for c in chosen)
            self.indexer[i] = {
                "topk": out.detach().clone(),
                "k": k,
                "entries": T,
                "max_visible": int(visible.max()),
                "pruning_queries": pruning_queries,
                "min_rel_gap": min_gap,
                "invalid_picks": int((out < 0).sum()),
            }

        self.handles.append(indexer.register_forward_hook(hook))

    def _probe_hc(self, name, hc):
        def hook(m, args, out):
            x = args[0]
            post, comb, _ = out
            B, S = x.shape[:2]
            flat = m.input_norm(x.reshape(B, S, -1).float())
            z = F.linear(flat, m.fn.float())[..., : m.hc_mult]
            pre = torch.sigmoid(z * m.scale[0] + m.base[: m.hc_mult]) + m.hc_eps
            self.hc.append((name, pre.detach(), post.detach(), comb.detach()))

        self.handles.append(hc.register_forward_hook(hook))

    def _probe_head(self, head):
        def hook(m, args, out):
            x = args[0]
            flat = m.input_norm(x.flatten(2).float())
            pre = torch.sigmoid(F.linear(flat, m.hc_fn.float()) * m.hc_scale + m.hc_base) + m.eps
            self.hc.append(("hc_head", pre.detach(), None, None))

        self.handles.append(head.register_forward_hook(hook))

    def _layer_hook(self, i):
        def hook(m, args, out):
            self.layer_out[i] = out.detach().clone()

        return hook

    def _attn_pre_hook(self, m, args, kwargs):
        mask = kwargs.get("attention_mask")
        self.masks_are_tensors.append(isinstance(mask, torch.Tensor) and mask.dim() == 4)


# ----------------------------------------------------------------------------------------------------------------
# Independent cross-check: the forward of the official DeepSeek inference/model.py (prefill, start_pos = 0), as
# described in shared/reference/dsv4-architecture.md, written without transformers, in FP32, with the FP8/FP4
# fake-quant and the (orthogonal) Hadamard rotation of the indexer left out, and the shared-expert clamp ON
# (later official revision). Reads the HF state dict. HF must agree with it to FP32 rounding.
# ----------------------------------------------------------------------------------------------------------------
def official_reference_forward(
    p: dict, cfg: DeepseekV4Config, ids: torch.Tensor, shared_clamp: bool = True
) -> torch.Tensor:
    B, S = ids.shape
    D, N, H, d = cfg.hidden_size, cfg.hc_mult, cfg.num_attention_heads, cfg.head_dim
    r = int(d * cfg.partial_rotary_factor)
    eps, hc_eps, lim = cfg.rms_norm_eps, cfg.hc_eps, cfg.swiglu_limit
    E, k, I = cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size
    win = cfg.sliding_window
    yarn = cfg.rope_parameters["compress"]

    def rms(x, w=None, e=eps):
        y = x * torch.rsqrt(x.square().mean(-1, keepdim=True) + e)
        return y if w is None else w * y

    def freqs(theta, use_yarn, n):  # precompute_freqs_cis
        f = 1.0 / (theta ** (torch.arange(0, r, 2, dtype=torch.float32) / r))
        if use_yarn:
            orig, fac = yarn["original_max_position_embeddings"], yarn["factor"]

            def corr(nr):
                return r * math.log(orig / (nr * 2 * math.pi)) / (2 * math.log(theta))

            lo = max(math.floor(corr(yarn["beta_fast"])), 0)
            hi = min(math.ceil(corr(yarn["beta_slow"])), r - 1)
            if lo == hi:
                hi += 0.001
            ramp = ((torch.arange(r // 2, dtype=torch.float32) - lo) / (hi - lo)).clamp(0, 1)
            smooth = 1 - ramp
            f = f / fac * (1 - smooth) + f * smooth
        ang = torch.outer(torch.arange(n, dtype=torch.float32), f)
        return torch.polar(torch.ones_like(ang), ang)  # [n, r/2] complex

    def rope(x, fc, inverse=False):  # x [..., n, (heads,) r]; pairs (2i, 2i+1) form a complex number
        xc = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)).contiguous())
        fc = fc.conj() if inverse else fc
        if xc.dim() == 4:  # [B, n, heads, r/2]
            fc = fc[None, :, None, :]
        return torch.view_as_real(xc * fc).flatten(-2)

    def with_rope(x, fc, inverse=False):
        return torch.cat([x[..., :-r], rope(x[..., -r:], fc, inverse)], dim=-1)

    def compressor(pre, x, m, hd, fc):  # returns [B, S//m, hd]
        overlap = m == 4
        kv = x @ p[pre + "kv_proj.weight"].T
        sc = x @ p[pre + "gate_proj.weight"].T
        cut = S - S % m
        kv = kv[:, :cut].unflatten(1, (-1, m))
        sc = sc[:, :cut].unflatten(1, (-1, m)) + p[pre + "position_bias"]
        if overlap:  # overlap_transform: slots [Ca of window w-1 | Cb of window w]

            def ot(t, fill):
                o = t.new_full((B, t.shape[1], 2 * m, hd), fill)
                o[:, :, m:] = t[..., hd:]
                o[:, 1:, :m] = t[:, :-1, :, :hd]
                return o

            kv, sc = ot(kv, 0.0), ot(sc, float("-inf"))
        c = (kv * sc.softmax(dim=2)).sum(dim=2)
        c = rms(c, p[pre + "kv_norm.weight"])
        return with_rope(c, fc[:cut:m])

    def expert(x, w1, w3, w2, wt=None, clamp=True):
        g, u = x @ w1.T, x @ w3.T
        if clamp:
            u, g = u.clamp(-lim, lim), g.clamp(max=lim)
        h = F.silu(g) * u
        if wt is not None:
            h = wt * h  # routing weight applied before w2
        return h @ w2.T

    t_idx = torch.arange(S)
    X = p["model.embed_tokens.weight"][ids].unsqueeze(2).repeat(1, 1, N, 1)
    for li in range(cfg.num_hidden_layers):
        L = f"model.layers.{li}."
        lt = cfg.layer_types[li]
        m = 0 if lt == SWA else cfg.compress_rates[lt]
        fc = freqs(cfg.rope_theta, False, S) if m == 0 else freqs(cfg.compress_rope_theta, True, S)

        def hc_pre(X, name):
            xf = X.flatten(2)
            mixes = (xf @ p[L + name + ".fn"].T) * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)
            sc, base = p[L + name + ".scale"], p[L + name + ".base"]
            pre = torch.sigmoid(mixes[..., :N] * sc[0] + base[:N]) + hc_eps
            post = 2 * torch.sigmoid(mixes[..., N : 2 * N] * sc[1] + base[N : 2 * N])
            comb = (mixes[..., 2 * N :] * sc[2] + base[2 * N :]).unflatten(-1, (N, N))
            comb = comb.softmax(-1) + hc_eps
            comb = comb / (comb.sum(-2, keepdim=True) + hc_eps)
            for _ in range(cfg.hc_sinkhorn_iters - 1):
                comb = comb / (comb.sum(-1, keepdim=True) + hc_eps)
                comb = comb / (comb.sum(-2, keepdim=True) + hc_eps)
            return (pre.unsqueeze(-1) * X).sum(2), post, comb

        def hc_post(x, X, post, comb):
            return post.unsqueeze(-1) * x.unsqueeze(-2) + (comb.unsqueeze(-1) * X.unsqueeze(-2)).sum(2)

        # ---- attention
        x, post, comb = hc_pre(X, "attn_hc")
        x = rms(x, p[L + "input_layernorm.weight"])
        A = L + "self_attn."
        qr = rms(x @ p[A + "q_a_proj.weight"].T, p[A + "q_a_norm.weight"])
        q = (qr @ p[A + "q_b_proj.weight"].T).unflatten(-1, (H, d))
        q = with_rope(rms(q), fc)
        kv = with_rope(rms(x @ p[A + "kv_proj.weight"].T, p[A + "kv_norm.weight"]), fc)  # [B, S, d]
        allowed_win = (t_idx[None, :] <= t_idx[:, None]) & (t_idx[None, :] > t_idx[:, None] - win)  # [S, S]
        keys, allowed = kv, allowed_win.expand(B, S, S)
        if m:
            ckv = compressor(A + "compressor.", x, m, d, fc)
            T = ckv.shape[1]
            visible = torch.arange(T)[None, :] < ((t_idx + 1) // m)[:, None]  # [S, T]
            if lt == CSA:
                ip = A + "compressor.indexer."
                c = cfg.index_head_dim
                kI = compressor(ip, x, m, c, fc)
                qI = with_rope((qr @ p[ip + "q_b_proj.weight"].T).unflatten(-1, (cfg.index_n_heads, c)), fc)
                w = (x @ p[ip + "scorer.weights_proj.weight"].T) * (c**-0.5 * cfg.index_n_heads**-0.5)
                score = (torch.einsum("bshd,btd->bsht", qI, kI).relu() * w.unsqueeze(-1)).sum(2)
                score = score.masked_fill(~visible, float("-inf"))
                top = score.topk(min(cfg.index_topk, T), dim=-1).indices
                sel = torch.zeros(B, S, T, dtype=torch.bool).scatter_(-1, top, True) & visible
            else:
                sel = visible.expand(B, S, T)
            keys, allowed = torch.cat([kv, ckv], 1), torch.cat([allowed, sel], -1)
        z = torch.einsum("bshd,btd->bsht", q, keys) * d**-0.5
        z = z.masked_fill(~allowed.unsqueeze(2), float("-inf"))
        sink = p[A + "sinks"].view(1, 1, H, 1).expand(B, S, H, 1)
        zmax = torch.maximum(z.max(-1, keepdim=True).values, sink)
        ez, es = (z - zmax).exp(), (sink - zmax).exp()
        o = torch.einsum("bsht,btd->bshd", ez, keys) / (ez.sum(-1, keepdim=True) + es)
        o = with_rope(o, fc, inverse=True)
        G = cfg.o_groups
        wo_a = p[A + "o_a_proj.weight"].view(G, cfg.o_lora_rank, -1)
        o = torch.einsum("bsgd,grd->bsgr", o.reshape(B, S, G, -1), wo_a)
        a = o.flatten(2) @ p[A + "o_b_proj.weight"].T
        X = hc_post(a, X, post, comb)

        # ---- MoE
        x, post, comb = hc_pre(X, "ffn_hc")
        x = rms(x, p[L + "post_attention_layernorm.weight"]).reshape(B * S, D)
        M = L + "mlp."
        scores = F.softplus(x @ p[M + "gate.weight"].T).sqrt()
        if cfg.mlp_layer_types[li] == "hash_moe":
            idx = p[M + "gate.tid2eid"][ids.reshape(-1)]
        else:
            idx = (scores + p[M + "gate.e_score_correction_bias"]).topk(k, dim=-1).indices
        wts = scores.gather(1, idx)
        wts = wts / wts.sum(-1, keepdim=True) * cfg.routed_scaling_factor
        y = torch.zeros_like(x)
        gu, dn = p[M + "experts.gate_up_proj"], p[M + "experts.down_proj"]
        for e in range(E):
            tok, slot = torch.where(idx == e)
            if tok.numel():
                y = y.index_add(0, tok, expert(x[tok], gu[e, :I], gu[e, I:], dn[e], wts[tok, slot, None]))
        sh = M + "shared_experts."
        y = y + expert(
            x, p[sh + "gate_proj.weight"], p[sh + "up_proj.weight"], p[sh + "down_proj.weight"], clamp=shared_clamp
        )
        X = hc_post(y.view(B, S, D), X, post, comb)

    xf = X.flatten(2)
    mixes = (xf @ p["model.hc_head.hc_fn"].T) * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)
    pre = torch.sigmoid(mixes * p["model.hc_head.hc_scale"] + p["model.hc_head.hc_base"]) + hc_eps
    h = rms((pre.unsqueeze(-1) * X).sum(2), p["model.norm.weight"])
    return h @ p["lm_head.weight"].T


def cross_check_official(model, cfg, input_ids, labels, out) -> dict:
    params = {n: t.detach().clone().requires_grad_(t.is_floating_point()) for n, t in model.state_dict().items()}
    logits = official_reference_forward(params, cfg, input_ids)
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, cfg.vocab_size), labels[:, 1:].reshape(-1), ignore_index=-100)
    loss.backward()
    res = {
        "logits_max_abs_diff": float((logits.detach() - out.logits.detach()).abs().max()),
        "loss_abs_diff": float((loss.detach() - out.loss.detach()).abs()),
    }
    worst = 0.0
    for name, p in model.named_parameters():
        g_ref = params[name].grad
        if p.grad is None:
            assert g_ref is None or float(g_ref.abs().max()) == 0.0, name
            continue
        scale = float(p.grad.abs().max()) + 1e-12
        worst = max(worst, float((g_ref - p.grad).abs().max()) / scale)
    res["grad_max_rel_diff"] = worst
    with torch.no_grad():  # the 24-Apr release built the shared expert without the clamp: the fixtures reject that
        unclamped = official_reference_forward(params, cfg, input_ids, shared_clamp=False)
    res["release_unclamped_shared_expert_logits_max_abs_diff"] = float((unclamped - out.logits.detach()).abs().max())
    assert res["release_unclamped_shared_expert_logits_max_abs_diff"] > 1e-2
    assert res["logits_max_abs_diff"] < 1e-4 and res["loss_abs_diff"] < 1e-5 and worst < 1e-3, res
    return res


# ----------------------------------------------------------------------------------------------------------------
def build_inputs(spec: dict, vocab: int, gen: torch.Generator):
    B, S = spec["batch"], spec["seq"]
    input_ids = torch.randint(0, vocab, (B, S), generator=gen, dtype=torch.int64)
    labels = input_ids.clone()
    if spec["labels"] == "input_ids_with_ignore":
        # ignored spans: inside a row, at the row end, a single token, and a row's first label (never scored anyway)
        labels[0, 5:10] = -100
        labels[1, S - 3 :] = -100
        labels[2, 0] = -100
        labels[2, 17] = -100
    return input_ids, labels


def make_config(spec: dict) -> DeepseekV4Config:
    cfg = DeepseekV4Config(**json.loads(json.dumps(spec["hf"])))  # deep copy: __post_init__ mutates dicts
    cfg._attn_implementation = "eager"
    cfg._experts_implementation = "eager"
    return cfg


def run_once(spec: dict, seed: int):
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    cfg = make_config(spec)
    model = DeepseekV4ForCausalLM(cfg).to(torch.float32)
    assert model.config._attn_implementation == "eager" and model.config._experts_implementation == "eager"
    randomize(model, spec, gen)
    input_ids, labels = build_inputs(spec, cfg.vocab_size, gen)

    model.train()  # dropout is 0 everywhere; training mode = the trainer's semantics
    model.zero_grad(set_to_none=True)
    probes = Probes(model, input_ids)
    out = model(input_ids=input_ids, labels=labels, use_cache=False)
    out.loss.backward()
    probes.remove()
    return model, cfg, input_ids, labels, out, probes


def check_paths(spec: dict, model, cfg, input_ids, labels, out, probes: Probes) -> dict:
    """Asserts that every path is exercised; raises CheckFailed for margin failures (seed retry)."""
    S = input_ids.shape[1]
    types = cfg.layer_types
    rates = cfg.compress_rates
    report = {"seq": S, "batch": input_ids.shape[0]}

    assert input_ids.shape[0] >= 2
    assert SWA in types and CSA in types and HCA in types, types
    assert S > cfg.sliding_window
    assert S % rates[CSA] != 0 and S % rates[HCA] != 0, (S, rates)
    assert S // rates[HCA] >= 2, "want >= 2 HCA entries"
    assert all(probes.masks_are_tensors) and probes.masks_are_tensors, "eager attention must get a 4-D tensor mask"
    assert "hash_moe" in cfg.mlp_layer_types and "moe" in cfg.mlp_layer_types
    kinds = {probes.router[i]["kind"] for i in probes.router}
    assert kinds == {"hash", "learned"}, kinds

    # CSA indexer: top-k must actually prune, with a reproducible margin
    idx_report = {}
    for i, rec in probes.indexer.items():
        assert rec["max_visible"] > cfg.index_topk, rec
        assert rec["pruning_queries"] > 0
        idx_report[f"layer{i}"] = {
            k: rec[k] for k in ("entries", "max_visible", "pruning_queries", "invalid_picks", "min_rel_gap")
        }
        if rec["min_rel_gap"] < TOPK_REL_GAP:
            raise CheckFailed(f"indexer layer {i}: top-k gap {rec['min_rel_gap']:.2e}")
    assert len(probes.indexer) == types.count(CSA)
    report["indexer"] = idx_report

    # learned router: bias must change the selection for some (not all) tokens; reproducible top-k margin
    r_report = {}
    for i, rec in probes.router.items():
        if rec["kind"] != "learned":
            r_report[f"layer{i}"] = {"kind": "hash"}
            continue
        assert 0 < rec["bias_changed_tokens"] < rec["tokens"], rec["bias_changed_tokens"]
        r_report[f"layer{i}"] = {
            "kind": "learned",
            "bias_changed_tokens": rec["bias_changed_tokens"],
            "tokens": rec["tokens"],
            "min_rel_gap": rec["min_rel_gap"],
        }
        if rec["min_rel_gap"] < TOPK_REL_GAP:
            raise CheckFailed(f"router layer {i}: top-k gap {rec['min_rel_gap']:.2e}")
    report["router"] = r_report

    # SwiGLU clamp fires in routed and shared experts of every layer, on both sides
    for key, c in probes.clamp.items():
        assert c["gate_above"] > 0 and c["up_above"] > 0 and c["up_below"] > 0, (key, c)
        assert c["gate_above"] < c["gate_total"] // 2, (key, c)  # and not everywhere
    assert len(probes.clamp) == 2 * cfg.num_hidden_layers
    report["clamp"] = probes.clamp
    report["clamp_min_gap"] = probes.clamp_min_gap
    if probes.clamp_min_gap < CLAMP_GAP:
        raise CheckFailed(f"clamp gap {probes.clamp_min_gap:.2e}")

    # mHC: pre/post/comb far from their init values (0.5+eps, 1, ~1/N), comb not symmetric
    N = cfg.hc_mult
    hc_report = {}
    for name, pre, post, comb in probes.hc:
        d = {"pre_max_dev": float((pre - 0.5).abs().max())}
        assert d["pre_max_dev"] > 0.2, (name, d)
        if post is not None:
            d["post_max_dev"] = float((post - 1.0).abs().max())
            d["comb_max_dev"] = float((comb - 1.0 / N).abs().max())
            d["comb_max_asym"] = float((comb - comb.transpose(-1, -2)).abs().max())
            assert d["post_max_dev"] > 0.3 and d["comb_max_dev"] > 0.1 and d["comb_max_asym"] > 0.05, (name, d)
        hc_report[name] = d
    report["hc"] = hc_report

    for name, p in model.named_parameters():
        if name.endswith("self_attn.sinks"):
            assert float(p.detach().abs().min()) > 1e-3
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            assert float(b.abs().min()) > 1e-4

    n_scored = int((labels[:, 1:] != -100).sum())
    report["scored_label_positions"] = n_scored
    report["ignored_label_positions"] = int((labels[:, 1:] == -100).sum())
    if spec["labels"] == "input_ids_with_ignore":
        assert report["ignored_label_positions"] > 0
    # the loss is the plain mean CE over the shifted, non-ignored positions
    ref = F.cross_entropy(
        out.logits[:, :-1].reshape(-1, cfg.vocab_size).float(), labels[:, 1:].reshape(-1), ignore_index=-100
    )
    assert torch.allclose(ref, out.loss, rtol=0, atol=1e-6), (float(ref), float(out.loss))

    # exactly the indexer parameters get no gradient
    no_grad = sorted(n for n, p in model.named_parameters() if p.grad is None)
    expected = sorted(n for n, _ in model.named_parameters() if n.endswith(NO_GRAD_SUFFIXES))
    assert no_grad == expected, (no_grad, expected)
    assert len(expected) == len(NO_GRAD_SUFFIXES) * types.count(CSA)
    report["no_grad_params"] = no_grad
    return report


def collect_tensors(model, cfg, input_ids, labels, out, probes) -> dict:
    tensors = {}
    for name, t in model.state_dict().items():
        tensors[name] = t.detach().clone().contiguous()
    tensors["input_ids"] = input_ids.clone()
    tensors["labels"] = labels.clone()
    tensors["logits"] = out.logits.detach().float().clone().contiguous()
    tensors["loss"] = out.loss.detach().float().reshape(1).clone()
    for name, p in model.named_parameters():
        if p.grad is not None:
            tensors["grad." + name] = p.grad.detach().float().clone().contiguous()

    # debug intermediates (see README): rope tables, per-layer residual streams, routing, indexer picks
    rot = model.model.rotary_emb
    tensors["debug.rope.main.inv_freq"] = rot.main_inv_freq.detach().clone()
    tensors["debug.rope.compress.inv_freq"] = rot.compress_inv_freq.detach().clone()
    for i, x in sorted(probes.layer_out.items()):
        tensors[f"debug.layers.{i}.output_streams"] = x.float().contiguous()
    with torch.no_grad():
        final = model.model.norm(model.model.hc_head(probes.layer_out[cfg.num_hidden_layers - 1]))
    tensors["debug.final_hidden"] = final.float().contiguous()
    for i, rec in sorted(probes.router.items()):
        order = rec["indices"].argsort(dim=-1)  # store sorted by expert id (HF's topk is sorted=False)
        tensors[f"debug.layers.{i}.router_logits"] = rec["logits"].float().contiguous()
        tensors[f"debug.layers.{i}.router_indices"] = rec["indices"].gather(-1, order).to(torch.int64).contiguous()
        tensors[f"debug.layers.{i}.router_weights"] = rec["weights"].gather(-1, order).float().contiguous()
    for i, rec in sorted(probes.indexer.items()):
        tensors[f"debug.layers.{i}.indexer_topk"] = rec["topk"].sort(dim=-1).values.to(torch.int64).contiguous()
    return tensors


def check_reload(spec, cfg_dict: dict, st_path: str, logits: torch.Tensor, input_ids: torch.Tensor) -> float:
    """The written config.json + safetensors alone rebuild the same model: identical logits, also with the
    default use_cache=True path (the HF cache-backed compressors) and eval mode."""
    cfg = DeepseekV4Config(**json.loads(json.dumps(cfg_dict)))
    cfg._attn_implementation = "eager"
    cfg._experts_implementation = "eager"
    model = DeepseekV4ForCausalLM(cfg).to(torch.float32)
    saved = load_file(st_path)
    sd = {k: v for k, v in saved.items() if k in model.state_dict()}
    model.load_state_dict(sd, strict=True)
    model.eval()
    with torch.no_grad():
        again = model(input_ids=input_ids, use_cache=False).logits
        cached = model(input_ids=input_ids).logits  # use_cache defaults to True: DynamicCache + compressor caches
    assert torch.equal(again, logits), float((again - logits).abs().max())
    diff = float((cached - logits).abs().max())
    assert diff <= 1e-5, diff
    return diff


def generate(spec: dict, out_dir: str) -> dict:
    for attempt in range(50):
        seed = spec["seed"] + attempt
        model, cfg, input_ids, labels, out, probes = run_once(spec, seed)
        try:
            report = check_paths(spec, model, cfg, input_ids, labels, out, probes)
        except CheckFailed as e:
            print(f"  {spec['name']}: seed {seed} rejected ({e})", file=sys.stderr)
            continue
        break
    else:
        raise RuntimeError(f"{spec['name']}: no seed passed the margin checks")
    report["seed"] = seed
    report["loss"] = float(out.loss.detach())
    report["official_crosscheck"] = cross_check_official(model, cfg, input_ids, labels, out)

    cfg_dict = model.config.to_dict()
    cfg_dict.pop("_attn_implementation", None)
    cfg_dict.pop("_experts_implementation", None)
    cfg_json = json.dumps(cfg_dict, indent=2, sort_keys=True) + "\n"
    tensors = collect_tensors(model, cfg, input_ids, labels, out, probes)
    meta = {
        "generator": GENERATOR,
        "fixture": spec["name"],
        "versions": json.dumps(versions(), sort_keys=True),
        "seed": str(seed),
        "model_class": "transformers.DeepseekV4ForCausalLM (eager attention, eager experts, float32, train mode)",
        "labels": "unshifted; HF ForCausalLMLoss pads labels with -100 on the right and scores logits[:, t] "
        "against labels[:, t+1]; mean over positions != -100",
        "no_grad_params": json.dumps(report["no_grad_params"]),
        "checks": json.dumps({k: v for k, v in report.items() if k != "no_grad_params"}, sort_keys=True),
    }
    os.makedirs(out_dir, exist_ok=True)
    st_path = os.path.join(out_dir, spec["name"] + ".safetensors")
    write_safetensors(st_path, tensors, meta)
    with open(os.path.join(out_dir, spec["name"] + ".config.json"), "w") as f:
        f.write(cfg_json)
    report["use_cache_path_logits_max_abs_diff"] = check_reload(
        spec, json.loads(cfg_json), st_path, tensors["logits"], input_ids
    )
    report["bytes"] = os.path.getsize(st_path)
    return report


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-dir", default=DEFAULT_OUT)
    ap.add_argument("--verify", action="store_true", help="regenerate into a temp dir and byte-compare with --out-dir")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args()

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    transformers.logging.set_verbosity_error()

    target = tempfile.mkdtemp(prefix="dsv4_model_fixtures_") if args.verify else args.out_dir
    summary = {}
    for spec in CONFIGS:
        summary[spec["name"]] = generate(spec, target)
    if not args.quiet:
        print(json.dumps({"versions": versions(), "fixtures": summary}, indent=1, sort_keys=True, default=str))
    if args.verify:
        bad = []
        for spec in CONFIGS:
            for ext in (".safetensors", ".config.json"):
                a = os.path.join(target, spec["name"] + ext)
                b = os.path.join(args.out_dir, spec["name"] + ext)
                if not (os.path.exists(b) and filecmp.cmp(a, b, shallow=False)):
                    bad.append(b)
        shutil.rmtree(target)
        if bad:
            print("MISMATCH: " + ", ".join(bad), file=sys.stderr)
            return 1
        print(f"verify: {2 * len(CONFIGS)} files byte-identical to {args.out_dir}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

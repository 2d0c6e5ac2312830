#!/usr/bin/env python3
"""Reference fixtures for src/optim (tests/optim/test_optim_ref.cpp).

Oracles, all independent of the C++ code:
  * AdamW: torch.optim.AdamW itself (FP32, foreach=False) with betas (0.9, 0.95), eps 1e-20, weight_decay 0.1.
  * Muon: a reference written here in torch, in float64, following the DeepSeek-V4 report (Algorithm 1):
        M <- mu M + G;  U <- mu M + G (Nesterov);  X0 = U / max(||U||_F, eps)
        X <- a X + b (X X^T) X + c (X X^T)^2 X      8 x (3.4445, -4.7750, 2.0315), then 2 x (2, -1.5, 0.5)
        O = X * 0.18 * sqrt(max(n, m));  W <- W (1 - lr wd) - lr O
    (tall matrices are transposed so that the Gram matrix is the small side). Before anything is written it is
    cross-checked three ways (the script stops on any failure):
      1. against the formula on the untransposed matrix (big Gram for tall matrices), float64;
      2. against the spectral form: NS is an odd matrix polynomial, so NS(P S Q^T) = P p(S) Q^T with the scalar
         iteration s <- a s + b s^3 + c s^5 applied to each singular value (SVD in float64);
      3. against torch.optim.Muon's update pipeline (lerp momentum, Nesterov, decoupled decay, adjust_lr_fn
         "match_rms_adamw" = 0.2 sqrt(max(A, B))) with its NS function replaced by the hybrid NS and our scale set
         to 0.2: trajectories agree to FP32 level, and torch's momentum buffer is (1 - mu) times ours (its EMA
         form differs from M <- mu M + G only by that factor, which the Frobenius normalisation removes);
         torch's stock BF16 5-step NS agrees with ours on that schedule to BF16 level.

Outputs (deterministic: fixed seed, one thread, sorted-header writer):
  ns.safetensors     Newton-Schulz inputs and hybrid-NS outputs (float64 computed, stored F32) for several shapes,
                     plus torch's own BF16 5-step NS output for one matrix (for the C++ BF16 emulation).
  steps.safetensors  Two scenarios on named parameters, 4 steps each, with per-step gradients and learning rates:
                     "mixed/"  (Muon for matrices, AdamW for the rest, by name) and "adamw/" (AdamW everywhere).
"""
import argparse
import filecmp
import json
import math
import os
import sys
import tempfile

import numpy as np
import safetensors
import torch
from safetensors.torch import load_file

SEED = 20261122
MU = 0.95
GAMMA = 0.18
WD = 0.1
NS_EPS = 1e-7
BETAS = (0.9, 0.95)
ADAM_EPS = 1e-20
KELLER = (3.4445, -4.7750, 2.0315)
POLISH = (2.0, -1.5, 0.5)
HYBRID = [(8, KELLER), (2, POLISH)]
LRS = [0.02, 0.03, 0.03, 0.01]  # per step (python floats; the C++ test reads them from the metadata)

# (name, shape, group) of the step scenarios; the group is what the C++ default rules must assign.
PARAMS = [
    ("layers.0.attn.wq_a.weight", (5, 7), "muon"),
    ("layers.1.ffn.experts.3.w2.weight", (9, 4), "muon"),
    ("mtp.0.ffn.shared_experts.w1.weight", (6, 6), "muon"),
    ("hc_head_fn", (4, 12), "muon"),
    ("embed.weight", (4, 3), "adamw"),
    ("layers.1.attn.compressor.ape", (4, 3), "adamw"),
    ("layers.0.attn_norm.weight", (7,), "adamw"),
    ("layers.0.attn.attn_sink", (3,), "adamw"),
    ("layers.0.hc_attn_base", (5,), "adamw"),
    ("layers.0.hc_attn_scale", (1,), "adamw"),
]
# (param, step) pairs with no gradient at that step (p.grad = None: torch skips the parameter entirely).
NO_GRAD = {("layers.0.attn.attn_sink", 1), ("layers.0.attn.wq_a.weight", 2)}
NS_SHAPES = [(5, 7), (9, 4), (6, 6), (1, 5), (16, 3), (12, 20)]


# ---- reference Muon ------------------------------------------------------------------------------------------
def newton_schulz(U, schedule=HYBRID, eps=NS_EPS, dtype=torch.float64):
    X = U.to(dtype)
    tall = X.size(0) > X.size(1)
    if tall:
        X = X.T
    X = X / X.norm().clamp(min=eps)
    for steps, (a, b, c) in schedule:
        for _ in range(steps):
            A = X @ X.T
            B = b * A + c * (A @ A)
            X = a * X + B @ X
    return X.T if tall else X


def ns_formula(U, schedule=HYBRID, eps=NS_EPS):
    """The report's formula verbatim on the untransposed matrix (n x n Gram even for tall matrices)."""
    X = U.double()
    X = X / X.norm().clamp(min=eps)
    for steps, (a, b, c) in schedule:
        for _ in range(steps):
            G = X @ X.T
            X = a * X + b * (G @ X) + c * (G @ G @ X)
    return X


def ns_spectral(U, schedule=HYBRID, eps=NS_EPS):
    X = U.double()
    X = X / X.norm().clamp(min=eps)
    P, S, Qh = torch.linalg.svd(X, full_matrices=False)
    for steps, (a, b, c) in schedule:
        for _ in range(steps):
            S = a * S + b * S**3 + c * S**5
    return P @ torch.diag(S) @ Qh


class RefMuon:
    def __init__(self, schedule=HYBRID, gamma=GAMMA, ns_dtype=torch.float64):
        self.M, self.schedule, self.gamma, self.ns_dtype = {}, schedule, gamma, ns_dtype

    def step(self, name, W, G, lr, wd=WD, mu=MU):
        """W, G float64; returns the new W."""
        M = self.M.get(name, torch.zeros_like(G))
        M = mu * M + G
        self.M[name] = M
        U = mu * M + G
        O = newton_schulz(U, self.schedule, dtype=self.ns_dtype).double()
        O = O * (self.gamma * math.sqrt(max(W.shape)))
        return W * (1 - lr * wd) - lr * O


# ---- cross-checks ---------------------------------------------------------------------------------------------
def rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp(min=1e-300)).item()


def cross_check(gen):
    report = {}
    worst_formula = worst_spectral = 0.0
    for shape in NS_SHAPES + [(30, 8), (8, 30)]:
        U = torch.randn(shape, generator=gen, dtype=torch.float64)
        ref = newton_schulz(U)
        worst_formula = max(worst_formula, rel_err(ref, ns_formula(U)))
        worst_spectral = max(worst_spectral, rel_err(ref, ns_spectral(U)))
    assert worst_formula < 1e-11, worst_formula
    assert worst_spectral < 1e-9, worst_spectral
    report["ns_vs_formula_max_rel"] = worst_formula
    report["ns_vs_svd_polynomial_max_rel"] = worst_spectral

    # torch.optim.Muon's own pipeline (EMA/lerp momentum, Nesterov, decoupled decay before the update, lr adjust
    # "match_rms_adamw" = 0.2 sqrt(max(A, B))) with its NS function swapped for the float64 hybrid NS above, vs
    # RefMuon with gamma 0.2. Tight: both sides orthogonalise identically up to torch's FP32 state.
    worst_w = worst_buf = 0.0
    orig_ns = torch.optim._muon._zeropower_via_newtonschulz
    torch.optim._muon._zeropower_via_newtonschulz = (
        lambda g, coeffs, steps, eps: newton_schulz(g, HYBRID, eps).to(g.dtype))
    try:
        for shape in [(5, 7), (9, 4), (6, 6)]:
            W0 = (0.05 * torch.randn(shape, generator=gen)).float()
            grads = [torch.randn(shape, generator=gen).float() for _ in LRS]
            p = torch.nn.Parameter(W0.clone())
            opt = torch.optim.Muon([p], lr=LRS[0], weight_decay=WD, momentum=MU, nesterov=True, eps=NS_EPS,
                                   adjust_lr_fn="match_rms_adamw")
            ref = RefMuon(gamma=0.2)
            W = W0.double()
            for lr, g in zip(LRS, grads):
                for group in opt.param_groups:
                    group["lr"] = lr
                p.grad = g.clone()
                opt.step()
                W = ref.step("x", W, g.double(), lr)
                upd = (W - W0.double()).abs().max()
                worst_w = max(worst_w, ((p.detach().double() - W).abs().max() / upd).item())
            buf = opt.state[p]["momentum_buffer"].double()
            worst_buf = max(worst_buf, rel_err(buf, (1 - MU) * ref.M["x"]))
    finally:
        torch.optim._muon._zeropower_via_newtonschulz = orig_ns
    assert worst_w < 1e-4, worst_w
    assert worst_buf < 1e-5, worst_buf
    report["vs_torch_optim_Muon_traj_max_rel_to_update"] = worst_w
    report["vs_torch_optim_Muon_momentum_max_rel"] = worst_buf
    # torch's unpatched NS (Keller 5 steps, BF16) vs ours with the same schedule in float64: BF16-level agreement.
    worst_bf16 = 0.0
    for shape in [(5, 7), (9, 4), (6, 6)]:
        U = torch.randn(shape, generator=gen).float()
        worst_bf16 = max(worst_bf16, rel_err(orig_ns(U, KELLER, 5, NS_EPS).double(), newton_schulz(U, [(5, KELLER)])))
    assert worst_bf16 < 0.1, worst_bf16
    report["torch_bf16_keller5_vs_float64_max_rel"] = worst_bf16
    return report


# ---- fixtures -------------------------------------------------------------------------------------------------
def make_ns(gen):
    out = {}
    for r, c in NS_SHAPES:
        U = torch.randn((r, c), generator=gen).float()
        out[f"ns/{r}x{c}/in"] = U
        out[f"ns/{r}x{c}/out"] = newton_schulz(U.double()).float()
    U = torch.randn((5, 7), generator=gen).float()
    out["ns_bf16_keller5/5x7/in"] = U
    out["ns_bf16_keller5/5x7/out"] = torch.optim._muon._zeropower_via_newtonschulz(U, KELLER, 5, NS_EPS).float()
    return out


def run_scenario(prefix, gen, all_adamw):
    out = {}
    params, adam_params = {}, {}
    init = {n: (0.05 * torch.randn(s, generator=gen)).float() for n, s, _ in PARAMS}
    grads = [{n: torch.randn(s, generator=gen).float() for n, s, _ in PARAMS} for _ in LRS]
    ref_muon = RefMuon()
    for n, s, g in PARAMS:
        out[f"{prefix}/{n}/w0"] = init[n]
        group = "adamw" if all_adamw else g
        if group == "adamw":
            adam_params[n] = torch.nn.Parameter(init[n].clone())
        else:
            params[n] = init[n].double()
    opt = torch.optim.AdamW(list(adam_params.values()), lr=LRS[0], betas=BETAS, eps=ADAM_EPS, weight_decay=WD,
                            foreach=False, fused=False)
    # Independent float64 hand-written AdamW to cross-check torch's (tolerance at FP32 level).
    hand = {n: (init[n].double(), torch.zeros(init[n].shape, dtype=torch.float64),
                torch.zeros(init[n].shape, dtype=torch.float64), 0) for n in adam_params}
    for k, lr in enumerate(LRS):
        for group in opt.param_groups:
            group["lr"] = lr
        for n, s, _ in PARAMS:
            if (n, k) in NO_GRAD:
                if n in adam_params:
                    adam_params[n].grad = None
                continue
            G = grads[k][n]
            out[f"{prefix}/{n}/grad.{k}"] = G
            if n in adam_params:
                adam_params[n].grad = G.clone()
            else:
                params[n] = ref_muon.step(n, params[n], G.double(), lr)
        opt.step()
        for n in adam_params:
            if (n, k) in NO_GRAD:
                continue
            w, m, v, t = hand[n]
            G = grads[k][n].double()
            t += 1
            w = w * (1 - lr * WD)
            m = BETAS[0] * m + (1 - BETAS[0]) * G
            v = BETAS[1] * v + (1 - BETAS[1]) * G * G
            mh, vh = m / (1 - BETAS[0] ** t), v / (1 - BETAS[1] ** t)
            w = w - lr * mh / (vh.sqrt() + ADAM_EPS)
            hand[n] = (w, m, v, t)
        for n, s, _ in PARAMS:
            if n in adam_params:
                w = adam_params[n].detach().clone()
                assert rel_err(w - init[n], hand[n][0] - init[n].double()) < 1e-4, n
                out[f"{prefix}/{n}/w.{k}"] = w
            else:
                out[f"{prefix}/{n}/w.{k}"] = params[n].float()
    for n, p in adam_params.items():
        st = opt.state[p]
        out[f"{prefix}/{n}/exp_avg"] = st["exp_avg"].clone()
        out[f"{prefix}/{n}/exp_avg_sq"] = st["exp_avg_sq"].clone()
        out[f"{prefix}/{n}/step"] = torch.tensor([int(st["step"].item())], dtype=torch.int64)
    for n, M in ref_muon.M.items():
        out[f"{prefix}/{n}/momentum"] = M.float()
        out[f"{prefix}/{n}/step"] = torch.tensor([len(LRS) - sum(1 for q, _ in NO_GRAD if q == n)], dtype=torch.int64)
    return out


def write_safetensors(path, tensors, metadata):
    """Byte-deterministic writer (sorted JSON header, tensors in sorted-name order, header padded to 8)."""
    dtypes = {torch.float32: "F32", torch.int64: "I64"}
    header, blobs, offset = {"__metadata__": dict(sorted(metadata.items()))}, [], 0
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous()
        data = t.numpy().tobytes()
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
    back = load_file(path)
    assert back.keys() == tensors.keys() and all(torch.equal(back[k], tensors[k]) for k in tensors)
    assert sys.byteorder == "little"


def generate(out_dir):
    torch.manual_seed(SEED)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    gen = torch.Generator().manual_seed(SEED)
    report = cross_check(gen)
    common = {
        "generator": "tests/ref/optim/gen_optim_fixtures.py",
        "seed": str(SEED),
        "torch": torch.__version__,
        "safetensors": safetensors.__version__,
        "numpy": np.__version__,
        "python": sys.version.split()[0],
        "cross_check": json.dumps(report, sort_keys=True),
    }
    ns = make_ns(gen)
    write_safetensors(os.path.join(out_dir, "ns.safetensors"), ns,
                      dict(common, ns_schedule=json.dumps(HYBRID), ns_eps=repr(NS_EPS)))
    steps = {}
    steps.update(run_scenario("mixed", gen, all_adamw=False))
    steps.update(run_scenario("adamw", gen, all_adamw=True))
    meta = dict(common,
                lrs=",".join(repr(x) for x in LRS),
                params=",".join(n for n, _, _ in PARAMS),
                groups=",".join(f"{n}={g}" for n, _, g in PARAMS),
                no_grad=",".join(f"{n}@{k}" for n, k in sorted(NO_GRAD)),
                muon=json.dumps({"momentum": MU, "nesterov": True, "gamma": GAMMA, "weight_decay": WD,
                                 "ns_eps": NS_EPS, "schedule": HYBRID}),
                adamw=json.dumps({"betas": BETAS, "eps": ADAM_EPS, "weight_decay": WD}))
    write_safetensors(os.path.join(out_dir, "steps.safetensors"), steps, meta)
    return report


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-dir", default=os.path.join(here, "..", "..", "fixtures", "optim"))
    ap.add_argument("--verify", action="store_true", help="regenerate into a temp dir and byte-compare")
    args = ap.parse_args()
    if args.verify:
        with tempfile.TemporaryDirectory() as tmp:
            generate(tmp)
            bad = [f for f in ("ns.safetensors", "steps.safetensors")
                   if not filecmp.cmp(os.path.join(tmp, f), os.path.join(args.out_dir, f), shallow=False)]
            if bad:
                print("differ: " + ", ".join(bad))
                sys.exit(1)
            print("fixtures reproduce byte for byte")
        return
    os.makedirs(args.out_dir, exist_ok=True)
    report = generate(args.out_dir)
    print(json.dumps(report, indent=1, sort_keys=True))


if __name__ == "__main__":
    main()

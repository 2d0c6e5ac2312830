#!/usr/bin/env python3
"""LoRA / PEFT peer fixtures for tests/model/test_lora*.cpp (transformers 5.23.0 DeepseekV4 + PEFT 0.21.2, FP32, CPU).

Base model: tests/fixtures/ckpt/hf_saved_tiny/ (committed by tests/ref/ckpt/check_hf_load.py: vocab 64, hidden 32,
3 layers SWA / CSA / HCA, hash + learned MoE with 4 experts, o_groups 2). Writes into tests/fixtures/lora/:

  kaiming_init.safetensors   torch.nn.init.kaiming_uniform_(a=sqrt(5)) after torch.manual_seed(s) on CPU F32 [r, in]
                             for a few (s, r, in), and the A of unit "layers.0.attn.wq_a" for config seed 1234 (torch
                             seed = lora_init_seed below, the same hash as src/model/lora.cpp).
  peft_adapter/              a PEFT LoRA made by PEFT itself (get_peft_model, r 4, alpha 8, every attention projection
                             incl. o_a_proj via target_parameters, shared experts, routed experts gate_up_proj /
                             down_proj and the routers via target_parameters), PEFT's default A, B re-drawn N(0, 0.2)
                             (non-zero), saved with save_pretrained.
  peft_adapter.logits.safetensors
                             input_ids I64 [2, 19], logits F32 [2, 19, 64] of base + peft_adapter in PEFT.
  peft_adapter.train.safetensors
                             input_ids I64 [2, 19]; losses F32 [11] (doubles in the metadata "losses"): PEFT + torch.optim.AdamW (lr 5e-3, betas (0.9, 0.95),
                             eps 1e-8, weight_decay 0.1, no schedule) from peft_adapter on labels = input_ids, loss
                             before each of 10 steps and after the last.
  peft_adapter_after10/      the adapter after those 10 steps (save_pretrained).
  dsv4_adapter/              an adapter written by dsv4 (per-group wo_a, fused w13 / w1-only / w2 routed experts of
                             chosen experts, a router, a compressor projection): produced by
                             `test_model --gtest_filter=LoraPeft.Dsv4AdapterMatchesFixtureAndPeft` with
                             DSV4_LORA_WRITE_FIXTURES=<dir>.
  dsv4_adapter.logits.safetensors
                             input_ids, logits of base + dsv4_adapter loaded by PEFT (PeftModel.from_pretrained).

Every top-k decision (learned routers, CSA indexer) of every forward used (logits, and each of the 11 training
forwards) has a relative margin >= 1e-4 and every SwiGLU pre-activation is >= 1e-6 away from the clamp bounds, so an
FP32 port makes the same discrete choices; inputs failing that are skipped deterministically.

  cmake --build BUILD --target test_model
  tests/ref/.venv/bin/python tests/ref/lora/gen_lora_fixtures.py --test-model BUILD/tests/test_model
  tests/ref/.venv/bin/python tests/ref/lora/gen_lora_fixtures.py --test-model BUILD/tests/test_model --verify
"""

from __future__ import annotations

import argparse
import json
import math
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

import gen_model_fixtures as gmf  # noqa: E402  (write_safetensors, versions, TOPK_REL_GAP)
import peft  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from transformers import DeepseekV4ForCausalLM  # noqa: E402
from transformers.models.deepseek_v4 import modeling_deepseek_v4 as mdv4  # noqa: E402

GENERATOR = "tests/ref/lora/gen_lora_fixtures.py"
BASE = os.path.join(REPO_ROOT, "tests", "fixtures", "ckpt", "hf_saved_tiny")
BASE_NAME = "tests/fixtures/ckpt/hf_saved_tiny"
DEFAULT_OUT = os.path.join(REPO_ROOT, "tests", "fixtures", "lora")
BATCH, SEQ = 2, 19
CLAMP_GAP = 1e-6
LR, BETAS, EPS, WD, STEPS = 5e-3, (0.9, 0.95), 1e-8, 0.1, 10
PEFT_SEED, B_STD = 7, 0.2

TARGET_MODULES = (
    r".*\.self_attn\.(q_a_proj|q_b_proj|kv_proj|o_b_proj)$|.*\.mlp\.shared_experts\.(gate_proj|up_proj|down_proj)$"
)
TARGET_PARAMETERS = ["self_attn.o_a_proj.weight", "mlp.experts.gate_up_proj", "mlp.experts.down_proj", "mlp.gate.weight"]


# ---- dsv4's per-adapter torch seed (src/model/lora.cpp lora_init_seed) -------------------------------------------
M64 = (1 << 64) - 1


def splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & M64
    return x ^ (x >> 31)


def fnv1a64(s: str) -> int:
    h = 0xCBF29CE484222325
    for c in s.encode():
        h = ((h ^ c) * 0x100000001B3) & M64
    return h


def lora_init_seed(seed: int, unit: str) -> int:
    return splitmix64((seed ^ fnv1a64(unit)) & M64) & 0xFFFFFFFF


def kaiming(seed: int, r: int, n_in: int) -> torch.Tensor:
    torch.manual_seed(seed)
    t = torch.empty(r, n_in, dtype=torch.float32)
    torch.nn.init.kaiming_uniform_(t, a=math.sqrt(5))
    return t


def write_kaiming(out_dir: str) -> dict:
    cases = [(0, 4, 32), (1, 8, 16), (12345, 2, 100), (2**31 + 5, 3, 7), (4294967295, 5, 4096)]
    tensors, meta = {}, {}
    for s, r, n in cases:
        tensors[f"seed{s}_r{r}_in{n}"] = kaiming(s, r, n)
    unit_seed = lora_init_seed(1234, "layers.0.attn.wq_a")
    tensors["unit_layers.0.attn.wq_a_seed1234_r4_in32"] = kaiming(unit_seed, 4, 32)
    meta["unit_torch_seed"] = str(unit_seed)
    meta["generator"] = GENERATOR
    meta["versions"] = json.dumps(gmf.versions(), sort_keys=True)
    meta["what"] = "torch.manual_seed(seed); torch.nn.init.kaiming_uniform_(empty(r, in), a=math.sqrt(5))"
    path = os.path.join(out_dir, "kaiming_init.safetensors")
    gmf.write_safetensors(path, tensors, meta)
    return {"fixture": path, "unit_torch_seed": unit_seed}


# ---- models ----------------------------------------------------------------------------------------------------------
def load_base() -> DeepseekV4ForCausalLM:
    model, info = DeepseekV4ForCausalLM.from_pretrained(
        BASE, dtype=torch.float32, attn_implementation="eager", experts_implementation="eager", output_loading_info=True
    )
    bad = {k: v for k, v in info.items() if v}
    assert not bad, f"{BASE}: transformers reports {bad}"
    model.name_or_path = BASE_NAME
    model.config._name_or_path = BASE_NAME
    return model.eval()


def unwrap(m):
    while hasattr(m, "base_layer"):
        m = m.base_layer
    return m


class Margins:
    """Discrete decisions of a forward: learned-router and indexer top-k margins, SwiGLU clamp distances."""

    def __init__(self, hf_model):
        self.handles, self.patched = [], []
        self.router_gap, self.index_gap, self.clamp_gap = math.inf, math.inf, math.inf
        cfg = hf_model.config
        self.limit = cfg.swiglu_limit
        for layer in hf_model.model.layers:
            router = unwrap(layer.mlp.gate)
            if isinstance(router, mdv4.DeepseekV4TopKRouter):
                self.handles.append(router.register_forward_hook(self._router))
            experts = unwrap(layer.mlp.experts)
            orig = experts._apply_gate

            def gate(gate_up, _orig=orig):
                g, u = gate_up.detach().chunk(2, dim=-1)
                self._clamp(g, u)
                return _orig(gate_up)

            experts._apply_gate = gate
            self.patched.append(experts)
            shared, store = layer.mlp.shared_experts, {}
            self.handles.append(shared.gate_proj.register_forward_hook(lambda m, a, o, s=store: s.__setitem__("g", o.detach())))
            self.handles.append(shared.up_proj.register_forward_hook(lambda m, a, o, s=store: self._clamp(s.pop("g"), o.detach())))
            comp = layer.self_attn.compressor
            if isinstance(comp, mdv4.DeepseekV4CSACompressor):
                self._indexer(comp.indexer)

    def _clamp(self, g, u):
        lim = self.limit
        self.clamp_gap = min(self.clamp_gap, float((g - lim).abs().min()), float((u - lim).abs().min()),
                             float((u + lim).abs().min()))

    def _router(self, m, args, out):
        logits = out[0].detach()
        scores = m.score_fn(logits) + m.e_score_correction_bias
        srt = scores.sort(dim=-1, descending=True).values
        k = m.top_k
        gap = (srt[:, k - 1] - srt[:, k]) / (1.0 + srt.abs().max())
        self.router_gap = min(self.router_gap, float(gap.min()))

    def _indexer(self, indexer):
        store = {}
        self.handles.append(indexer.scorer.register_forward_hook(lambda m, a, o: store.__setitem__("s", o.detach())))

        def hook(m, args, out):
            scores = store.pop("s")
            B, S, T = scores.shape
            visible = ((args[2] + 1) // m.compress_rate).expand(B, S)
            scale = 1.0 + float(scores.abs().max())
            for b in range(B):
                for t in range(S):
                    n = int(visible[b, t])
                    if n > m.index_topk:
                        s = scores[b, t, :n].sort(descending=True).values
                        self.index_gap = min(self.index_gap, float(s[m.index_topk - 1] - s[m.index_topk]) / scale)

        self.handles.append(indexer.register_forward_hook(hook))

    def ok(self) -> bool:
        return self.router_gap >= gmf.TOPK_REL_GAP and self.index_gap >= gmf.TOPK_REL_GAP and self.clamp_gap >= CLAMP_GAP

    def report(self) -> dict:
        return {"router_min_rel_gap": self.router_gap, "indexer_min_rel_gap": self.index_gap,
                "clamp_min_gap": self.clamp_gap}

    def remove(self):
        for h in self.handles:
            h.remove()
        for e in self.patched:
            e.__dict__.pop("_apply_gate", None)


def input_ids(seed: int, vocab: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (BATCH, SEQ), generator=gen, dtype=torch.int64)


def peft_state(model) -> dict:
    return {k: v.detach().clone() for k, v in peft.get_peft_model_state_dict(model).items()}


def check_loaded(model, adapter_dir: str):
    """Every tensor of the adapter file is in the PEFT model, bit for bit (nothing silently dropped)."""
    file = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
    state = peft_state(model)
    assert set(file) == set(state), f"keys differ: {sorted(set(file) ^ set(state))}"
    for k, v in file.items():
        assert torch.equal(state[k], v), f"{k} differs after loading"


def logits_of(adapter_dir: str, seed0: int):
    base = load_base()
    model = PeftModel.from_pretrained(base, adapter_dir).eval()
    check_loaded(model, adapter_dir)
    hf = model.base_model.model
    for attempt in range(50):
        ids = input_ids(seed0 + attempt, hf.config.vocab_size)
        probe = Margins(hf)
        with torch.no_grad():
            logits = model(input_ids=ids, use_cache=False).logits.detach()
        probe.remove()
        if probe.ok():
            return ids, logits, {"input_seed": seed0 + attempt, **probe.report()}
        print(f"input seed {seed0 + attempt} rejected (margins {probe.report()})", file=sys.stderr)
    raise RuntimeError("no input with reproducible discrete decisions")


# ---- fixtures -------------------------------------------------------------------------------------------------------
def save_adapter(model, path: str):
    """save_pretrained, without the model card it also writes (README.md); files 0644."""
    shutil.rmtree(path, ignore_errors=True)
    model.save_pretrained(path)
    os.remove(os.path.join(path, "README.md"))
    for f in os.listdir(path):
        os.chmod(os.path.join(path, f), 0o644)


def make_peft_adapter(out_dir: str) -> dict:
    base = load_base()
    torch.manual_seed(PEFT_SEED)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=TARGET_MODULES, target_parameters=TARGET_PARAMETERS,
                     task_type="CAUSAL_LM")
    model = get_peft_model(base, cfg)
    gen = torch.Generator().manual_seed(PEFT_SEED + 1)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * B_STD)
    path = os.path.join(out_dir, "peft_adapter")
    shutil.rmtree(path, ignore_errors=True)
    save_adapter(model, path)
    keys = sorted(load_file(os.path.join(path, "adapter_model.safetensors")))
    return {"dir": path, "keys": len(keys)}


def write_logits(adapter_dir: str, out_path: str, seed0: int, what: str) -> dict:
    ids, logits, report = logits_of(adapter_dir, seed0)
    meta = {"generator": GENERATOR, "versions": json.dumps({**gmf.versions(), "peft": peft.__version__}, sort_keys=True),
            "margins": json.dumps(report, sort_keys=True), "what": what}
    gmf.write_safetensors(out_path, {"input_ids": ids, "logits": logits.float().contiguous()}, meta)
    return {"fixture": out_path, "max_abs_logit": float(logits.abs().max()), **report}


def train(adapter_dir: str, out_dir: str, seed0: int) -> dict:
    for attempt in range(50):
        base = load_base()
        model = PeftModel.from_pretrained(base, adapter_dir, is_trainable=True)
        check_loaded(model, adapter_dir)
        model.train()
        hf = model.base_model.model
        ids = input_ids(seed0 + attempt, hf.config.vocab_size)
        params = [p for _, p in model.named_parameters() if p.requires_grad]
        assert params and all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
        opt = torch.optim.AdamW(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)
        probe = Margins(hf)
        losses = []
        for step in range(STEPS + 1):
            out = model(input_ids=ids, labels=ids, use_cache=False)
            losses.append(float(out.loss.detach()))
            if step == STEPS:
                break
            out.loss.backward()
            opt.step()
            opt.zero_grad()
        probe.remove()
        if not probe.ok():
            print(f"training input seed {seed0 + attempt} rejected (margins {probe.report()})", file=sys.stderr)
            continue
        after = os.path.join(out_dir, "peft_adapter_after10")
        shutil.rmtree(after, ignore_errors=True)
        save_adapter(model, after)
        meta = {"generator": GENERATOR,
                "versions": json.dumps({**gmf.versions(), "peft": peft.__version__}, sort_keys=True),
                "margins": json.dumps({"input_seed": seed0 + attempt, **probe.report()}, sort_keys=True),
                "optimizer": json.dumps({"type": "torch.optim.AdamW", "lr": LR, "betas": BETAS, "eps": EPS,
                                         "weight_decay": WD, "steps": STEPS}),
                "what": "losses[k]: loss before AdamW step k (k < 10) and after the 10th step (k = 10), labels = "
                        "input_ids, starting from peft_adapter/"}
        meta["losses"] = json.dumps(losses)  # the doubles as Python prints them (the tensor holds them rounded to F32)
        path = os.path.join(out_dir, "peft_adapter.train.safetensors")
        gmf.write_safetensors(path, {"input_ids": ids, "losses": torch.tensor(losses, dtype=torch.float32)}, meta)
        return {"fixture": path, "losses": losses, "input_seed": seed0 + attempt, **probe.report()}
    raise RuntimeError("no training input with reproducible discrete decisions")


def make_dsv4_adapter(test_model: str, out_dir: str) -> dict:
    env = dict(os.environ, DSV4_LORA_WRITE_FIXTURES=out_dir)
    cmd = [test_model, "--gtest_filter=LoraPeft.Dsv4AdapterMatchesFixtureAndPeft"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert res.returncode == 0, f"{cmd} failed:\n{res.stdout}\n{res.stderr}"
    path = os.path.join(out_dir, "dsv4_adapter")
    assert os.path.exists(os.path.join(path, "adapter_model.safetensors")), res.stdout
    return {"dir": path}


def generate(test_model: str, out_dir: str) -> dict:
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    os.makedirs(out_dir, exist_ok=True)
    summary = {"kaiming": write_kaiming(out_dir), "peft_adapter": make_peft_adapter(out_dir)}
    adapter = os.path.join(out_dir, "peft_adapter")
    summary["peft_logits"] = write_logits(adapter, os.path.join(out_dir, "peft_adapter.logits.safetensors"), 500,
                                          "PEFT logits of hf_saved_tiny + peft_adapter")
    summary["train"] = train(adapter, out_dir, 600)
    summary["dsv4_adapter"] = make_dsv4_adapter(test_model, out_dir)
    summary["dsv4_logits"] = write_logits(os.path.join(out_dir, "dsv4_adapter"),
                                          os.path.join(out_dir, "dsv4_adapter.logits.safetensors"), 700,
                                          "PEFT logits of hf_saved_tiny + dsv4_adapter (written by dsv4)")
    for root, _, files in os.walk(out_dir):
        for f in files:
            size = os.path.getsize(os.path.join(root, f))
            assert size < (1 << 20), f"fixture {f} is {size} bytes (limit 1 MB)"
    return summary


def same_content(a: str, b: str) -> bool:
    """Byte-equal, or (safetensors written by PEFT / safetensors.torch, whose header order may vary) tensor-equal with
    equal metadata."""
    with open(a, "rb") as fa, open(b, "rb") as fb:
        if fa.read() == fb.read():
            return True
    if not a.endswith(".safetensors"):
        return False
    ta, tb = load_file(a), load_file(b)
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--test-model", required=True, help="path of the test_model binary (writes dsv4_adapter/)")
    ap.add_argument("--out-dir", default=DEFAULT_OUT)
    ap.add_argument("--verify", action="store_true", help="regenerate into a temp dir and compare with --out-dir")
    args = ap.parse_args()
    if args.verify:
        with tempfile.TemporaryDirectory() as tmp:
            generate(args.test_model, tmp)
            diffs = []
            for root, _, files in os.walk(tmp):
                for f in files:
                    a = os.path.join(root, f)
                    b = os.path.join(args.out_dir, os.path.relpath(a, tmp))
                    if not os.path.exists(b) or not same_content(a, b):
                        diffs.append(os.path.relpath(a, tmp))
            print(json.dumps({"verify": "ok" if not diffs else "differ", "files": sorted(diffs)}, indent=1))
            return 1 if diffs else 0
    print(json.dumps(generate(args.test_model, args.out_dir), indent=1, sort_keys=True, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())

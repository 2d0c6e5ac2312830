// GPU tests of runtime/model_ops.h: every CUDA twin against its CPU reference on random and odd shapes (widths that
// are not multiples of 128, one token, empty expert segments, ties in top-k). Tolerances per op (see model_ops.h):
//   bitwise     moe_route (same affinities), moe_sort_slots, moe_permute, moe_unpermute, ce_row_max, adamw_step,
//               muon_momentum_step, muon_apply_step
//   rtol 2e-6, atol 1e-6   rmsnorm y / rstd / dx, swiglu (+backward), sqrt_softplus (+backward), rope, ce sums / grad
//   rtol 1e-5, atol 1e-5   rmsnorm dweight (FP32 sums over rows in another order)
//   atol 2e-3              Newton-Schulz (cuBLAS vs CPU BLAS FP32 GEMMs over 10 iterations)
//   2^-5 max|ref|, RMS 2^-6 RMS(ref)   Newton-Schulz in BF16: same rounding points, but the FP32 sums before each
//                          BF16 rounding run in another order, so single BF16 ulps flip and the 10 iterations carry
//                          them on (a CPU emulation with two summation orders measured up to 1.7% of max|ref|, RMS
//                          0.6%, on shapes 64x200 .. 384x1024)
// Skipped without a GPU.
#include <array>
#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include "gpu_test_util.h"
#include "runtime/model_ops.h"

namespace dsv4 {
namespace {

using gputest::expect_close;
using gputest::expect_same_bits;
using gputest::expect_within;
using gputest::kCpu;
using gputest::kGpu;
using gputest::rand_cpu;
using gputest::rand_index;

class GpuModelOps : public gputest::GpuTest {};

Tensor G(const Tensor& t) { return t.defined() ? t.to(kGpu) : Tensor(); }

// A contiguous GPU copy of `t` whose data starts 4 bytes past a 16-byte boundary (the kernels' scalar fallbacks).
Tensor misaligned_gpu(const Tensor& t) {
  Tensor buf = Tensor::zeros({t.numel() + 4}, t.dtype(), kGpu);
  Tensor v = buf.slice(0, 1, t.numel() + 1).view(t.shape());
  v.copy_from(t);
  return v;
}

TEST_F(GpuModelOps, RmsNormForwardBackward) {
  for (auto [T, D] : {std::pair<int64_t, int64_t>{1, 7}, {3, 130}, {257, 1000}, {64, 4096}}) {
    for (bool weighted : {true, false}) {
      const Tensor x = rand_cpu({T, D}, -2, 2), dy = rand_cpu({T, D});
      const Tensor w = weighted ? rand_cpu({D}, 0.5f, 1.5f) : Tensor();
      const auto c = rmsnorm_forward(x, w, 1e-6);
      const auto g = rmsnorm_forward(G(x), G(w), 1e-6);
      expect_close(g.y, c.y, 2e-6, 1e-6, "rmsnorm y");
      expect_close(g.rstd, c.rstd, 2e-6, 0, "rmsnorm rstd");
      const auto cb = rmsnorm_backward(dy, x, w, c.rstd);
      const auto gb = rmsnorm_backward(G(dy), G(x), G(w), G(c.rstd));
      expect_close(gb.dx, cb.dx, 2e-6, 1e-6, "rmsnorm dx");
      if (weighted) expect_close(gb.dw, cb.dw, 1e-5, 1e-5, "rmsnorm dw");
    }
  }
}

// The vector kernels (dim % 4 == 0, 16-byte aligned, dim <= 8192: 1, 2, 4 or 8 float4 per thread; backward chunks
// of 16 rows, with a partial last chunk) and the scalar fallbacks (misaligned bases, dim > 8192).
TEST_F(GpuModelOps, RmsNormVectorAndScalarPaths) {
  for (auto [T, D] : {std::pair<int64_t, int64_t>{300, 2048}, {17, 8192}, {5, 9000}, {33, 1024}}) {
    for (bool weighted : {true, false}) {
      for (bool misaligned : {false, true}) {
        const Tensor x = rand_cpu({T, D}, -2, 2), dy = rand_cpu({T, D});
        const Tensor w = weighted ? rand_cpu({D}, 0.5f, 1.5f) : Tensor();
        auto M = [&](const Tensor& t) { return !t.defined() ? Tensor() : misaligned ? misaligned_gpu(t) : G(t); };
        const std::string what = fmt::format(" {}x{}{}{}", T, D, weighted ? " weighted" : "", misaligned ? " misaligned" : "");
        const auto c = rmsnorm_forward(x, w, 1e-6);
        const auto g = rmsnorm_forward(M(x), M(w), 1e-6);
        expect_close(g.y, c.y, 2e-6, 1e-6, "rmsnorm y" + what);
        expect_close(g.rstd, c.rstd, 2e-6, 0, "rmsnorm rstd" + what);
        const auto cb = rmsnorm_backward(dy, x, w, c.rstd);
        const auto gb = rmsnorm_backward(M(dy), M(x), M(w), G(c.rstd));
        expect_close(gb.dx, cb.dx, 2e-6, 1e-6, "rmsnorm dx" + what);
        if (weighted) expect_close(gb.dw, cb.dw, 1e-5, 1e-5, "rmsnorm dw" + what);
      }
    }
  }
}

TEST_F(GpuModelOps, RopeForwardInverse) {
  for (auto [P, H, dim, half] : {std::array<int64_t, 4>{1, 1, 8, 4}, {5, 3, 70, 16}, {33, 8, 192, 32}}) {
    const Tensor x = rand_cpu({P * H, dim});
    std::vector<int64_t> pv;
    for (int64_t p = 0; p < P; ++p) pv.push_back(p * 977 + 3);
    const Tensor pos = Tensor::from_vector<int64_t>({P}, pv);
    std::vector<float> f;
    for (int64_t i = 0; i < half; ++i) f.push_back(std::pow(10000.0f, -2.0f * static_cast<float>(i) / (2.0f * half)));
    const Tensor inv = Tensor::from_vector<float>({half}, f);
    for (bool inverse : {false, true}) {
      Tensor c = x.clone(), g = G(x);
      rope_apply(c, pos, inv, inverse);
      rope_apply(g, G(pos), G(inv), inverse);
      expect_close(g, c, 2e-6, 1e-6, inverse ? "rope inverse" : "rope");
    }
  }
}

// RoPE's vector path (even half, rotated part at a multiple of 4 floats, row stride % 4 == 0, aligned: cos / sin
// shared by the rows of a position) and its scalar fallbacks (odd half, rotated part at 34, misaligned base, row
// stride 517); also rows that are a column slice of wider rows (row stride 520 > dim).
TEST_F(GpuModelOps, RopeVectorAndScalarPaths) {
  for (auto [P, H, dim, half] : {std::array<int64_t, 4>{64, 16, 512, 32}, {9, 1, 64, 32}, {3, 2, 14, 3},
                                 {7, 5, 66, 16}, {300, 3, 128, 64}}) {
    const Tensor x = rand_cpu({P * H, dim});
    std::vector<int64_t> pv;
    for (int64_t p = 0; p < P; ++p) pv.push_back(p * 31 + 5);
    const Tensor pos = Tensor::from_vector<int64_t>({P}, pv);
    std::vector<float> f;
    for (int64_t i = 0; i < half; ++i) f.push_back(std::pow(10000.0f, -2.0f * static_cast<float>(i) / (2.0f * half)));
    const Tensor inv = Tensor::from_vector<float>({half}, f);
    for (bool inverse : {false, true}) {
      Tensor c = x.clone();
      rope_apply(c, pos, inv, inverse);
      const std::string what = fmt::format(" {}x{}x{} half {}{}", P, H, dim, half, inverse ? " inverse" : "");
      Tensor g = G(x);
      rope_apply(g, G(pos), G(inv), inverse);
      expect_close(g, c, 2e-6, 1e-6, "rope aligned" + what);
      Tensor m = misaligned_gpu(x);
      rope_apply(m, G(pos), G(inv), inverse);
      expect_close(m, c, 2e-6, 1e-6, "rope misaligned" + what);
      for (int64_t width : {dim + 8, dim + 5}) {
        Tensor wide = Tensor::zeros({P * H, width}, DType::F32, kGpu);
        Tensor v = wide.slice(1, 0, dim);
        v.copy_from(x);
        rope_apply(v, G(pos), G(inv), inverse);
        expect_close(v, c, 2e-6, 1e-6, fmt::format("rope row stride {}", width) + what);
      }
    }
  }
}

TEST_F(GpuModelOps, SwigluForwardBackward) {
  for (auto [T, I] : {std::pair<int64_t, int64_t>{1, 5}, {17, 300}, {128, 2048}}) {
    for (double limit : {0.0, 1.5}) {
      for (bool weighted : {true, false}) {
        const Tensor g = rand_cpu({T, I}, -4, 4), u = rand_cpu({T, I}, -3, 3), dh = rand_cpu({T, I});
        const Tensor w = weighted ? rand_cpu({T}, 0, 1) : Tensor();
        expect_close(swiglu(G(g), G(u), G(w), limit), swiglu(g, u, w, limit), 2e-6, 1e-6, "swiglu");
        const auto c = swiglu_backward(g, u, w, dh, limit);
        const auto d = swiglu_backward(G(g), G(u), G(w), G(dh), limit);
        expect_close(d.dg, c.dg, 2e-6, 1e-6, "swiglu dg");
        expect_close(d.du, c.du, 2e-6, 1e-6, "swiglu du");
        if (weighted) {
          // dw[t] = sum_i dh h (unweighted h): a reduction summed in another order, so the bound scales with
          // sum_i |dh h| rather than with |dw| (which can cancel; seen on an H100: 1.8e-6 off a 0.21 result).
          const Tensor h = swiglu(g, u, Tensor(), limit);
          const auto hv = h.to_floats(), dv = dh.to_floats();
          std::vector<float> tol(static_cast<size_t>(T));
          for (int64_t t = 0; t < T; ++t) {
            double sum = 0.0;
            for (int64_t i = 0; i < I; ++i) sum += std::fabs(double(hv[size_t(t * I + i)]) * dv[size_t(t * I + i)]);
            tol[size_t(t)] = static_cast<float>(4e-7 * sum + 1e-7);
          }
          gputest::expect_within(d.dw, c.dw, tol, "swiglu dw");
        }
      }
    }
  }
}

TEST_F(GpuModelOps, RouterScoresTopKAndBackward) {
  // E <= 256: the warp-per-token top-k; E = 300: the block-per-token one.
  for (auto [T, E, K] : {std::array<int64_t, 3>{1, 8, 2}, {37, 64, 6}, {200, 256, 8}, {5, 3, 3}, {9, 33, 6}, {20, 300, 6}}) {
    const Tensor s = rand_cpu({T, E}, -25, 25);
    const Tensor aff = sqrt_softplus(s);
    expect_close(sqrt_softplus(G(s)), aff, 2e-6, 1e-6, "sqrt_softplus");
    const Tensor daff_in = rand_cpu({T, E});
    expect_close(sqrt_softplus_backward(G(s), G(aff), G(daff_in)), sqrt_softplus_backward(s, aff, daff_in), 2e-6, 1e-6,
                 "sqrt_softplus backward");
    // Ties: quantise the affinities so equal values are common; zero bias keeps them tied.
    std::vector<float> av = aff.to_floats();
    for (auto& v : av) v = std::round(v * 2.0f) / 2.0f;
    const Tensor tied = Tensor::from_vector<float>({T, E}, av);
    const Tensor bias = rand_cpu({E}, -0.1f, 0.1f), zero = Tensor::zeros({E}, DType::F32);
    for (const Tensor* a : {&aff, &tied}) {
      for (const Tensor* b : {&bias, &zero}) {
        const auto c = moe_route(*a, *b, Tensor(), K, 2.5);
        const auto g = moe_route(G(*a), G(*b), Tensor(), K, 2.5);
        expect_same_bits(g.idx, c.idx, "route idx");
        expect_same_bits(g.w, c.w, "route w");
        const Tensor dw = rand_cpu({T, K});
        expect_same_bits(moe_route_backward(G(*a), g.idx, G(dw), 2.5), moe_route_backward(*a, c.idx, dw, 2.5),
                         "route backward");
      }
    }
    const Tensor fixed = rand_index({T, K}, E);  // hash routing (duplicates allowed)
    const auto c = moe_route(aff, Tensor(), fixed, K, 1.0);
    const auto g = moe_route(G(aff), Tensor(), G(fixed), K, 1.0);
    expect_same_bits(g.idx, c.idx, "hash idx");
    expect_same_bits(g.w, c.w, "hash w");
    const Tensor dw = rand_cpu({T, K});
    expect_same_bits(moe_route_backward(G(aff), G(fixed), G(dw), 1.0), moe_route_backward(aff, fixed, dw, 1.0),
                     "hash route backward");
  }
}

TEST_F(GpuModelOps, PermuteUnpermute) {
  for (auto [T, E, K, D] : {std::array<int64_t, 4>{1, 4, 2, 3}, {50, 16, 6, 129}, {300, 64, 8, 256}}) {
    // Only the first E/2 experts used: empty segments at the end and in between (odd ids never chosen).
    Tensor idx = rand_index({T, K}, E / 2);
    std::vector<int64_t> iv(static_cast<size_t>(T * K));
    std::memcpy(iv.data(), idx.data<int64_t>(), iv.size() * 8);
    for (auto& e : iv) e = (e * 2) % E;
    idx = Tensor::from_vector<int64_t>({T, K}, iv);
    const auto c = moe_sort_slots(idx, E);
    const auto g = moe_sort_slots(G(idx), E);
    expect_same_bits(g.offsets, c.offsets, "offsets");
    expect_same_bits(g.sorted_slot, c.sorted_slot, "sorted_slot");
    const Tensor x = rand_cpu({T, D});
    expect_same_bits(moe_permute(G(x), g.sorted_slot, K), moe_permute(x, c.sorted_slot, K), "permute");
    const Tensor ys = rand_cpu({T * K, D}), w = rand_cpu({T, K});
    expect_same_bits(moe_unpermute(G(ys), g.sorted_slot, Tensor(), T, K),
                     moe_unpermute(ys, c.sorted_slot, Tensor(), T, K), "unpermute");
    expect_same_bits(moe_unpermute(G(ys), g.sorted_slot, G(w), T, K), moe_unpermute(ys, c.sorted_slot, w, T, K),
                     "unpermute weighted");
  }
}

// Wide rows (vector path with several 512-column chunks and a partial one), K > 32 (second slot per lane),
// misaligned bases (scalar path even though D % 4 == 0).
TEST_F(GpuModelOps, PermuteUnpermuteVectorAndScalarPaths) {
  for (auto [T, E, K, D] : {std::array<int64_t, 4>{20, 64, 40, 1028}, {7, 8, 3, 1030}, {33, 16, 6, 2048}}) {
    const Tensor idx = rand_index({T, K}, E);
    const auto c = moe_sort_slots(idx, E);
    const Tensor ss = c.sorted_slot.to(kGpu);
    const Tensor x = rand_cpu({T, D});
    const Tensor ys = rand_cpu({T * K, D}), w = rand_cpu({T, K});
    const Tensor pc = moe_permute(x, c.sorted_slot, K);
    const Tensor uc = moe_unpermute(ys, c.sorted_slot, w, T, K);
    const Tensor uc0 = moe_unpermute(ys, c.sorted_slot, Tensor(), T, K);
    expect_same_bits(moe_permute(G(x), ss, K), pc, "permute aligned");
    expect_same_bits(moe_permute(misaligned_gpu(x), ss, K), pc, "permute misaligned");
    expect_same_bits(moe_unpermute(G(ys), ss, G(w), T, K), uc, "unpermute aligned");
    expect_same_bits(moe_unpermute(misaligned_gpu(ys), ss, G(w), T, K), uc, "unpermute misaligned");
    expect_same_bits(moe_unpermute(G(ys), ss, Tensor(), T, K), uc0, "unpermute unweighted aligned");
    expect_same_bits(moe_unpermute(misaligned_gpu(ys), ss, Tensor(), T, K), uc0, "unpermute unweighted misaligned");
  }
}

TEST_F(GpuModelOps, CrossEntropyPartials) {
  for (auto [T, V, begin, vocab] : {std::array<int64_t, 4>{1, 7, 0, 7}, {19, 1000, 0, 1000}, {64, 3001, 3001, 9000}}) {
    const Tensor z = rand_cpu({T, V}, -8, 8);
    std::vector<int64_t> tv;
    for (int64_t t = 0; t < T; ++t) tv.push_back(t % 5 == 4 ? kCeIgnoreIndex : (t * 7919) % vocab);
    const Tensor y = Tensor::from_vector<int64_t>({T}, tv);
    const Tensor mc = ce_row_max(z), mg = ce_row_max(G(z));
    expect_same_bits(mg, mc, "row max");
    const auto sc = ce_sums(z, y, mc, begin), sg = ce_sums(G(z), G(y), mg, begin);
    ASSERT_EQ(sc.size(), sg.size());
    for (size_t i = 0; i < sc.size(); ++i) EXPECT_NEAR(sg[i], sc[i], 1e-12 * std::fabs(sc[i]) + 1e-300) << i;
    std::vector<double> lse(static_cast<size_t>(T));
    for (int64_t t = 0; t < T; ++t) lse[t] = mc.data<float>()[t] + std::log(std::max(sc[t], 1e-300));
    expect_close(ce_backward(G(z), G(y), lse, 13.0, begin), ce_backward(z, y, lse, 13.0, begin), 2e-6, 1e-9,
                 "ce backward");
  }
}

// ce_sums / ce_backward: the float4 paths (V % 4 == 0, aligned; several 4096-column chunks and a partial one) and the
// scalar fallbacks (misaligned logits).
TEST_F(GpuModelOps, CrossEntropyVectorAndScalarPaths) {
  for (auto [T, V, begin] : {std::array<int64_t, 3>{9, 9000, 100}, {6, 2052, 0}}) {
    const Tensor z = rand_cpu({T, V}, -8, 8);
    std::vector<int64_t> tv;
    for (int64_t t = 0; t < T; ++t) tv.push_back(t % 4 == 3 ? kCeIgnoreIndex : begin + (t * 7919) % V);
    const Tensor y = Tensor::from_vector<int64_t>({T}, tv);
    const Tensor mc = ce_row_max(z);
    const auto sc = ce_sums(z, y, mc, begin);
    std::vector<double> lse(static_cast<size_t>(T));
    for (int64_t t = 0; t < T; ++t) lse[t] = mc.data<float>()[t] + std::log(std::max(sc[t], 1e-300));
    const Tensor bc = ce_backward(z, y, lse, 7.0, begin);
    for (bool misaligned : {false, true}) {
      const Tensor zg = misaligned ? misaligned_gpu(z) : G(z);
      const auto sg = ce_sums(zg, G(y), G(mc), begin);
      ASSERT_EQ(sc.size(), sg.size());
      for (size_t i = 0; i < sc.size(); ++i) EXPECT_NEAR(sg[i], sc[i], 1e-12 * std::fabs(sc[i]) + 1e-300) << i;
      expect_close(ce_backward(zg, G(y), lse, 7.0, begin), bc, 2e-6, 1e-9,
                   misaligned ? "ce backward misaligned" : "ce backward");
    }
  }
}

TEST_F(GpuModelOps, OptimizerElementRulesBitwise) {
  for (int64_t n : {int64_t{1}, int64_t{1000}, int64_t{65537}}) {
    const Tensor w0 = rand_cpu({n}), g = rand_cpu({n}), m0 = rand_cpu({n}, -0.1f, 0.1f), v0 = rand_cpu({n}, 0, 0.01f);
    for (double beta1 : {0.9, 0.3}) {
      const AdamWScalars s = adamw_scalars(beta1, 0.95, 1e-8, 0.1, 3, 1e-3);
      Tensor wc = w0.clone(), mc = m0.clone(), vc = v0.clone();
      Tensor wg = G(w0), mg = G(m0), vg = G(v0);
      adamw_step(wc, g, mc, vc, s);
      adamw_step(wg, G(g), mg, vg, s);
      expect_same_bits(wg, wc, "adamw w");
      expect_same_bits(mg, mc, "adamw m");
      expect_same_bits(vg, vc, "adamw v");
    }
    for (bool nesterov : {true, false}) {
      Tensor mc = m0.clone(), uc = Tensor::empty({n}, DType::F32), mg = G(m0), ug = Tensor::empty({n}, DType::F32, kGpu);
      muon_momentum_step(g, mc, uc, 0.95f, nesterov);
      muon_momentum_step(G(g), mg, ug, 0.95f, nesterov);
      expect_same_bits(mg, mc, "muon momentum");
      expect_same_bits(ug, uc, "muon u");
    }
    const MuonApplyScalars s = muon_apply_scalars(0.02, 0.1, 0.18, 64, 96);
    Tensor wc = w0.clone(), wg = G(w0);
    muon_apply_step(wc, g, s);
    muon_apply_step(wg, G(g), s);
    expect_same_bits(wg, wc, "muon apply");
  }
}

// Many tensors in one launch: sizes around the 16384-element chunks, empty tensors between, a NaN in one.
TEST_F(GpuModelOps, SumSquaresConvertAndScaleInPlace) {
  const std::vector<int64_t> sizes = {1, 0, 16383, 16384, 16385, 0, 100000, 7, 3 * 16384 + 5, 0};
  std::vector<Tensor> cpu, gpu;
  for (int64_t n : sizes) {
    cpu.push_back(rand_cpu({n}));
    gpu.push_back(G(cpu.back()));
  }
  const std::vector<double> want = sum_squares(cpu), got = sum_squares(gpu);
  ASSERT_EQ(got.size(), sizes.size());
  for (size_t i = 0; i < sizes.size(); ++i) EXPECT_NEAR(got[i], want[i], 1e-12 * want[i]) << "tensor " << i;
  std::vector<Tensor> bf_cpu, bf_gpu;
  for (int64_t n : sizes) {
    bf_cpu.push_back(Tensor::empty({n}, DType::BF16));
    bf_gpu.push_back(Tensor::empty({n}, DType::BF16, kGpu));
  }
  convert_to_bf16(cpu, bf_cpu);
  convert_to_bf16(gpu, bf_gpu);
  for (size_t i = 0; i < sizes.size(); ++i) expect_same_bits(bf_gpu[i], bf_cpu[i], "bf16 tensor " + std::to_string(i));
  scale_in_place(cpu, 0.37f);
  scale_in_place(gpu, 0.37f);
  for (size_t i = 0; i < sizes.size(); ++i) expect_same_bits(gpu[i], cpu[i], "scaled tensor " + std::to_string(i));
  Tensor h = cpu[4].clone();
  h.data<float>()[16384] = std::nanf("");
  gpu[4] = G(h);
  const std::vector<double> bad = sum_squares(gpu);
  for (size_t i = 0; i < sizes.size(); ++i) EXPECT_EQ(std::isfinite(bad[i]), i != 4) << "tensor " << i;
}

// The optimizer's list forms (one launch for all tensors): bit for bit the CPU loops, per-tensor AdamW scalars.
TEST_F(GpuModelOps, OptimizerListFormsBitwise) {
  const std::vector<int64_t> sizes = {1, 0, 16385, 40000, 7};
  std::vector<Tensor> wc, gc, mc, vc, wg, gg, mg, vg;
  std::vector<AdamWScalars> sc;
  for (size_t i = 0; i < sizes.size(); ++i) {
    const int64_t n = sizes[i];
    wc.push_back(rand_cpu({n}));
    gc.push_back(rand_cpu({n}));
    mc.push_back(rand_cpu({n}, -0.1f, 0.1f));
    vc.push_back(rand_cpu({n}, 0.0f, 0.1f));
    for (auto [from, to] : {std::pair{&wc, &wg}, {&gc, &gg}, {&mc, &mg}, {&vc, &vg}}) to->push_back(G(from->back().clone()));
    sc.push_back(adamw_scalars(0.9, 0.95, 1e-8, 0.1, static_cast<int64_t>(i) + 1, 1e-3));
  }
  adamw_steps(wc, gc, mc, vc, sc);
  adamw_steps(wg, gg, mg, vg, sc);
  for (size_t i = 0; i < sizes.size(); ++i)
    for (auto [c, g] : {std::pair{&wc, &wg}, {&mc, &mg}, {&vc, &vg}})
      expect_same_bits((*g)[i], (*c)[i], "adamw_steps tensor " + std::to_string(i));
  std::vector<Tensor> uc, ug;
  for (int64_t n : sizes) {
    uc.push_back(Tensor::empty({n}, DType::F32));
    ug.push_back(Tensor::empty({n}, DType::F32, kGpu));
  }
  muon_momentum_steps(gc, mc, uc, 0.95f, true);
  muon_momentum_steps(gg, mg, ug, 0.95f, true);
  muon_apply_steps(wc, uc, muon_apply_scalars(0.02, 0.1, 0.2, 64, 128));
  muon_apply_steps(wg, ug, muon_apply_scalars(0.02, 0.1, 0.2, 64, 128));
  for (size_t i = 0; i < sizes.size(); ++i)
    for (auto [c, g] : {std::pair{&wc, &wg}, {&mc, &mg}, {&uc, &ug}})
      expect_same_bits((*g)[i], (*c)[i], "muon list forms tensor " + std::to_string(i));
}

TEST_F(GpuModelOps, NewtonSchulzBatched) {
  for (auto [B, r, c] : {std::array<int64_t, 3>{1, 1, 5}, {3, 17, 40}, {2, 96, 33}, {1, 256, 256}}) {
    const Tensor x = rand_cpu({B, r, c});
    Tensor xc = x.clone(), xg = G(x);
    newton_schulz_batched(xc, hybrid_ns_schedule(), 1e-7);
    newton_schulz_batched(xg, hybrid_ns_schedule(), 1e-7);
    expect_close(xg, xc, 0, 2e-3, "newton-schulz");
  }
}

TEST_F(GpuModelOps, NewtonSchulzBatchedBf16) {
  // Wide, tall, square and odd shapes, batches of several; the CPU twin is the BF16 emulation of newton_schulz.
  for (auto [B, r, c] : {std::array<int64_t, 3>{1, 1, 5}, {4, 37, 100}, {3, 100, 37}, {2, 64, 64}, {5, 17, 40},
                         {2, 256, 512}}) {
    const std::string what = "newton-schulz bf16 [" + std::to_string(B) + ", " + std::to_string(r) + ", " +
                             std::to_string(c) + "]";
    const Tensor x = rand_cpu({B, r, c});
    Tensor xc = x.clone(), xg = G(x);
    newton_schulz_batched(xc, hybrid_ns_schedule(), 1e-7, NsPrecision::BF16);
    newton_schulz_batched(xg, hybrid_ns_schedule(), 1e-7, NsPrecision::BF16);
    const std::vector<float> got = xg.to_floats(), want = xc.to_floats();
    size_t not_bf16 = 0;
    for (float v : got) not_bf16 += v != round_bf16(v);
    EXPECT_EQ(not_bf16, 0u) << what << ": outputs that are not BF16 values";
    const double worst = gputest::expect_close_scaled(std::vector<double>(got.begin(), got.end()),
                                                      std::vector<double>(want.begin(), want.end()), 1.0 / 32, what);
    double se = 0, sr = 0;
    for (size_t i = 0; i < got.size(); ++i) {
      se += (double(got[i]) - want[i]) * (double(got[i]) - want[i]);
      sr += double(want[i]) * want[i];
    }
    const double rms = std::sqrt(se / sr);
    EXPECT_LE(rms, 1.0 / 64) << what;
    std::printf("  %s: max|gpu - cpu| / max|cpu| = %.3g, rms(gpu - cpu) / rms(cpu) = %.3g\n", what.c_str(), worst,
                rms);
  }
}

}  // namespace
}  // namespace dsv4

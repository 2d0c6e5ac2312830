#include "model/sparse_attention.h"

#include "runtime/host_phases.h"

#if defined(DSV4_WITH_CUDA)
#include "kernels/attention_kernels.h"
#include "kernels/cuda_runtime_api.h"
#endif

namespace dsv4 {

void SparseAttnIndex::validate(int64_t n_raw, int64_t n_comp) const {
  const size_t n = win_begin.size();
  DSV4_CHECK(win_end.size() == n && comp_offsets.size() == n + 1, "SparseAttnIndex: {} window begins, {} ends, {} offsets",
             n, win_end.size(), comp_offsets.size());
  DSV4_CHECK(comp_offsets[0] == 0 && (comp_ids_on_device ? comp_ids.empty()
                                                         : comp_offsets[n] == static_cast<int64_t>(comp_ids.size())),
             "SparseAttnIndex: offsets span [{}, {}) but {} compressed ids{}", comp_offsets[0], comp_offsets[n],
             comp_ids.size(), comp_ids_on_device ? " (expected none on the host: the ids are on the device)" : "");
  for (size_t t = 0; t < n; ++t) {
    DSV4_CHECK(0 <= win_begin[t] && win_begin[t] <= win_end[t] && win_end[t] <= n_raw,
               "SparseAttnIndex: query {} window [{}, {}) outside [0, {})", t, win_begin[t], win_end[t], n_raw);
    DSV4_CHECK(comp_offsets[t] <= comp_offsets[t + 1], "SparseAttnIndex: offsets decrease at query {}", t);
  }
  for (int64_t id : comp_ids)
    DSV4_CHECK(0 <= id && id < n_comp, "SparseAttnIndex: compressed id {} outside [0, {})", id, n_comp);
}

template void sparse_attn_forward<float>(const SparseAttnIndex&, const float*, const float*, const float*, const float*,
                                         int64_t, int64_t, float, float*, float*);
template void sparse_attn_backward<float>(const SparseAttnIndex&, const float*, const float*, const float*,
                                          const float*, const float*, const float*, const float*, int64_t, int64_t,
                                          float, float*, float*, float*, float*);

namespace {
void check_f32(const char* what, const Tensor& t, const Shape& shape, Device device) {
  DSV4_CHECK(t.defined() && t.dtype() == DType::F32 && t.is_contiguous() && t.device() == device && t.shape() == shape,
             "sparse attention: {} must be a contiguous F32 {} tensor on {}, got {}", what, shape.str(), device.str(),
             t.defined() ? t.str() : std::string("undefined"));
}

// Shapes of one call: T queries, H heads, C head dim, n_raw keys, n_comp entries; every tensor on q's device.
struct AttnDims {
  int64_t T, H, C, n_raw, n_comp;
};
AttnDims check_inputs(const SparseAttnIndex& idx, const Tensor& q, const Tensor& kv, const Tensor& ckv,
                      const Tensor& sink) {
  DSV4_CHECK(q.defined() && q.ndim() == 3 && kv.defined() && kv.ndim() == 2,
             "sparse attention: expected q [T, H, C] and kv [n_raw, C], got {} and {}", q.str(), kv.str());
  const AttnDims d{q.size(0), q.size(1), q.size(2), kv.size(0), ckv.defined() ? ckv.size(0) : 0};
  const Device dev = q.device();
  check_f32("q", q, q.shape(), dev);
  check_f32("kv", kv, Shape{d.n_raw, d.C}, dev);
  if (ckv.defined()) check_f32("ckv", ckv, Shape{d.n_comp, d.C}, dev);
  check_f32("sink", sink, Shape{d.H}, dev);
  DSV4_CHECK(idx.queries() == d.T, "sparse attention: candidate lists of {} queries for {} queries", idx.queries(),
             d.T);
  return d;
}

const float* data_or_null(const Tensor& t) { return t.defined() && t.numel() > 0 ? t.data<float>() : nullptr; }

#if defined(DSV4_WITH_CUDA)
void check_device_index(const SparseAttnDeviceIndex& didx, SparseAttnKeyMajor key_major) {
  const bool ok = didx.cand_offsets.defined() && didx.cand_ids.defined() &&
                  (key_major == SparseAttnKeyMajor::none || didx.key_offsets.defined()) &&
                  (key_major != SparseAttnKeyMajor::queries || didx.key_queries.defined()) &&
                  (key_major != SparseAttnKeyMajor::positions || didx.key_positions.defined());
  DSV4_CHECK(ok, "sparse attention on CUDA tensors: the device candidate lists were not built{}",
             key_major == SparseAttnKeyMajor::queries     ? " (with the key-major queries for the FP32 backward)"
             : key_major == SparseAttnKeyMajor::positions ? " (with the key-major positions for the tensor-core backward)"
                                                          : "");
}
#endif
}  // namespace

void* attention_kernel_stream(const Tensor& t) {
#if defined(DSV4_WITH_CUDA)
  return cuda::current_stream(t.device().index);
#else
  (void)t;
  fail_without_cuda("attention kernels");
#endif
}

void fail_without_cuda(const char* what) { DSV4_FAIL("{}: CUDA tensors, but dsv4 was built without CUDA", what); }

bool sparse_attn_tensor_cores_taken(bool tensor_cores, int64_t H, int64_t C) {
#if defined(DSV4_WITH_CUDA)
  return tensor_cores && cuda::sparse_attn_tc_supported(H, C);
#else
  (void)tensor_cores, (void)H, (void)C;
  return false;
#endif
}

SparseAttnDeviceIndex SparseAttnDeviceIndex::build(const SparseAttnIndex& idx, int64_t n_raw, int64_t n_comp,
                                                   Device device, SparseAttnKeyMajor key_major,
                                                   const Tensor& comp_ids_device) {
  SparseAttnDeviceIndex d;
  if (device.is_cpu()) return d;
#if defined(DSV4_WITH_CUDA)
  const HostPhase phase("attention: device candidate lists (host build + upload)");
  const auto upload = [&](const std::vector<int32_t>& v) {
    return Tensor::from_vector<int32_t>(Shape{static_cast<int64_t>(v.size())}, v).to(device);
  };
  DSV4_CHECK(!idx.comp_ids_on_device || (comp_ids_device.defined() && key_major != SparseAttnKeyMajor::queries),
             "SparseAttnDeviceIndex: the compressed ids are on the device only; the {} lists need them {}",
             key_major == SparseAttnKeyMajor::queries ? "query-major key" : "candidate",
             key_major == SparseAttnKeyMajor::queries ? "on the host" : "as comp_ids_device");
  if (comp_ids_device.defined() && key_major != SparseAttnKeyMajor::queries) {
    DSV4_CHECK(comp_ids_device.device() == device && comp_ids_device.dtype() == DType::I32 &&
                   comp_ids_device.is_contiguous() && comp_ids_device.numel() >= idx.comp_offsets.back(),
               "SparseAttnDeviceIndex: comp_ids_device {} does not hold the {} compressed ids on {}",
               comp_ids_device.str(), idx.comp_offsets.back(), device.str());
    const int64_t T = idx.queries();
    std::vector<int32_t> win_begin(static_cast<size_t>(T)), cand_offsets(static_cast<size_t>(T + 1)),
        comp_offsets(static_cast<size_t>(T + 1));
    int64_t nnz = 0;
    for (int64_t t = 0; t <= T; ++t) {
      const auto i = static_cast<size_t>(t);
      DSV4_CHECK(nnz <= 0x7FFFFFFF, "SparseAttnDeviceIndex: more than 2^31 - 1 candidates");
      cand_offsets[i] = static_cast<int32_t>(nnz);
      comp_offsets[i] = static_cast<int32_t>(idx.comp_offsets[i]);
      if (t < T) {
        win_begin[i] = static_cast<int32_t>(idx.win_begin[i]);
        nnz += std::max<int64_t>(idx.win_end[i] - idx.win_begin[i], 0) + idx.comp_offsets[i + 1] - idx.comp_offsets[i];
      }
    }
    void* stream = attention_kernel_stream(comp_ids_device);
    const Tensor win_begin_d = upload(win_begin), comp_offsets_d = upload(comp_offsets);
    d.cand_offsets = upload(cand_offsets);
    d.cand_ids = Tensor::empty({std::max<int64_t>(nnz, 1)}, DType::I32, device);
    d.n_candidates = nnz;
    cuda::build_sparse_candidates_device(win_begin_d.data<int32_t>(), d.cand_offsets.data<int32_t>(),
                                         comp_offsets_d.data<int32_t>(), comp_ids_device.data<int32_t>(), T, n_raw,
                                         d.cand_ids.data<int32_t>(), stream);
    if (key_major == SparseAttnKeyMajor::positions) {
      const int64_t rows = n_raw + n_comp;
      const size_t ws_bytes = cuda::key_major_positions_device_workspace(nnz, rows);
      Tensor ws = Tensor::empty({std::max<int64_t>(static_cast<int64_t>(ws_bytes), 1)}, DType::U8, device);
      d.key_offsets = Tensor::empty({rows + 1}, DType::I32, device);
      d.key_positions = Tensor::empty({std::max<int64_t>(nnz, 1)}, DType::I32, device);
      cuda::build_key_major_positions_device(d.cand_ids.data<int32_t>(), nnz, rows, d.key_offsets.data<int32_t>(),
                                             d.key_positions.data<int32_t>(), ws.raw_data(), ws_bytes, stream);
    }
    return d;
  }
  std::vector<int32_t> offsets, ids;
  cuda::build_sparse_candidates(idx.win_begin, idx.win_end, idx.comp_offsets, idx.comp_ids, n_raw, offsets, ids);
  d.cand_offsets = upload(offsets);
  d.cand_ids = upload(ids);
  d.n_candidates = static_cast<int64_t>(ids.size());
  std::vector<int32_t> koff, kmajor;
  if (key_major == SparseAttnKeyMajor::queries) {
    cuda::build_key_major(offsets, ids, n_raw + n_comp, koff, kmajor);
    d.key_queries = upload(kmajor);
  } else if (key_major == SparseAttnKeyMajor::positions) {
    cuda::build_key_major_positions(offsets, ids, n_raw + n_comp, koff, kmajor);
    d.key_positions = upload(kmajor);
  }
  if (key_major != SparseAttnKeyMajor::none) d.key_offsets = upload(koff);
#else
  (void)idx, (void)n_raw, (void)n_comp, (void)key_major;
  fail_without_cuda("SparseAttnDeviceIndex");
#endif
  return d;
}

SparseAttnOut sparse_attn_forward_tensors(const SparseAttnIndex& idx, const SparseAttnDeviceIndex& didx,
                                          const Tensor& q, const Tensor& kv, const Tensor& ckv, const Tensor& sink,
                                          float scale, bool tensor_cores) {
  const AttnDims d = check_inputs(idx, q, kv, ckv, sink);
  const Device dev = q.device();
  SparseAttnOut r{Tensor::empty({d.T, d.H, d.C}, DType::F32, dev), Tensor::empty({d.T, d.H}, DType::F32, dev)};
  if (d.T == 0) return r;
  if (dev.is_cuda()) {
#if defined(DSV4_WITH_CUDA)
    check_device_index(didx, SparseAttnKeyMajor::none);
    const bool tc = sparse_attn_tensor_cores_taken(tensor_cores, d.H, d.C);
    (tc ? cuda::sparse_attn_forward_tc : cuda::sparse_attn_forward)(
        q.data<float>(), kv.data<float>(), data_or_null(ckv), sink.data<float>(), didx.cand_offsets.data<int32_t>(),
        didx.cand_ids.data<int32_t>(), d.T, d.n_raw, d.n_comp, d.H, d.C, scale, r.o.data<float>(),
        r.lse.data<float>(), attention_kernel_stream(q));
#else
    (void)didx, (void)tensor_cores;
    fail_without_cuda("sparse_attn_forward_tensors");
#endif
    return r;
  }
  sparse_attn_forward<float>(idx, q.data<float>(), kv.data<float>(), data_or_null(ckv), sink.data<float>(), d.H, d.C,
                             scale, r.o.data<float>(), r.lse.data<float>());
  return r;
}

SparseAttnGrads sparse_attn_backward_tensors(const SparseAttnIndex& idx, const SparseAttnDeviceIndex& didx,
                                             const Tensor& q, const Tensor& kv, const Tensor& ckv, const Tensor& sink,
                                             const Tensor& o, const Tensor& lse, const Tensor& dout, float scale,
                                             bool tensor_cores) {
  const AttnDims d = check_inputs(idx, q, kv, ckv, sink);
  const Device dev = q.device();
  check_f32("o", o, q.shape(), dev);
  check_f32("lse", lse, Shape{d.T, d.H}, dev);
  check_f32("dout", dout, q.shape(), dev);
  SparseAttnGrads g;
  g.dq = Tensor::empty(q.shape(), DType::F32, dev);
  g.dkv = Tensor::zeros({d.n_raw, d.C}, DType::F32, dev);
  if (ckv.defined()) g.dckv = Tensor::zeros({d.n_comp, d.C}, DType::F32, dev);
  g.dsink = Tensor::zeros({d.H}, DType::F32, dev);
  if (d.T == 0) return g;
  if (dev.is_cuda()) {
#if defined(DSV4_WITH_CUDA)
    const float* ckv_p = data_or_null(ckv);
    float* dckv_p = g.dckv.defined() && d.n_comp > 0 ? g.dckv.data<float>() : nullptr;
    const auto stream = attention_kernel_stream(q);
    if (sparse_attn_tensor_cores_taken(tensor_cores, d.H, d.C)) {
      check_device_index(didx, SparseAttnKeyMajor::positions);
      Tensor ws = Tensor::empty({cuda::sparse_attn_backward_tc_workspace(d.T, d.H, d.C, didx.n_candidates)},
                                DType::F32, dev);
      cuda::sparse_attn_backward_tc(q.data<float>(), kv.data<float>(), ckv_p, sink.data<float>(), o.data<float>(),
                                    lse.data<float>(), dout.data<float>(), didx.cand_offsets.data<int32_t>(),
                                    didx.cand_ids.data<int32_t>(), didx.key_offsets.data<int32_t>(),
                                    didx.key_positions.data<int32_t>(), d.T, d.n_raw, d.n_comp, didx.n_candidates,
                                    d.H, d.C, scale, g.dq.data<float>(), g.dkv.data<float>(), dckv_p,
                                    g.dsink.data<float>(), ws.data<float>(), stream);
      return g;
    }
    check_device_index(didx, SparseAttnKeyMajor::queries);
    Tensor ws = Tensor::empty({std::max<int64_t>(cuda::sparse_attn_backward_workspace(d.T, d.H), 1)}, DType::F32, dev);
    cuda::sparse_attn_backward(q.data<float>(), kv.data<float>(), ckv_p, sink.data<float>(), o.data<float>(),
                               lse.data<float>(), dout.data<float>(), didx.cand_offsets.data<int32_t>(),
                               didx.cand_ids.data<int32_t>(), didx.key_offsets.data<int32_t>(),
                               didx.key_queries.data<int32_t>(), d.T, d.n_raw, d.n_comp, d.H, d.C, scale,
                               g.dq.data<float>(), g.dkv.data<float>(), dckv_p, g.dsink.data<float>(),
                               ws.data<float>(), stream);
#else
    (void)didx, (void)tensor_cores;
    fail_without_cuda("sparse_attn_backward_tensors");
#endif
    return g;
  }
  sparse_attn_backward<float>(idx, q.data<float>(), kv.data<float>(), data_or_null(ckv), sink.data<float>(),
                              o.data<float>(), lse.data<float>(), dout.data<float>(), d.H, d.C, scale,
                              g.dq.data<float>(), g.dkv.data<float>(),
                              g.dckv.defined() && d.n_comp > 0 ? g.dckv.data<float>() : nullptr,
                              g.dsink.data<float>());
  return g;
}

}  // namespace dsv4

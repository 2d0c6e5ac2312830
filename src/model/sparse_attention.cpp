#include "model/sparse_attention.h"

namespace dsv4 {

void SparseAttnIndex::validate(int64_t n_raw, int64_t n_comp) const {
  const size_t n = win_begin.size();
  DSV4_CHECK(win_end.size() == n && comp_offsets.size() == n + 1, "SparseAttnIndex: {} window begins, {} ends, {} offsets",
             n, win_end.size(), comp_offsets.size());
  DSV4_CHECK(comp_offsets[0] == 0 && comp_offsets[n] == static_cast<int64_t>(comp_ids.size()),
             "SparseAttnIndex: offsets span [{}, {}) but {} compressed ids", comp_offsets[0], comp_offsets[n],
             comp_ids.size());
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

}  // namespace dsv4

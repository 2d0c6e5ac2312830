// Frontends of runtime/model_ops.h: validation, allocation and device dispatch.
#include "runtime/model_ops.h"
#include "runtime/backend_dispatch.h"

#include <cstring>

#include "runtime/error.h"

namespace dsv4 {
namespace {


std::string describe(const Tensor& t) { return t.defined() ? t.str() : std::string("none"); }

// A defined, contiguous tensor of `dtype` with `ndim` dims (-1: any) on `device`.
void check_arg(const Tensor& t, const char* op, const char* arg, DType dtype, int ndim, const Device& device) {
  DSV4_CHECK(t.defined() && t.dtype() == dtype && (ndim < 0 || t.ndim() == ndim) && t.is_contiguous() &&
                 t.device() == device,
             "{}: {} must be a contiguous {} {}-D tensor on {}, got {}", op, arg, dtype_name(dtype), ndim,
             device.str(), describe(t));
}
void check_shape(const Tensor& t, const Shape& s, const char* op, const char* arg) {
  DSV4_CHECK(t.shape() == s, "{}: {} has shape {}, expected {}", op, arg, t.str(), s.str());
}

}  // namespace

RmsNormOut rmsnorm_forward(const Tensor& x, const Tensor& w, double eps) {
  const char* op = "rmsnorm_forward";
  check_arg(x, op, "x", DType::F32, 2, x.defined() ? x.device() : Device::cpu());
  if (w.defined()) {
    check_arg(w, op, "w", DType::F32, 1, x.device());
    check_shape(w, Shape{x.size(1)}, op, "w");
  }
  RmsNormOut o{Tensor::empty(x.shape(), DType::F32, x.device()), Tensor::empty({x.size(0)}, DType::F32, x.device())};
  if (x.size(0) > 0) DSV4_BACKEND_DISPATCH(x.device(), rmsnorm_forward, x, w, eps, o.y, o.rstd);
  return o;
}

RmsNormGrad rmsnorm_backward(const Tensor& dy, const Tensor& x, const Tensor& w, const Tensor& rstd) {
  const char* op = "rmsnorm_backward";
  check_arg(x, op, "x", DType::F32, 2, x.defined() ? x.device() : Device::cpu());
  check_arg(dy, op, "dy", DType::F32, 2, x.device());
  check_shape(dy, x.shape(), op, "dy");
  check_arg(rstd, op, "rstd", DType::F32, 1, x.device());
  check_shape(rstd, Shape{x.size(0)}, op, "rstd");
  RmsNormGrad g;
  g.dx = Tensor::empty(x.shape(), DType::F32, x.device());
  if (w.defined()) {
    check_arg(w, op, "w", DType::F32, 1, x.device());
    check_shape(w, Shape{x.size(1)}, op, "w");
    // Both backends write dw whole; zeros only where no backend runs.
    g.dw = x.size(0) > 0 ? Tensor::empty({x.size(1)}, DType::F32, x.device())
                         : Tensor::zeros({x.size(1)}, DType::F32, x.device());
  }
  if (x.size(0) > 0) DSV4_BACKEND_DISPATCH(x.device(), rmsnorm_backward, dy, x, w, rstd, g.dx, g.dw);
  return g;
}

void rope_apply(Tensor& x, const Tensor& pos, const Tensor& inv_freq, bool inverse) {
  const char* op = "rope_apply";
  DSV4_CHECK(x.defined() && x.dtype() == DType::F32 && x.ndim() == 2 && (x.stride(1) == 1 || x.size(1) <= 1) &&
                 x.stride(0) >= x.size(1),
             "{}: x must be an F32 [R, dim] tensor with a contiguous last dim, got {}", op, describe(x));
  check_arg(pos, op, "pos", DType::I64, 1, x.device());
  check_arg(inv_freq, op, "inv_freq", DType::F32, 1, x.device());
  const int64_t R = x.size(0), P = pos.numel();
  DSV4_CHECK((P == 0 && R == 0) || (P > 0 && R % P == 0), "{}: {} rows do not split over {} positions", op, R, P);
  DSV4_CHECK(2 * inv_freq.numel() <= x.size(1), "{}: rot_dim {} exceeds the row width {}", op, 2 * inv_freq.numel(),
             x.size(1));
  if (R > 0 && inv_freq.numel() > 0) DSV4_BACKEND_DISPATCH(x.device(), rope_apply, x, pos, inv_freq, inverse);
}

namespace {
// g and u of the SwiGLU ops: F32 [T, I] on one device with a contiguous last dim and one row stride (contiguous, or
// the two column halves of a fused [T, 2I] tensor).
void check_swiglu_pair(const Tensor& g, const Tensor& u, const char* op, const char* gname, const char* uname) {
  auto ok = [](const Tensor& t) {
    return t.defined() && t.dtype() == DType::F32 && t.ndim() == 2 && (t.size(1) <= 1 || t.stride(1) == 1) &&
           t.stride(0) >= t.size(1);
  };
  DSV4_CHECK(ok(g), "{}: {} must be an F32 [T, I] tensor with a contiguous last dim, got {}", op, gname, describe(g));
  DSV4_CHECK(ok(u) && u.shape() == g.shape() && u.stride(0) == g.stride(0) && u.device() == g.device(),
             "{}: {} must be an F32 {} tensor on {} with {}'s row stride {}, got {}", op, uname, g.shape().str(),
             g.device().str(), gname, g.stride(0), describe(u));
}
}  // namespace

Tensor swiglu(const Tensor& g, const Tensor& u, const Tensor& w, double limit) {
  const char* op = "swiglu";
  check_swiglu_pair(g, u, op, "g", "u");
  if (w.defined()) {
    check_arg(w, op, "w", DType::F32, 1, g.device());
    check_shape(w, Shape{g.size(0)}, op, "w");
  }
  Tensor h = Tensor::empty(g.shape(), DType::F32, g.device());
  if (g.numel() > 0) DSV4_BACKEND_DISPATCH(g.device(), swiglu, g, u, w, limit, h);
  return h;
}

Tensor hashed_dropout(const Tensor& x, uint64_t stream, double p, float keep_scale, uint64_t mask_offset) {
  DSV4_CHECK(x.defined() && x.dtype() == DType::F32 && x.ndim() == 2 && (x.size(1) <= 1 || x.stride(1) == 1),
             "hashed_dropout: x must be an F32 2-D tensor with unit stride in the last dim, got {}", describe(x));
  DSV4_CHECK(p >= 0.0 && p < 1.0, "hashed_dropout: p = {} outside [0, 1)", p);
  Tensor out = Tensor::empty(x.shape(), DType::F32, x.device());
  if (x.numel() > 0) DSV4_BACKEND_DISPATCH(x.device(), hashed_dropout, x, stream, p, keep_scale, mask_offset, out);
  return out;
}

SwigluGrad swiglu_backward(const Tensor& g, const Tensor& u, const Tensor& w, const Tensor& dh, double limit,
                           bool fused_grads) {
  const char* op = "swiglu_backward";
  check_swiglu_pair(g, u, op, "g", "u");
  check_arg(dh, op, "dh", DType::F32, 2, g.device());
  check_shape(dh, g.shape(), op, "dh");
  SwigluGrad r;
  if (fused_grads) {
    const int64_t I = g.size(1);
    r.dgu = Tensor::empty({g.size(0), 2 * I}, DType::F32, g.device());
    r.dg = r.dgu.slice(1, 0, I);
    r.du = r.dgu.slice(1, I, 2 * I);
  } else {
    r.dg = Tensor::empty(g.shape(), DType::F32, g.device());
    r.du = Tensor::empty(g.shape(), DType::F32, g.device());
  }
  if (w.defined()) {
    check_arg(w, op, "w", DType::F32, 1, g.device());
    check_shape(w, Shape{g.size(0)}, op, "w");
    // Both backends write every row's dw; zeros only where no backend runs.
    r.dw = g.numel() > 0 ? Tensor::empty({g.size(0)}, DType::F32, g.device())
                         : Tensor::zeros({g.size(0)}, DType::F32, g.device());
  }
  if (g.numel() > 0) DSV4_BACKEND_DISPATCH(g.device(), swiglu_backward, g, u, w, dh, limit, r.dg, r.du, r.dw);
  return r;
}

Tensor sqrt_softplus(const Tensor& s) {
  check_arg(s, "sqrt_softplus", "s", DType::F32, -1, s.defined() ? s.device() : Device::cpu());
  Tensor aff = Tensor::empty(s.shape(), DType::F32, s.device());
  if (s.numel() > 0) DSV4_BACKEND_DISPATCH(s.device(), sqrt_softplus, s, aff);
  return aff;
}

Tensor sqrt_softplus_backward(const Tensor& s, const Tensor& aff, const Tensor& daff) {
  const char* op = "sqrt_softplus_backward";
  check_arg(s, op, "s", DType::F32, -1, s.defined() ? s.device() : Device::cpu());
  check_arg(aff, op, "aff", DType::F32, -1, s.device());
  check_arg(daff, op, "daff", DType::F32, -1, s.device());
  check_shape(aff, s.shape(), op, "aff");
  check_shape(daff, s.shape(), op, "daff");
  Tensor ds = Tensor::empty(s.shape(), DType::F32, s.device());
  if (s.numel() > 0) DSV4_BACKEND_DISPATCH(s.device(), sqrt_softplus_backward, s, aff, daff, ds);
  return ds;
}

MoeRoute moe_route(const Tensor& aff, const Tensor& bias, const Tensor& fixed_idx, int64_t K, double route_scale) {
  const char* op = "moe_route";
  check_arg(aff, op, "aff", DType::F32, 2, aff.defined() ? aff.device() : Device::cpu());
  const int64_t T = aff.size(0), E = aff.size(1);
  if (fixed_idx.defined()) {
    check_arg(fixed_idx, op, "fixed_idx", DType::I64, 2, aff.device());
    check_shape(fixed_idx, Shape{T, K}, op, "fixed_idx");
  } else {
    DSV4_CHECK(K >= 1 && K <= E, "{}: K = {} must be in [1, {}]", op, K, E);
  }
  if (bias.defined()) {
    check_arg(bias, op, "bias", DType::F32, 1, aff.device());
    check_shape(bias, Shape{E}, op, "bias");
  }
  MoeRoute r{Tensor::empty({T, K}, DType::I64, aff.device()), Tensor::empty({T, K}, DType::F32, aff.device())};
  if (T > 0 && K > 0) DSV4_BACKEND_DISPATCH(aff.device(), moe_route, aff, bias, fixed_idx, route_scale, r.idx, r.w);
  return r;
}

Tensor moe_route_backward(const Tensor& aff, const Tensor& idx, const Tensor& dw, double route_scale) {
  const char* op = "moe_route_backward";
  check_arg(aff, op, "aff", DType::F32, 2, aff.defined() ? aff.device() : Device::cpu());
  check_arg(idx, op, "idx", DType::I64, 2, aff.device());
  check_arg(dw, op, "dw", DType::F32, 2, aff.device());
  DSV4_CHECK(idx.size(0) == aff.size(0), "{}: idx {} does not match aff {}", op, idx.str(), aff.str());
  check_shape(dw, idx.shape(), op, "dw");
  Tensor daff = Tensor::zeros(aff.shape(), DType::F32, aff.device());
  if (idx.numel() > 0) DSV4_BACKEND_DISPATCH(aff.device(), moe_route_backward, aff, idx, dw, route_scale, daff);
  return daff;
}

MoeSlots moe_sort_slots(const Tensor& idx, int64_t E) {
  check_arg(idx, "moe_sort_slots", "idx", DType::I64, 2, idx.defined() ? idx.device() : Device::cpu());
  DSV4_CHECK(E >= 1, "moe_sort_slots: E = {} must be >= 1", E);
  MoeSlots s{Tensor::zeros({E + 1}, DType::I64, idx.device()), Tensor::empty({idx.numel()}, DType::I64, idx.device())};
  if (idx.numel() > 0) DSV4_BACKEND_DISPATCH(idx.device(), moe_sort_slots, idx, E, s.offsets, s.sorted_slot);
  return s;
}

Tensor moe_permute(const Tensor& x, const Tensor& sorted_slot, int64_t K) {
  const char* op = "moe_permute";
  check_arg(x, op, "x", DType::F32, 2, x.defined() ? x.device() : Device::cpu());
  check_arg(sorted_slot, op, "sorted_slot", DType::I64, 1, x.device());
  DSV4_CHECK(K >= 1 && sorted_slot.numel() == x.size(0) * K, "{}: {} slots for {} rows and K = {}", op,
             sorted_slot.numel(), x.size(0), K);
  Tensor out = Tensor::empty({sorted_slot.numel(), x.size(1)}, DType::F32, x.device());
  if (out.numel() > 0) DSV4_BACKEND_DISPATCH(x.device(), moe_permute, x, sorted_slot, K, out);
  return out;
}

Tensor moe_unpermute(const Tensor& y_sorted, const Tensor& sorted_slot, const Tensor& w, int64_t T, int64_t K) {
  const char* op = "moe_unpermute";
  check_arg(y_sorted, op, "y_sorted", DType::F32, 2, y_sorted.defined() ? y_sorted.device() : Device::cpu());
  check_arg(sorted_slot, op, "sorted_slot", DType::I64, 1, y_sorted.device());
  DSV4_CHECK(K >= 1 && sorted_slot.numel() == T * K && y_sorted.size(0) == T * K,
             "{}: {} slots / {} rows for T = {} and K = {}", op, sorted_slot.numel(), y_sorted.size(0), T, K);
  if (w.defined()) {
    check_arg(w, op, "w", DType::F32, 2, y_sorted.device());
    check_shape(w, Shape{T, K}, op, "w");
  }
  Tensor y = Tensor::zeros({T, y_sorted.size(1)}, DType::F32, y_sorted.device());
  if (y.numel() > 0) DSV4_BACKEND_DISPATCH(y_sorted.device(), moe_unpermute, y_sorted, sorted_slot, w, K, y);
  return y;
}

Tensor ce_row_max(const Tensor& logits) {
  check_arg(logits, "ce_row_max", "logits", DType::F32, 2, logits.defined() ? logits.device() : Device::cpu());
  Tensor m = Tensor::empty({logits.size(0)}, DType::F32, logits.device());
  if (logits.size(0) > 0) DSV4_BACKEND_DISPATCH(logits.device(), ce_row_max, logits, m);
  return m;
}

std::vector<double> ce_sums(const Tensor& logits, const Tensor& targets, const Tensor& row_max, int64_t begin) {
  const char* op = "ce_sums";
  check_arg(logits, op, "logits", DType::F32, 2, logits.defined() ? logits.device() : Device::cpu());
  check_arg(targets, op, "targets", DType::I64, 1, logits.device());
  check_arg(row_max, op, "row_max", DType::F32, 1, logits.device());
  check_shape(targets, Shape{logits.size(0)}, op, "targets");
  check_shape(row_max, Shape{logits.size(0)}, op, "row_max");
  std::vector<double> sums(static_cast<size_t>(2 * logits.size(0)), 0.0);
  if (logits.size(0) > 0) DSV4_BACKEND_DISPATCH(logits.device(), ce_sums, logits, targets, row_max, begin, sums);
  return sums;
}

Tensor ce_backward(const Tensor& logits, const Tensor& targets, const std::vector<double>& lse, double norm,
                   int64_t begin) {
  const char* op = "ce_backward";
  check_arg(logits, op, "logits", DType::F32, 2, logits.defined() ? logits.device() : Device::cpu());
  check_arg(targets, op, "targets", DType::I64, 1, logits.device());
  check_shape(targets, Shape{logits.size(0)}, op, "targets");
  DSV4_CHECK(static_cast<int64_t>(lse.size()) >= logits.size(0), "{}: {} lse values for {} rows", op, lse.size(),
             logits.size(0));
  if (!(norm > 0)) return Tensor::zeros(logits.shape(), DType::F32, logits.device());
  Tensor d = Tensor::empty(logits.shape(), DType::F32, logits.device());  // the backends write every element
  if (d.numel() > 0) DSV4_BACKEND_DISPATCH(logits.device(), ce_backward, logits, targets, lse, norm, begin, d);
  return d;
}

namespace {
// Lists of contiguous F32 tensors on one device, entry i of each list with the shape of lists[0][i]; returns the
// device (CPU for empty lists).
Device check_tensor_lists(const char* op, std::initializer_list<std::pair<const std::vector<Tensor>*, const char*>> lists) {
  const std::vector<Tensor>& first = *lists.begin()->first;
  const Device dev = first.empty() || !first[0].defined() ? Device::cpu() : first[0].device();
  for (const auto& [list, name] : lists) {
    DSV4_CHECK(list->size() == first.size(), "{}: {} {} tensors, {} {}", op, list->size(), name, first.size(),
               lists.begin()->second);
    for (size_t i = 0; i < list->size(); ++i) {
      const std::string arg = fmt::format("{}[{}]", name, i);
      check_arg((*list)[i], op, arg.c_str(), DType::F32, -1, dev);
      check_shape((*list)[i], first[i].shape(), op, arg.c_str());
    }
  }
  return dev;
}
}  // namespace

void adamw_steps(const std::vector<Tensor>& w, const std::vector<Tensor>& g, const std::vector<Tensor>& exp_avg,
                 const std::vector<Tensor>& exp_avg_sq, const std::vector<AdamWScalars>& s) {
  const Device dev =
      check_tensor_lists("adamw_steps", {{&w, "w"}, {&g, "g"}, {&exp_avg, "exp_avg"}, {&exp_avg_sq, "exp_avg_sq"}});
  DSV4_CHECK(s.size() == w.size(), "adamw_steps: {} scalar sets for {} tensors", s.size(), w.size());
  if (!w.empty()) DSV4_BACKEND_DISPATCH(dev, adamw_steps, w, g, exp_avg, exp_avg_sq, s);
}

void muon_momentum_steps(const std::vector<Tensor>& g, const std::vector<Tensor>& momentum,
                         const std::vector<Tensor>& u, float mu, bool nesterov) {
  const Device dev = check_tensor_lists("muon_momentum_steps", {{&g, "g"}, {&momentum, "momentum"}, {&u, "u"}});
  if (!g.empty()) DSV4_BACKEND_DISPATCH(dev, muon_momentum_steps, g, momentum, u, mu, nesterov);
}

void muon_apply_steps(const std::vector<Tensor>& w, const std::vector<Tensor>& o, const MuonApplyScalars& s) {
  const Device dev = check_tensor_lists("muon_apply_steps", {{&w, "w"}, {&o, "o"}});
  if (!w.empty()) DSV4_BACKEND_DISPATCH(dev, muon_apply_steps, w, o, s);
}

void adamw_step(Tensor& w, const Tensor& g, Tensor& exp_avg, Tensor& exp_avg_sq, const AdamWScalars& s) {
  adamw_steps({w}, {g}, {exp_avg}, {exp_avg_sq}, {s});
}

void muon_momentum_step(const Tensor& g, Tensor& momentum, Tensor& u, float mu, bool nesterov) {
  muon_momentum_steps({g}, {momentum}, {u}, mu, nesterov);
}

void muon_apply_step(Tensor& w, const Tensor& o, const MuonApplyScalars& s) { muon_apply_steps({w}, {o}, s); }

std::vector<double> sum_squares(const std::vector<Tensor>& xs) {
  const Device dev = check_tensor_lists("sum_squares", {{&xs, "xs"}});
  std::vector<double> sums(xs.size(), 0.0);
  if (!xs.empty()) DSV4_BACKEND_DISPATCH(dev, sum_squares, xs, sums);
  return sums;
}

void convert_to_bf16(const std::vector<Tensor>& xs, const std::vector<Tensor>& ys) {
  const Device dev = check_tensor_lists("convert_to_bf16", {{&xs, "xs"}});
  DSV4_CHECK(ys.size() == xs.size(), "convert_to_bf16: {} outputs for {} inputs", ys.size(), xs.size());
  for (size_t i = 0; i < ys.size(); ++i) {
    const std::string arg = fmt::format("ys[{}]", i);
    check_arg(ys[i], "convert_to_bf16", arg.c_str(), DType::BF16, -1, dev);
    check_shape(ys[i], xs[i].shape(), "convert_to_bf16", arg.c_str());
  }
  if (!xs.empty()) DSV4_BACKEND_DISPATCH(dev, convert_to_bf16, xs, ys);
}

void scale_in_place(const std::vector<Tensor>& xs, float factor) {
  const Device dev = check_tensor_lists("scale_in_place", {{&xs, "xs"}});
  if (!xs.empty()) DSV4_BACKEND_DISPATCH(dev, scale_in_place, xs, factor);
}

void newton_schulz_batched(Tensor& x, const std::vector<NsStage>& schedule, double eps, NsPrecision precision) {
  const char* op = "newton_schulz_batched";
  check_arg(x, op, "x", DType::F32, -1, x.defined() ? x.device() : Device::cpu());
  DSV4_CHECK(x.ndim() == 2 || x.ndim() == 3, "{}: x must be [r, c] or [B, r, c], got {}", op, x.str());
  DSV4_CHECK(x.size(x.ndim() - 1) >= 1 && x.size(x.ndim() - 2) >= 1, "{}: empty matrices {}", op, x.str());
  if (x.numel() > 0) DSV4_BACKEND_DISPATCH(x.device(), newton_schulz_batched, x, schedule, eps, precision);
}

}  // namespace dsv4

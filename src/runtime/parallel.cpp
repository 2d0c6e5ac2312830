#include "runtime/parallel.h"

#include <algorithm>
#include <cstring>

#include <unistd.h>

#include "runtime/error.h"
#include "runtime/ops.h"

namespace dsv4 {

std::string ParallelDims::str() const {
  std::string s;
  auto add = [&](const char* axis, int64_t n) {
    if (n == 1) return;
    if (!s.empty()) s += "·";
    s += fmt::format("{}{}", axis, n);
  };
  add("dp", dp);
  add("tp", tp);
  add("ep", ep);
  return s.empty() ? "single" : s;
}

Range split_range(int64_t n, int64_t parts, int64_t i) {
  DSV4_CHECK(parts > 0 && i >= 0 && i < parts && n >= 0, "split_range({}, {}, {}): bad arguments", n, parts, i);
  const int64_t base = n / parts, extra = n % parts;
  Range r;
  r.begin = i * base + std::min(i, extra);
  r.end = r.begin + base + (i < extra ? 1 : 0);
  return r;
}

Parallel::Parallel(const Communicator* world, ParallelDims dims) : dims_(dims), world_(world) {
  DSV4_CHECK(dims.dp >= 1 && dims.tp >= 1 && dims.ep >= 1, "parallel layout {}: every degree must be >= 1", dims.str());
  const int64_t size = world ? world->size() : 1;
  DSV4_CHECK(dims.world() == size, "parallel layout {}: dp x tp = {} must equal the number of ranks ({})", dims.str(),
             dims.world(), size);
  DSV4_CHECK(size % dims.ep == 0, "parallel layout {}: ep ({}) must divide the number of ranks ({})", dims.str(),
             dims.ep, size);
  rank_ = world ? world->rank() : 0;
  if (!world || size == 1) return;
  // Every rank takes part in every split (collective over world), in the same order.
  auto group = [&](int64_t color, int64_t key, int64_t n) -> std::unique_ptr<Communicator> {
    std::unique_ptr<Communicator> c = world->split(static_cast<int>(color), static_cast<int>(key));
    if (n == 1) return nullptr;
    return c;
  };
  tp_ = group(rank_ / dims.tp, rank_ % dims.tp, dims.tp);
  dp_ = group(rank_ % dims.tp, rank_ / dims.tp, dims.dp);
  ep_ = group(rank_ / dims.ep, rank_ % dims.ep, dims.ep);
  edp_ = group(rank_ % dims.ep, rank_ / dims.ep, size / dims.ep);
}

Parallel::~Parallel() {
  if (!twins_.empty())
    for (const Communicator* g : host_groups()) g->set_device_twin(nullptr);
}

void Parallel::attach_device(Device device) {
  device_ = device;
  if (device.is_cpu() || !world_ || world_size() == 1) return;
#if defined(DSV4_WITH_NCCL)
  // Collective over world, every rank in the same order (a NCCL communicator per group, bootstrapped over its MPI
  // group; a group of one rank is null on every rank and gets none).
  for (const Communicator* g : host_groups()) {
    twins_.push_back(nccl_communicator(*g, device.index));
    g->set_device_twin(twins_.back().get());
  }
#else
  DSV4_FAIL("Parallel: {} ranks on {}, but this dsv4 was built without NCCL (device tensors cannot be reduced over "
            "ranks)",
            world_size(), device.str());
#endif
}

std::vector<const Communicator*> Parallel::host_groups() const {
  std::vector<const Communicator*> out;
  if (world_) out.push_back(world_);
  for (const auto* g : {&tp_, &dp_, &ep_, &edp_})
    if (*g) out.push_back(g->get());
  return out;
}

int local_rank(const Communicator* world) {
  if (!world || world->size() == 1) return 0;
  char host[256] = {0};
  ::gethostname(host, sizeof(host) - 1);
  uint32_t h = 2166136261u;
  for (const char* c = host; *c; ++c) h = (h ^ static_cast<unsigned char>(*c)) * 16777619u;
  const std::unique_ptr<Communicator> same_host = world->split(static_cast<int>(h & 0x7fffffff), world->rank());
  return same_host->rank();
}

int64_t Parallel::expert_owner(int64_t n_experts, int64_t e) const {
  DSV4_CHECK(e >= 0 && e < n_experts, "expert {} out of range [0, {})", e, n_experts);
  for (int64_t r = 0; r < ep_size(); ++r)
    if (e < split_range(n_experts, ep_size(), r).end) return r;
  return ep_size() - 1;
}

void group_sum(const Communicator* g, Tensor& x) {
  if (g && g->size() > 1) g->all_reduce(x, CommReduce::Sum);
}

void group_max(const Communicator* g, Tensor& x) {
  if (g && g->size() > 1) g->all_reduce(x, CommReduce::Max);
}

void group_sum(const Communicator* g, std::vector<double>& v) {
  if (!g || g->size() == 1 || v.empty()) return;
  // The communicators do not reduce F64: gather every rank's doubles (as raw 64-bit words) and add them in rank
  // order, so the sum is full double precision and bit-identical on every rank.
  const int64_t n = static_cast<int64_t>(v.size());
  Tensor mine = Tensor::empty({1, n}, DType::I64);
  std::memcpy(mine.raw_data(), v.data(), static_cast<size_t>(n) * sizeof(double));
  Tensor all = Tensor::empty({g->size(), n}, DType::I64);
  g->all_gather(mine, all);
  const double* d = static_cast<const double*>(all.raw_data());
  for (int64_t i = 0; i < n; ++i) {
    double s = 0;
    for (int64_t r = 0; r < g->size(); ++r) s += d[r * n + i];
    v[static_cast<size_t>(i)] = s;
  }
}

void group_sum(const Communicator* g, std::vector<int64_t>& v) {
  if (!g || g->size() == 1 || v.empty()) return;
  Tensor t = Tensor::from_vector<int64_t>({static_cast<int64_t>(v.size())}, v);
  g->all_reduce(t, CommReduce::Sum);
  std::copy(t.data<int64_t>(), t.data<int64_t>() + t.numel(), v.begin());
}

std::vector<int64_t> split_rows(const Communicator* g, int64_t n) {
  const int64_t size = group_size(g);
  std::vector<int64_t> rows(static_cast<size_t>(size));
  for (int64_t r = 0; r < size; ++r) rows[static_cast<size_t>(r)] = split_range(n, size, r).size();
  return rows;
}

Tensor exchange_rows(const Communicator* g, const Tensor& in, const std::vector<int64_t>& send_rows,
                     const std::vector<int64_t>& recv_rows) {
  if (!g || g->size() == 1) return in;
  int64_t n = 0;
  for (int64_t r : recv_rows) n += r;
  Shape shape = in.shape();
  shape[0] = n;
  Tensor out = Tensor::empty(shape, in.dtype(), in.device());
  g->all_to_all_v(in.contiguous(), send_rows, out, recv_rows);
  return out;
}

namespace {
void check_rows(const char* op, const Communicator* g, const std::vector<int64_t>& rows) {
  DSV4_CHECK(static_cast<int64_t>(rows.size()) == group_size(g), "{}: {} row counts for a group of {} ranks", op,
             rows.size(), group_size(g));
  for (int64_t r : rows) DSV4_CHECK(r >= 0, "{}: negative row count {}", op, r);
}
}  // namespace

Tensor gather_rows(const Communicator* g, const Tensor& x_local, const std::vector<int64_t>& rows) {
  check_rows("gather_rows", g, rows);
  const int64_t me = group_rank(g);
  DSV4_CHECK(x_local.ndim() >= 1 && x_local.size(0) == rows[static_cast<size_t>(me)],
             "gather_rows: local tensor {} does not hold the {} rows of rank {}", x_local.str(), rows[static_cast<size_t>(me)],
             me);
  if (group_size(g) == 1) return x_local;
  const int64_t max_rows = *std::max_element(rows.begin(), rows.end());
  int64_t total = 0;
  for (int64_t r : rows) total += r;
  Shape padded_shape = x_local.shape();
  padded_shape[0] = max_rows;
  Tensor padded = Tensor::zeros(padded_shape, x_local.dtype(), x_local.device());
  if (x_local.size(0) > 0) {
    Tensor head = padded.slice(0, 0, x_local.size(0));
    ops::copy(x_local, head);
  }
  Shape all_shape = padded_shape;
  all_shape[0] = max_rows * group_size(g);
  Tensor all = Tensor::empty(all_shape, x_local.dtype(), x_local.device());
  g->all_gather(padded, all);
  if (max_rows * group_size(g) == total) return all;
  Shape out_shape = padded_shape;
  out_shape[0] = total;
  Tensor out = Tensor::empty(out_shape, x_local.dtype(), x_local.device());
  int64_t at = 0;
  for (int64_t r = 0; r < group_size(g); ++r) {
    const int64_t n = rows[static_cast<size_t>(r)];
    if (n == 0) continue;
    Tensor dst = out.slice(0, at, at + n);
    ops::copy(all.slice(0, r * max_rows, r * max_rows + n), dst);
    at += n;
  }
  return out;
}

Tensor take_rows(const Communicator* g, const Tensor& x, const std::vector<int64_t>& rows) {
  check_rows("take_rows", g, rows);
  const int64_t me = group_rank(g);
  int64_t begin = 0, total = 0;
  for (int64_t r = 0; r < static_cast<int64_t>(rows.size()); ++r) {
    if (r < me) begin += rows[static_cast<size_t>(r)];
    total += rows[static_cast<size_t>(r)];
  }
  DSV4_CHECK(x.ndim() >= 1 && x.size(0) == total, "take_rows: tensor {} does not hold {} rows", x.str(), total);
  if (group_size(g) == 1) return x.contiguous();
  return x.slice(0, begin, begin + rows[static_cast<size_t>(me)]).contiguous();
}

}  // namespace dsv4

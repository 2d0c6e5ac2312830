#include "runtime/tensor.h"

#include <cstring>

#include "runtime/ops.h"

#if defined(DSV4_WITH_CUDA)
#include "kernels/cuda_runtime_api.h"
#endif

namespace dsv4 {

// ---- Shape -------------------------------------------------------------------------------------------
Shape::Shape(std::initializer_list<int64_t> dims) {
  for (int64_t d : dims) push_back(d);
}
Shape::Shape(const std::vector<int64_t>& dims) {
  for (int64_t d : dims) push_back(d);
}
void Shape::push_back(int64_t d) {
  DSV4_CHECK(ndim_ < kMaxDims, "tensors have at most {} dims", kMaxDims);
  dims_[static_cast<size_t>(ndim_++)] = d;
}
int64_t Shape::numel() const {
  int64_t n = 1;
  for (int i = 0; i < ndim_; ++i) n *= dims_[static_cast<size_t>(i)];
  return n;
}
bool Shape::operator==(const Shape& o) const {
  if (ndim_ != o.ndim_) return false;
  for (int i = 0; i < ndim_; ++i)
    if ((*this)[i] != o[i]) return false;
  return true;
}
std::string Shape::str() const { return fmt::format("[{}]", fmt::join(vec(), ", ")); }

Shape contiguous_strides(const Shape& shape) {
  Shape strides = shape;
  int64_t s = 1;
  for (int i = shape.ndim() - 1; i >= 0; --i) {
    strides[i] = s;
    s *= shape[i];
  }
  return strides;
}

// ---- Storage -----------------------------------------------------------------------------------------
Storage::Storage(size_t nbytes, Device device) : nbytes_(nbytes), device_(device) {
  data_ = allocator_for(device).allocate(nbytes);
}
Storage::Storage(void* data, size_t nbytes, Device device, std::shared_ptr<const void> owner)
    : data_(data), nbytes_(nbytes), device_(device), owner_(std::move(owner)) {
  DSV4_CHECK(owner_ != nullptr, "wrapped storage needs an owner that keeps the memory alive");
}
Storage::~Storage() {
  if (!owner_) allocator_for(device_).deallocate(data_, nbytes_);
}

// ---- Tensor ------------------------------------------------------------------------------------------
Tensor Tensor::empty(const Shape& shape, DType dtype, Device device) {
  for (int i = 0; i < shape.ndim(); ++i) DSV4_CHECK(shape[i] >= 0, "negative dim in shape {}", shape.str());
  if (dtype == DType::F4_E2M1 && shape.ndim() > 0)
    DSV4_CHECK(shape[shape.ndim() - 1] % 2 == 0, "packed FP4 tensors need an even last dim, got {}", shape.str());
  Tensor t;
  t.storage_ = std::make_shared<Storage>(static_cast<size_t>(dtype_nbytes(dtype, shape.numel())), device);
  t.shape_ = shape;
  t.strides_ = contiguous_strides(shape);
  t.dtype_ = dtype;
  return t;
}

Tensor Tensor::zeros(const Shape& shape, DType dtype, Device device) {
  Tensor t = empty(shape, dtype, device);
  ops::fill(t, 0.0);
  return t;
}

template <typename T>
Tensor Tensor::from_vector(const Shape& shape, const std::vector<T>& values) {
  DSV4_CHECK(static_cast<int64_t>(values.size()) == shape.numel(), "{} values for shape {}", values.size(),
             shape.str());
  Tensor t = empty(shape, dtype_of<T>::value);
  if (!values.empty()) std::memcpy(t.raw_data(), values.data(), values.size() * sizeof(T));
  return t;
}
template Tensor Tensor::from_vector<float>(const Shape&, const std::vector<float>&);
template Tensor Tensor::from_vector<int8_t>(const Shape&, const std::vector<int8_t>&);
template Tensor Tensor::from_vector<uint8_t>(const Shape&, const std::vector<uint8_t>&);
template Tensor Tensor::from_vector<int32_t>(const Shape&, const std::vector<int32_t>&);
template Tensor Tensor::from_vector<int64_t>(const Shape&, const std::vector<int64_t>&);

Tensor Tensor::from_floats(const Shape& shape, const std::vector<float>& values, DType dtype) {
  Tensor f = from_vector<float>(shape, values);
  return dtype == DType::F32 ? f : f.to(dtype);
}

Tensor Tensor::from_blob(void* data, const Shape& shape, DType dtype, Device device, std::shared_ptr<const void> owner) {
  if (dtype == DType::F4_E2M1 && shape.ndim() > 0)
    DSV4_CHECK(shape[shape.ndim() - 1] % 2 == 0, "packed FP4 tensors need an even last dim, got {}", shape.str());
  Tensor t;
  t.storage_ = std::make_shared<Storage>(data, static_cast<size_t>(dtype_nbytes(dtype, shape.numel())), device,
                                         std::move(owner));
  t.shape_ = shape;
  t.strides_ = contiguous_strides(shape);
  t.dtype_ = dtype;
  return t;
}

int Tensor::normalize_dim(int dim) const {
  const int n = ndim();
  DSV4_CHECK(dim >= -n && dim < n, "dim {} out of range for a {}-d tensor", dim, n);
  return dim < 0 ? dim + n : dim;
}

bool Tensor::is_contiguous() const {
  int64_t expected = 1;
  for (int i = ndim() - 1; i >= 0; --i) {
    if (shape_[i] != 1 && strides_[i] != expected) return false;
    expected *= shape_[i];
  }
  return true;
}

std::string Tensor::str() const {
  if (!defined()) return "Tensor(undefined)";
  return fmt::format("{}{} {}", dtype_name(dtype_), shape_.str(), device().str());
}

void* Tensor::raw_data() const {
  DSV4_CHECK(defined(), "data access on an undefined tensor");
  if (dtype_ == DType::F4_E2M1) DSV4_CHECK(offset_ % 2 == 0, "packed FP4 view starts at odd element {}", offset_);
  return static_cast<char*>(storage_->data()) + dtype_nbytes(dtype_, offset_);
}
uint16_t* Tensor::data_u16() const {
  DSV4_CHECK(dtype_bits(dtype_) == 16, "data_u16() on a {} tensor", dtype_name(dtype_));
  return static_cast<uint16_t*>(raw_data());
}
uint8_t* Tensor::data_u8() const {
  DSV4_CHECK(dtype_bits(dtype_) <= 8, "data_u8() on a {} tensor", dtype_name(dtype_));
  return static_cast<uint8_t*>(raw_data());
}

// ---- views -------------------------------------------------------------------------------------------
Tensor Tensor::view(const Shape& new_shape_in) const {
  DSV4_CHECK(is_contiguous(), "view() of non-contiguous {} (use reshape)", str());
  Shape new_shape = new_shape_in;
  int infer = -1;
  int64_t known = 1;
  for (int i = 0; i < new_shape.ndim(); ++i) {
    if (new_shape[i] == -1) {
      DSV4_CHECK(infer < 0, "view shape {} has more than one -1", new_shape_in.str());
      infer = i;
    } else {
      known *= new_shape[i];
    }
  }
  if (infer >= 0) {
    DSV4_CHECK(known > 0 && numel() % known == 0, "cannot view {} as {}", str(), new_shape_in.str());
    new_shape[infer] = numel() / known;
  }
  DSV4_CHECK(new_shape.numel() == numel(), "cannot view {} as {}", str(), new_shape_in.str());
  Tensor t = *this;
  t.shape_ = new_shape;
  t.strides_ = contiguous_strides(new_shape);
  return t;
}

Tensor Tensor::reshape(const Shape& new_shape) const { return is_contiguous() ? view(new_shape) : contiguous().view(new_shape); }

Tensor Tensor::slice(int dim, int64_t start, int64_t end) const {
  const int d = normalize_dim(dim);
  DSV4_CHECK(0 <= start && start <= end && end <= shape_[d], "slice [{}, {}) of dim {} (size {}) of {}", start, end,
             d, shape_[d], str());
  Tensor t = *this;
  t.offset_ += start * strides_[d];
  t.shape_[d] = end - start;
  if (dtype_ == DType::F4_E2M1)
    DSV4_CHECK(t.offset_ % 2 == 0 && (d != ndim() - 1 || t.shape_[d] % 2 == 0),
               "packed FP4 slices must start and end on even elements");
  return t;
}

Tensor Tensor::select(int dim, int64_t index) const {
  const int d = normalize_dim(dim);
  DSV4_CHECK(0 <= index && index < shape_[d], "index {} out of range for dim {} (size {}) of {}", index, d, shape_[d],
             str());
  DSV4_CHECK(dtype_ != DType::F4_E2M1 || d != ndim() - 1, "cannot select single packed FP4 elements");
  Tensor t = slice(d, index, index + 1);
  Shape s, st;
  for (int i = 0; i < ndim(); ++i)
    if (i != d) {
      s.push_back(t.shape_[i]);
      st.push_back(t.strides_[i]);
    }
  t.shape_ = s;
  t.strides_ = st;
  return t;
}

Tensor Tensor::transpose(int dim0, int dim1) const {
  const int a = normalize_dim(dim0), b = normalize_dim(dim1);
  DSV4_CHECK(dtype_ != DType::F4_E2M1 || (a != ndim() - 1 && b != ndim() - 1),
             "packed FP4 tensors cannot be transposed in the last dim");
  Tensor t = *this;
  std::swap(t.shape_[a], t.shape_[b]);
  std::swap(t.strides_[a], t.strides_[b]);
  return t;
}

Tensor Tensor::unsqueeze(int dim) const {
  const int n = ndim();
  DSV4_CHECK(dim >= -(n + 1) && dim <= n, "unsqueeze dim {} for a {}-d tensor", dim, n);
  const int d = dim < 0 ? dim + n + 1 : dim;
  Shape s, st;
  for (int i = 0; i <= n; ++i) {
    if (i == d) {
      s.push_back(1);
      st.push_back(i < n ? strides_[i] * shape_[i] : 1);
    }
    if (i < n) {
      s.push_back(shape_[i]);
      st.push_back(strides_[i]);
    }
  }
  Tensor t = *this;
  t.shape_ = s;
  t.strides_ = st;
  return t;
}

// ---- copies ------------------------------------------------------------------------------------------
Tensor Tensor::contiguous() const { return is_contiguous() ? *this : clone(); }

Tensor Tensor::clone() const {
  Tensor out = empty(shape_, dtype_, device());
  ops::copy(*this, out);
  return out;
}

Tensor Tensor::to(Device target) const {
  if (target == device()) return *this;
  Tensor out = empty(shape_, dtype_, target);
  ops::copy(*this, out);
  return out;
}

Tensor Tensor::to(DType target) const { return target == dtype_ ? *this : ops::convert(*this, target); }

void Tensor::copy_from(const Tensor& src) { ops::copy(src, *this); }

double Tensor::item() const {
  DSV4_CHECK(numel() == 1, "item() of {} with {} elements", str(), numel());
  const Tensor host = to(Device::cpu());
  switch (dtype_) {  // integers exactly, not through float
    case DType::I64: return static_cast<double>(*host.data<int64_t>());
    case DType::I32: return static_cast<double>(*host.data<int32_t>());
    case DType::I8: return static_cast<double>(*host.data<int8_t>());
    case DType::U8: return static_cast<double>(*host.data<uint8_t>());
    default: return static_cast<double>(host.to_floats()[0]);
  }
}

std::vector<float> Tensor::to_floats() const {
  Tensor host = to(Device::cpu());
  if (host.dtype() != DType::F32) host = host.to(DType::F32);
  host = host.contiguous();
  const float* p = host.data<float>();
  return {p, p + host.numel()};
}

}  // namespace dsv4

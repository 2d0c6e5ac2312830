// Tensor: shape, strides (in elements), dtype, device and shared owning storage.
// Views (slice, select, transpose, view/reshape of contiguous data) share the storage.
// Packed FP4 (F4_E2M1) counts logical elements: two per byte, low nibble = even index; views of an
// FP4 tensor must start on an even element and stay contiguous in the last dim.
#pragma once

#include <array>
#include <cstdint>
#include <initializer_list>
#include <memory>
#include <string>
#include <vector>

#include "runtime/device.h"
#include "runtime/dtype.h"
#include "runtime/error.h"

namespace dsv4 {

inline constexpr int kMaxDims = 8;

class Shape {
 public:
  Shape() = default;
  Shape(std::initializer_list<int64_t> dims);
  explicit Shape(const std::vector<int64_t>& dims);

  int ndim() const { return ndim_; }
  int64_t operator[](int i) const { return dims_[static_cast<size_t>(i)]; }
  int64_t& operator[](int i) { return dims_[static_cast<size_t>(i)]; }
  int64_t numel() const;
  std::vector<int64_t> vec() const { return {dims_.begin(), dims_.begin() + ndim_}; }
  void push_back(int64_t d);
  bool operator==(const Shape& o) const;
  std::string str() const;  // "[2, 3, 4]"

 private:
  int ndim_ = 0;
  std::array<int64_t, kMaxDims> dims_{};
};

// Contiguous row-major strides of a shape.
Shape contiguous_strides(const Shape& shape);

class Storage {
 public:
  Storage(size_t nbytes, Device device);  // allocates from the device's allocator
  // Wraps memory owned elsewhere (e.g. a memory-mapped file); `owner` is kept alive with the storage.
  Storage(void* data, size_t nbytes, Device device, std::shared_ptr<const void> owner);
  ~Storage();
  Storage(const Storage&) = delete;
  Storage& operator=(const Storage&) = delete;
  void* data() const { return data_; }
  size_t nbytes() const { return nbytes_; }
  Device device() const { return device_; }

 private:
  void* data_ = nullptr;
  size_t nbytes_ = 0;
  Device device_;
  std::shared_ptr<const void> owner_;  // set for wrapped memory, which is not freed here
};

class Tensor {
 public:
  Tensor() = default;  // undefined tensor: defined() is false

  static Tensor empty(const Shape& shape, DType dtype, Device device = Device::cpu());
  static Tensor zeros(const Shape& shape, DType dtype, Device device = Device::cpu());
  // CPU tensor copied from host values (T must match dtype: float->F32, int32_t->I32 ...).
  template <typename T>
  static Tensor from_vector(const Shape& shape, const std::vector<T>& values);
  // CPU F32 tensor holding the values, stored in `dtype` (rounded with the exact conversions).
  static Tensor from_floats(const Shape& shape, const std::vector<float>& values, DType dtype = DType::F32);
  // Contiguous tensor over memory owned by `owner` (no copy). Writes through it are the caller's business
  // (read-only mappings must not be written).
  static Tensor from_blob(void* data, const Shape& shape, DType dtype, Device device,
                          std::shared_ptr<const void> owner);

  bool defined() const { return storage_ != nullptr; }
  const Shape& shape() const { return shape_; }
  const Shape& strides() const { return strides_; }
  int ndim() const { return shape_.ndim(); }
  int64_t size(int dim) const { return shape_[normalize_dim(dim)]; }
  int64_t stride(int dim) const { return strides_[normalize_dim(dim)]; }
  int64_t numel() const { return shape_.numel(); }
  int64_t nbytes() const { return dtype_nbytes(dtype_, numel()); }
  DType dtype() const { return dtype_; }
  Device device() const { return storage_ ? storage_->device() : Device::cpu(); }
  int64_t offset() const { return offset_; }  // in elements
  bool is_contiguous() const;
  const std::shared_ptr<Storage>& storage() const { return storage_; }
  std::string str() const;  // "F32[2, 3] cpu"

  // Pointer to the first element (byte-addressed for packed FP4).
  void* raw_data() const;
  template <typename T>
  T* data() const {
    DSV4_CHECK(dtype_of<T>::value == dtype_, "data<{}>() on a {} tensor", dtype_name(dtype_of<T>::value),
               dtype_name(dtype_));
    return static_cast<T*>(raw_data());
  }
  // Raw 16-bit and 8-bit access for BF16/F16/F8 storage.
  uint16_t* data_u16() const;
  uint8_t* data_u8() const;

  // ---- views (share storage) ----
  Tensor view(const Shape& new_shape) const;       // contiguous only; one dim may be -1
  Tensor reshape(const Shape& new_shape) const;    // view when contiguous, else a contiguous copy
  Tensor slice(int dim, int64_t start, int64_t end) const;  // [start, end) along dim
  Tensor select(int dim, int64_t index) const;     // drops dim
  Tensor transpose(int dim0, int dim1) const;
  Tensor unsqueeze(int dim) const;

  // ---- copies ----
  Tensor contiguous() const;             // self when already contiguous
  Tensor clone() const;                  // always a fresh contiguous copy
  Tensor to(Device device) const;        // copy to device (self when already there)
  Tensor to(DType dtype) const;          // exact conversion (self when same dtype)
  void copy_from(const Tensor& src);     // same shape; any device pair; dtypes converted

  // Value of a one-element tensor (any device, any dtype) as double.
  double item() const;
  // All values as floats (copied to host, converted from any dtype). For tests and logging.
  std::vector<float> to_floats() const;

  int normalize_dim(int dim) const;

 private:
  std::shared_ptr<Storage> storage_;
  Shape shape_;
  Shape strides_;
  int64_t offset_ = 0;
  DType dtype_ = DType::F32;
};

}  // namespace dsv4

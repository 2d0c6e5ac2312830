// Host-side interface of the CUDA backend, callable from plain C++ (no CUDA headers here).
// Implemented in kernels/*.cu; only compiled and linked when dsv4 is built with CUDA.
#pragma once

#include <cstddef>
#include <cstdint>

#include "runtime/device.h"

namespace dsv4::cuda {

// Number of visible devices; 0 when there is no driver or no GPU (never throws).
int device_count();

// Caching allocator of one device: freed blocks are kept per size class and reused; empty_cache()
// returns them to the driver. Allocations are stream-ordered on the current stream.
Allocator& caching_allocator(int device_index);

// The stream dsv4 launches work on for the calling thread (a per-device default created on first use;
// never the legacy NULL stream). Returned as an opaque cudaStream_t.
void* current_stream(int device_index);
void set_current_stream(int device_index, void* stream);
void synchronize(int device_index);  // waits for the current stream

// Byte copies between devices on the current stream. d2h and d2d return when the copy is done; h2d returns when the
// host bytes have been consumed (pageable sources: staged, without waiting for the device; pinned sources: copied).
void memcpy_h2d(void* dst, const void* src, size_t nbytes, int device_index);
void memcpy_d2h(void* dst, const void* src, size_t nbytes, int device_index);
void memcpy_d2d(void* dst, const void* src, size_t nbytes, int device_index);

}  // namespace dsv4::cuda

// BlockPool: the bookkeeping of the CUDA caching allocator, host-only and independent of CUDA so it can
// be unit-tested with a fake backend (tests/runtime/test_block_pool.cpp). kernels/cuda_allocator.cu wraps
// it with cudaMalloc/cudaFree callbacks, one pool per device.
//
// Policy
//   * Sizes are rounded up: requests up to `small_limit` (1 MiB) to `small_granularity` (512 B), larger
//     ones to `large_granularity` (2 MiB). A 0-byte request gets a real 512-byte block (unique pointer).
//   * Small and large blocks live in separate pools, so small tensors never fragment large segments.
//     Small blocks are carved from `small_segment` (2 MiB) system allocations; a large request that the
//     cache cannot serve allocates a segment of exactly its rounded size.
//   * Free blocks are kept per (pool, stream) in a std::multimap keyed by size. A request takes the best
//     fit (smallest free block >= the rounded size). A block no larger than `max_split_size` is split
//     when the remainder is at least one granule, and the remainder stays free in the same segment.
//     Blocks larger than `max_split_size` are never split; they serve a request only when the waste
//     (block size - rounded size) is at most `max_oversize_waste`, otherwise a new segment is allocated.
//   * Freed blocks are merged with free neighbours of the same segment. empty_cache() returns every
//     segment that is entirely free to the system.
//   * Streams: a block is reused only by allocations on the stream it was allocated on (the stream is an
//     opaque key here). Using a block on another stream needs the caller to synchronise, as with any
//     stream-ordered allocator.
//   * Out of memory: when the system allocator returns nullptr, the cache is released and the system
//     allocation is retried once; if it fails again a dsv4::Error says how much was requested, how much
//     is allocated and how much is reserved.
//   * Statistics follow AllocatorStats: allocated/peak count the bytes callers asked for, reserved the
//     bytes held from the system, num_system_allocs the successful system allocations.
//   * Thread-safe: one mutex per pool; the callbacks run under it.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <mutex>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "runtime/device.h"
#include "runtime/error.h"

namespace dsv4 {

struct BlockPoolConfig {
  size_t small_limit = size_t{1} << 20;          // rounded requests up to this size are "small"
  size_t small_granularity = 512;                // rounding of small requests
  size_t small_segment = size_t{2} << 20;        // system allocation that small blocks are carved from
  size_t large_granularity = size_t{2} << 20;    // rounding of large requests (and their segments)
  size_t max_split_size = size_t{256} << 20;     // larger cached blocks are never split ...
  size_t max_oversize_waste = size_t{32} << 20;  // ... and serve only requests within this many bytes
};

class BlockPool {
 public:
  // Returns nullptr when the system is out of memory; other failures should throw.
  using SystemAlloc = std::function<void*(size_t nbytes)>;
  using SystemFree = std::function<void(void* ptr, size_t nbytes)>;

  BlockPool(std::string name, SystemAlloc system_alloc, SystemFree system_free, BlockPoolConfig config = {})
      : name_(std::move(name)), system_alloc_(std::move(system_alloc)), system_free_(std::move(system_free)),
        config_(config) {}
  BlockPool(const BlockPool&) = delete;
  BlockPool& operator=(const BlockPool&) = delete;

  // Returns every segment to the system, including ones with blocks still handed out.
  ~BlockPool() {
    std::vector<Block*> heads;
    for (auto& [key, list] : free_lists_)
      for (auto& [size, b] : list)
        if (!b->prev) heads.push_back(b);
    for (auto& [ptr, b] : allocated_)
      if (!b->prev) heads.push_back(b);
    for (Block* head : heads) {
      void* const base = reinterpret_cast<void*>(head->ptr);
      size_t seg = 0;
      for (Block* b = head; b;) {
        seg += b->size;
        Block* next = b->next;
        delete b;
        b = next;
      }
      system_free_(base, seg);
    }
  }

  // Size actually reserved for a request of `nbytes`.
  size_t round_size(size_t nbytes) const {
    if (nbytes == 0) return config_.small_granularity;
    if (nbytes <= config_.small_limit) return round_up(nbytes, config_.small_granularity);
    return round_up(nbytes, config_.large_granularity);
  }

  void* allocate(size_t nbytes, uintptr_t stream = 0) {
    std::lock_guard<std::mutex> lock(mu_);
    const size_t size = round_size(nbytes);
    const bool small = size <= config_.small_limit;
    Block* b = take_best_fit(small, stream, size);
    if (!b) {
      const size_t seg = small ? config_.small_segment : size;
      void* p = system_alloc_(seg);
      if (!p) {
        release_cached_locked();
        p = system_alloc_(seg);
      }
      if (!p) {
        throw_error(__FILE__, __LINE__, nullptr,
                    fmt::format("{}: out of memory: requested {} bytes ({} reserved as a {} segment); {} bytes "
                                "({:.1f} MiB) allocated, {} bytes ({:.1f} MiB) reserved after releasing the cache",
                                name_, nbytes, size, seg, stats_.allocated_bytes, mib(stats_.allocated_bytes),
                                stats_.reserved_bytes, mib(stats_.reserved_bytes)));
      }
      ++stats_.num_system_allocs;
      ++num_segments_;
      stats_.reserved_bytes += static_cast<int64_t>(seg);
      b = new Block;
      b->ptr = reinterpret_cast<uintptr_t>(p);
      b->size = seg;
      b->stream = stream;
      b->small = small;
    }
    maybe_split(b, size);
    b->allocated = true;
    b->requested = nbytes;
    allocated_.emplace(b->ptr, b);
    ++stats_.num_allocs;
    stats_.allocated_bytes += static_cast<int64_t>(nbytes);
    stats_.peak_bytes = std::max(stats_.peak_bytes, stats_.allocated_bytes);
    return reinterpret_cast<void*>(b->ptr);
  }

  // Returns a block to the cache. Throws dsv4::Error for a pointer this pool did not hand out.
  void deallocate(void* ptr) {
    if (!ptr) return;
    std::lock_guard<std::mutex> lock(mu_);
    const auto it = allocated_.find(reinterpret_cast<uintptr_t>(ptr));
    if (it == allocated_.end())
      throw_error(__FILE__, __LINE__, nullptr, fmt::format("{}: free of unknown pointer {}", name_, ptr));
    Block* b = it->second;
    allocated_.erase(it);
    stats_.allocated_bytes -= static_cast<int64_t>(b->requested);
    b->allocated = false;
    b->requested = 0;
    if (b->prev && !b->prev->allocated) b = merge(b->prev, b);
    if (b->next && !b->next->allocated) b = merge(b, b->next);
    insert_free(b);
  }

  // Returns every entirely free segment to the system; returns the number of bytes released.
  size_t empty_cache() {
    std::lock_guard<std::mutex> lock(mu_);
    return release_cached_locked();
  }

  AllocatorStats stats() const {
    std::lock_guard<std::mutex> lock(mu_);
    return stats_;
  }
  void reset_peak() {
    std::lock_guard<std::mutex> lock(mu_);
    stats_.peak_bytes = stats_.allocated_bytes;
  }
  // Bytes in free blocks (reserved but not handed out), and the number of live system allocations.
  size_t cached_bytes() const {
    std::lock_guard<std::mutex> lock(mu_);
    size_t total = 0;
    for (const auto& [key, list] : free_lists_)
      for (const auto& [size, b] : list) total += size;
    return total;
  }
  int64_t num_segments() const {
    std::lock_guard<std::mutex> lock(mu_);
    return num_segments_;
  }
  const BlockPoolConfig& config() const { return config_; }

 private:
  struct Block;
  using FreeList = std::multimap<size_t, Block*>;
  struct Block {
    uintptr_t ptr = 0;
    size_t size = 0;
    size_t requested = 0;
    uintptr_t stream = 0;
    bool small = false;
    bool allocated = false;
    Block* prev = nullptr;  // neighbours inside the same segment (address order)
    Block* next = nullptr;
    bool listed = false;           // in a free list (free_it valid)
    FreeList::iterator free_it{};
  };
  using FreeKey = std::pair<bool, uintptr_t>;  // (small pool?, stream)

  static size_t round_up(size_t n, size_t g) { return (n + g - 1) / g * g; }
  static double mib(int64_t bytes) { return static_cast<double>(bytes) / (1024.0 * 1024.0); }

  Block* take_best_fit(bool small, uintptr_t stream, size_t size) {
    const auto lit = free_lists_.find(FreeKey{small, stream});
    if (lit == free_lists_.end()) return nullptr;
    FreeList& list = lit->second;
    const auto it = list.lower_bound(size);
    if (it == list.end()) return nullptr;
    Block* b = it->second;
    // Every larger candidate is oversize too, so rejecting the best fit rejects them all.
    if (b->size > config_.max_split_size && b->size - size > config_.max_oversize_waste) return nullptr;
    list.erase(it);
    b->listed = false;
    return b;
  }

  void maybe_split(Block* b, size_t size) {
    if (b->size > config_.max_split_size) return;
    const size_t rest = b->size - size;
    const size_t granule = b->small ? config_.small_granularity : config_.large_granularity;
    if (rest < granule) return;
    Block* r = new Block;
    r->ptr = b->ptr + size;
    r->size = rest;
    r->stream = b->stream;
    r->small = b->small;
    r->prev = b;
    r->next = b->next;
    if (b->next) b->next->prev = r;
    b->next = r;
    b->size = size;
    insert_free(r);
  }

  void insert_free(Block* b) {
    b->free_it = free_lists_[FreeKey{b->small, b->stream}].emplace(b->size, b);
    b->listed = true;
  }
  void erase_free(Block* b) {
    free_lists_[FreeKey{b->small, b->stream}].erase(b->free_it);
    b->listed = false;
  }

  // Merges free or just-freed neighbours a (lower address) and b; the free one(s) leave the free lists.
  Block* merge(Block* a, Block* b) {
    if (a->listed) erase_free(a);
    if (b->listed) erase_free(b);
    a->size += b->size;
    a->next = b->next;
    if (b->next) b->next->prev = a;
    delete b;
    return a;
  }

  size_t release_cached_locked() {
    size_t released = 0;
    for (auto& [key, list] : free_lists_) {
      for (auto it = list.begin(); it != list.end();) {
        Block* b = it->second;
        if (b->prev || b->next) {  // part of a segment that is still in use
          ++it;
          continue;
        }
        it = list.erase(it);
        system_free_(reinterpret_cast<void*>(b->ptr), b->size);
        stats_.reserved_bytes -= static_cast<int64_t>(b->size);
        --num_segments_;
        released += b->size;
        delete b;
      }
    }
    return released;
  }

  std::string name_;
  SystemAlloc system_alloc_;
  SystemFree system_free_;
  BlockPoolConfig config_;
  mutable std::mutex mu_;
  std::map<FreeKey, FreeList> free_lists_;
  std::unordered_map<uintptr_t, Block*> allocated_;
  AllocatorStats stats_;
  int64_t num_segments_ = 0;
};

}  // namespace dsv4

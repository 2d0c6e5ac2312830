// BlockPool (kernels/block_pool.h): the caching allocator's bookkeeping, driven by a fake system
// allocator so it runs without CUDA.
#include "kernels/block_pool.h"

#include <gtest/gtest.h>

#include <atomic>
#include <map>
#include <random>
#include <thread>
#include <vector>

namespace dsv4 {
namespace {

constexpr size_t kKiB = 1024, kMiB = 1024 * 1024;

// Hands out disjoint fake address ranges (never dereferenced) and can be limited to simulate OOM.
class FakeSystem {
 public:
  explicit FakeSystem(size_t limit = SIZE_MAX) : limit_(limit) {}

  BlockPool make_pool(BlockPoolConfig config = {}) {
    return BlockPool(
        "fake", [this](size_t n) { return alloc(n); }, [this](void* p, size_t n) { free(p, n); }, config);
  }
  void* alloc(size_t n) {
    ++alloc_calls;
    if (in_use + n > limit_) return nullptr;
    const uintptr_t p = next_;
    next_ += n + 4096;  // gaps between segments: merging across segments would show as overlap
    live_[p] = n;
    in_use += n;
    return reinterpret_cast<void*>(p);
  }
  void free(void* p, size_t n) {
    const auto it = live_.find(reinterpret_cast<uintptr_t>(p));
    ASSERT_NE(it, live_.end()) << "system free of an unknown segment";
    EXPECT_EQ(it->second, n) << "system free with a different size";
    in_use -= it->second;
    live_.erase(it);
    ++free_calls;
  }
  void set_limit(size_t limit) { limit_ = limit; }
  size_t live_segments() const { return live_.size(); }
  // The segment containing [p, p + n), or false.
  bool inside_segment(uintptr_t p, size_t n) const {
    auto it = live_.upper_bound(p);
    if (it == live_.begin()) return false;
    --it;
    return p >= it->first && p + n <= it->first + it->second;
  }

  size_t in_use = 0;
  int alloc_calls = 0;
  int free_calls = 0;

 private:
  size_t limit_;
  uintptr_t next_ = 1 << 20;
  std::map<uintptr_t, size_t> live_;
};

uintptr_t addr(void* p) { return reinterpret_cast<uintptr_t>(p); }

TEST(BlockPool, RoundsSmallTo512BytesAndLargeTo2MiB) {
  FakeSystem sys;
  BlockPool pool = sys.make_pool();
  EXPECT_EQ(pool.round_size(0), 512u);
  EXPECT_EQ(pool.round_size(1), 512u);
  EXPECT_EQ(pool.round_size(512), 512u);
  EXPECT_EQ(pool.round_size(513), 1024u);
  EXPECT_EQ(pool.round_size(kMiB), kMiB);
  EXPECT_EQ(pool.round_size(kMiB + 1), 2 * kMiB);
  EXPECT_EQ(pool.round_size(5 * kMiB), 6 * kMiB);
}

TEST(BlockPool, FreedBlockIsReusedWithoutSystemAllocation) {
  FakeSystem sys;
  BlockPool pool = sys.make_pool();
  void* a = pool.allocate(10 * kMiB);
  EXPECT_EQ(pool.stats().num_system_allocs, 1);
  pool.deallocate(a);
  void* b = pool.allocate(10 * kMiB);
  EXPECT_EQ(a, b);
  EXPECT_EQ(pool.stats().num_system_allocs, 1);
  EXPECT_EQ(pool.stats().num_allocs, 2);
  EXPECT_EQ(sys.alloc_calls, 1);
  pool.deallocate(b);
}

TEST(BlockPool, SmallBlocksAreCarvedFromOneSegment) {
  FakeSystem sys;
  BlockPool pool = sys.make_pool();
  void* a = pool.allocate(1000);  // 1024 bytes
  void* b = pool.allocate(100);   // 512 bytes
  void* c = pool.allocate(0);     // 512 bytes, still a unique pointer
  EXPECT_EQ(sys.alloc_calls, 1);
  EXPECT_EQ(addr(b), addr(a) + 1024);
  EXPECT_EQ(addr(c), addr(b) + 512);
  const AllocatorStats s = pool.stats();
  EXPECT_EQ(s.reserved_bytes, static_cast<int64_t>(2 * kMiB));
  EXPECT_EQ(s.allocated_bytes, 1100);  // bytes as requested
  EXPECT_EQ(pool.cached_bytes(), 2 * kMiB - 2048);
  pool.deallocate(a);
  pool.deallocate(b);
  pool.deallocate(c);
  EXPECT_EQ(pool.cached_bytes(), 2 * kMiB);  // merged back into one free block
  EXPECT_EQ(pool.stats().allocated_bytes, 0);
}

TEST(BlockPool, SmallAndLargeRequestsUseSeparatePools) {
  FakeSystem sys;
  BlockPool pool = sys.make_pool();
  void* big = pool.allocate(8 * kMiB);
  pool.deallocate(big);
  void* small = pool.allocate(4 * kKiB);  // must not carve the cached 8 MiB block
  EXPECT_EQ(sys.alloc_calls, 2);
  EXPECT_FALSE(addr(small) >= addr(big) && addr(small) < addr(big) + 8 * kMiB);
  pool.deallocate(small);
}

TEST(BlockPool, BestFitTakesTheSmallestSufficientBlock) {
  FakeSystem sys;
  BlockPool pool = sys.make_pool();
  void* b10 = pool.allocate(10 * kMiB);
  void* b4 = pool.allocate(4 * kMiB);
  void* b6 = pool.allocate(6 * kMiB);
  pool.deallocate(b10);
  pool.deallocate(b4);
  pool.deallocate(b6);
  EXPECT_EQ(pool.allocate(5 * kMiB), b6);   // 6 MiB is the best fit for 6 MiB (rounded)
  EXPECT_EQ(pool.allocate(3 * kMiB), b4);   // 4 MiB
  EXPECT_EQ(pool.allocate(7 * kMiB), b10);  // 8 MiB from the 10 MiB block, 2 MiB split off
  EXPECT_EQ(pool.cached_bytes(), 2 * kMiB);
  EXPECT_EQ(sys.alloc_calls, 3);
}

TEST(BlockPool, SplitRemainderIsReusableAndMergesBack) {
  FakeSystem sys;
  BlockPool pool = sys.make_pool();
  void* seg = pool.allocate(16 * kMiB);
  pool.deallocate(seg);
  void* a = pool.allocate(6 * kMiB);
  void* b = pool.allocate(4 * kMiB);
  void* c = pool.allocate(6 * kMiB);
  EXPECT_EQ(a, seg);
  EXPECT_EQ(addr(b), addr(a) + 6 * kMiB);
  EXPECT_EQ(addr(c), addr(b) + 4 * kMiB);
  EXPECT_EQ(sys.alloc_calls, 1);
  // Free the middle, then the neighbours: everything merges into the original segment.
  pool.deallocate(b);
  EXPECT_EQ(pool.empty_cache(), 0u);  // segment still partly in use
  pool.deallocate(a);
  pool.deallocate(c);
  EXPECT_EQ(pool.cached_bytes(), 16 * kMiB);
  EXPECT_EQ(pool.allocate(16 * kMiB), seg);
}

TEST(BlockPool, OversizeBlocksAreNotSplitAndBoundTheWaste) {
  FakeSystem sys;
  BlockPoolConfig cfg;
  cfg.max_split_size = 64 * kMiB;
  cfg.max_oversize_waste = 16 * kMiB;
  BlockPool pool = sys.make_pool(cfg);
  void* big = pool.allocate(100 * kMiB);
  pool.deallocate(big);
  void* near = pool.allocate(90 * kMiB);  // waste 10 MiB <= 16: reuse whole, no split
  EXPECT_EQ(near, big);
  EXPECT_EQ(pool.cached_bytes(), 0u);
  pool.deallocate(near);
  void* far = pool.allocate(20 * kMiB);  // waste 80 MiB: new segment
  EXPECT_NE(far, big);
  EXPECT_EQ(sys.alloc_calls, 2);
  EXPECT_EQ(pool.stats().allocated_bytes, static_cast<int64_t>(20 * kMiB));
  pool.deallocate(far);
}

TEST(BlockPool, EmptyCacheReleasesOnlyWholeFreeSegments) {
  FakeSystem sys;
  BlockPool pool = sys.make_pool();
  void* a = pool.allocate(4 * kMiB);
  void* b = pool.allocate(100);
  void* c = pool.allocate(200);
  pool.deallocate(a);
  pool.deallocate(b);
  EXPECT_EQ(pool.num_segments(), 2);
  EXPECT_EQ(pool.empty_cache(), 4 * kMiB);  // the small segment still holds c
  EXPECT_EQ(pool.num_segments(), 1);
  EXPECT_EQ(pool.stats().reserved_bytes, static_cast<int64_t>(2 * kMiB));
  pool.deallocate(c);
  EXPECT_EQ(pool.empty_cache(), 2 * kMiB);
  EXPECT_EQ(pool.stats().reserved_bytes, 0);
  EXPECT_EQ(sys.live_segments(), 0u);
  EXPECT_EQ(sys.free_calls, 2);
}

TEST(BlockPool, StreamsDoNotShareCachedBlocks) {
  FakeSystem sys;
  BlockPool pool = sys.make_pool();
  void* a = pool.allocate(4 * kMiB, /*stream=*/1);
  pool.deallocate(a);
  void* b = pool.allocate(4 * kMiB, /*stream=*/2);
  EXPECT_NE(a, b);
  void* c = pool.allocate(4 * kMiB, /*stream=*/1);
  EXPECT_EQ(a, c);
  EXPECT_EQ(sys.alloc_calls, 2);
  pool.deallocate(b);
  pool.deallocate(c);
}

TEST(BlockPool, OutOfMemoryReleasesTheCacheAndRetriesOnce) {
  FakeSystem sys(10 * kMiB);
  BlockPool pool = sys.make_pool();
  void* a = pool.allocate(6 * kMiB);
  pool.deallocate(a);  // cached: 6 of 10 MiB held
  void* b = pool.allocate(8 * kMiB);  // first system call fails, cache released, retry succeeds
  EXPECT_NE(b, nullptr);
  EXPECT_EQ(sys.alloc_calls, 3);
  EXPECT_EQ(sys.free_calls, 1);
  EXPECT_EQ(pool.stats().reserved_bytes, static_cast<int64_t>(8 * kMiB));
  pool.deallocate(b);
}

TEST(BlockPool, OutOfMemoryErrorReportsRequestedAllocatedAndReserved) {
  FakeSystem sys(10 * kMiB);
  BlockPool pool = sys.make_pool();
  void* a = pool.allocate(6 * kMiB);
  try {
    pool.allocate(8 * kMiB);
    FAIL() << "expected an out-of-memory error";
  } catch (const Error& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find("out of memory"), std::string::npos) << what;
    EXPECT_NE(what.find("requested 8388608 bytes"), std::string::npos) << what;
    EXPECT_NE(what.find("6291456 bytes (6.0 MiB) allocated"), std::string::npos) << what;
    EXPECT_NE(what.find("6291456 bytes (6.0 MiB) reserved"), std::string::npos) << what;
  }
  // The pool is still usable after the failure.
  pool.deallocate(a);
  void* b = pool.allocate(8 * kMiB);
  EXPECT_NE(b, nullptr);
  pool.deallocate(b);
}

TEST(BlockPool, StatsTrackRequestedBytesAndPeak) {
  FakeSystem sys;
  BlockPool pool = sys.make_pool();
  void* a = pool.allocate(3000);
  void* b = pool.allocate(3 * kMiB);
  EXPECT_EQ(pool.stats().allocated_bytes, static_cast<int64_t>(3000 + 3 * kMiB));
  EXPECT_EQ(pool.stats().peak_bytes, static_cast<int64_t>(3000 + 3 * kMiB));
  pool.deallocate(b);
  EXPECT_EQ(pool.stats().allocated_bytes, 3000);
  EXPECT_EQ(pool.stats().peak_bytes, static_cast<int64_t>(3000 + 3 * kMiB));
  pool.reset_peak();
  EXPECT_EQ(pool.stats().peak_bytes, 3000);
  EXPECT_EQ(pool.stats().reserved_bytes, static_cast<int64_t>(2 * kMiB + 4 * kMiB));
  pool.deallocate(a);
}

TEST(BlockPool, FreeingAnUnknownPointerThrows) {
  FakeSystem sys;
  BlockPool pool = sys.make_pool();
  void* a = pool.allocate(100);
  EXPECT_THROW(pool.deallocate(reinterpret_cast<void*>(addr(a) + 512)), Error);
  pool.deallocate(a);
  EXPECT_THROW(pool.deallocate(a), Error);  // double free
  pool.deallocate(nullptr);                 // no-op
}

TEST(BlockPool, DestructorReturnsEverySegment) {
  FakeSystem sys;
  {
    BlockPool pool = sys.make_pool();
    pool.allocate(100);
    void* b = pool.allocate(5 * kMiB);
    pool.allocate(7 * kMiB);
    pool.deallocate(b);
  }
  EXPECT_EQ(sys.live_segments(), 0u);
  EXPECT_EQ(sys.in_use, 0u);
}

// Random allocate/free sequences: live blocks never overlap, stay inside live segments, and the
// statistics add up.
TEST(BlockPool, RandomizedBlocksNeverOverlap) {
  FakeSystem sys;
  BlockPool pool = sys.make_pool();
  std::mt19937_64 rng(42);
  std::map<uintptr_t, size_t> live;  // ptr -> rounded size
  int64_t requested = 0;
  std::map<uintptr_t, size_t> req;
  for (int step = 0; step < 4000; ++step) {
    if (live.empty() || rng() % 3 != 0) {
      const size_t n = rng() % 4 == 0 ? rng() % (24 * kMiB) : rng() % (64 * kKiB);
      void* p = pool.allocate(n, rng() % 2);
      const size_t rounded = pool.round_size(n);
      ASSERT_TRUE(sys.inside_segment(addr(p), rounded));
      auto next = live.lower_bound(addr(p));
      if (next != live.end()) {
        ASSERT_LE(addr(p) + rounded, next->first);
      }
      if (next != live.begin()) {
        auto prev = std::prev(next);
        ASSERT_LE(prev->first + prev->second, addr(p));
      }
      live[addr(p)] = rounded;
      req[addr(p)] = n;
      requested += static_cast<int64_t>(n);
    } else {
      auto it = live.begin();
      std::advance(it, static_cast<long>(rng() % live.size()));
      pool.deallocate(reinterpret_cast<void*>(it->first));
      requested -= static_cast<int64_t>(req[it->first]);
      req.erase(it->first);
      live.erase(it);
    }
    ASSERT_EQ(pool.stats().allocated_bytes, requested);
    ASSERT_EQ(pool.stats().reserved_bytes, static_cast<int64_t>(sys.in_use));
    if (step % 500 == 0) pool.empty_cache();
  }
  for (const auto& [p, n] : live) pool.deallocate(reinterpret_cast<void*>(p));
  EXPECT_EQ(pool.cached_bytes(), static_cast<size_t>(pool.stats().reserved_bytes));
  pool.empty_cache();
  EXPECT_EQ(sys.live_segments(), 0u);
}

TEST(BlockPool, ConcurrentAllocateAndFreeIsConsistent) {
  FakeSystem sys;
  BlockPool pool = sys.make_pool();
  std::vector<std::thread> threads;
  std::atomic<int64_t> allocs{0};
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&pool, &allocs, t] {
      std::mt19937 rng(static_cast<unsigned>(t));
      std::vector<void*> mine;
      for (int i = 0; i < 2000; ++i) {
        if (mine.empty() || rng() % 2 == 0) {
          mine.push_back(pool.allocate(rng() % (3 * kMiB)));
          ++allocs;
        } else {
          pool.deallocate(mine.back());
          mine.pop_back();
        }
      }
      for (void* p : mine) pool.deallocate(p);
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(pool.stats().allocated_bytes, 0);
  EXPECT_EQ(pool.stats().num_allocs, allocs.load());
  pool.empty_cache();
  EXPECT_EQ(pool.stats().reserved_bytes, 0);
  EXPECT_EQ(sys.live_segments(), 0u);
}

}  // namespace
}  // namespace dsv4

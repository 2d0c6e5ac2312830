// Scalar conversions of runtime/dtype.h: bit-exact checks against the oracle fixtures written by
// tests/ref/gen_dtype_fixtures.py (numpy / ml_dtypes / math.frexp), plus fixture-free properties.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <functional>
#include <limits>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "runtime/dtype.h"

#ifndef DSV4_FIXTURE_DIR
#error "DSV4_FIXTURE_DIR must point at tests/fixtures"
#endif

namespace dsv4 {
namespace {

// ---- fixture reading --------------------------------------------------------------------------------
struct FixtureCase {
  uint32_t in = 0;
  uint32_t out = 0;
  int line = 0;
};

struct Fixture {
  std::string path;
  std::string header;  // the '#' lines, newline-joined
  std::vector<FixtureCase> cases;
};

// Reads DSV4_FIXTURE_DIR/name: '#' lines are the header, every other non-blank line is "<hex> <hex>".
// Records a test failure (and returns no cases) when the file is missing or a line does not parse.
Fixture load_fixture(const std::string& name) {
  Fixture f;
  f.path = std::string(DSV4_FIXTURE_DIR) + "/" + name;
  std::ifstream is(f.path);
  if (!is) {
    ADD_FAILURE() << "cannot open fixture " << f.path
                  << " (regenerate with tests/ref/gen_dtype_fixtures.py, see tests/ref/README.md)";
    return f;
  }
  std::string line;
  int lineno = 0;
  while (std::getline(is, line)) {
    ++lineno;
    if (line.empty()) continue;
    if (line[0] == '#') {
      f.header += line + "\n";
      continue;
    }
    unsigned in = 0, out = 0;
    char extra = 0;
    if (std::sscanf(line.c_str(), "%x %x %c", &in, &out, &extra) != 2) {
      ADD_FAILURE() << f.path << ":" << lineno << ": malformed case '" << line << "'";
      f.cases.clear();
      return f;
    }
    f.cases.push_back({in, out, lineno});
  }
  return f;
}

std::string hex(uint32_t v, int digits) {
  char buf[16];
  std::snprintf(buf, sizeof(buf), "0x%0*x", digits, v);
  return buf;
}

// Checks got(in) == out bit-for-bit on every case; reports the first few mismatches and the count.
void check_fixture(const std::string& name, size_t min_cases, int in_digits, int out_digits,
                   const std::function<uint32_t(uint32_t)>& got_of) {
  const Fixture f = load_fixture(name);
  ASSERT_GE(f.cases.size(), min_cases) << f.path << ": too few cases";
  EXPECT_NE(f.header.find("gen_dtype_fixtures.py"), std::string::npos) << f.path << ": header lacks generator";
  constexpr int kShow = 8;
  int mismatches = 0;
  std::ostringstream first;
  for (const FixtureCase& c : f.cases) {
    const uint32_t got = got_of(c.in);
    if (got == c.out) continue;
    if (mismatches++ < kShow)
      first << "\n  line " << c.line << ": in " << hex(c.in, in_digits) << " expected " << hex(c.out, out_digits)
            << " got " << hex(got, out_digits);
  }
  EXPECT_EQ(mismatches, 0) << name << ": " << mismatches << " of " << f.cases.size()
                           << " cases differ (first " << std::min(mismatches, kShow) << "):" << first.str();
}

// ---- fixtures: decode ---------------------------------------------------------------------------------
TEST(DTypeFixture, DecodeE4M3AllCodes) {
  const Fixture f = load_fixture("dtype_decode_e4m3.txt");
  ASSERT_EQ(f.cases.size(), 256u);
  for (size_t i = 0; i < f.cases.size(); ++i) ASSERT_EQ(f.cases[i].in, i) << "codes must be 0..255 in order";
  check_fixture("dtype_decode_e4m3.txt", 256, 2, 8,
                [](uint32_t c) { return f32_bits(e4m3_to_f32(static_cast<uint8_t>(c))); });
}

TEST(DTypeFixture, DecodeE2M1AllCodes) {
  const Fixture f = load_fixture("dtype_decode_e2m1.txt");
  ASSERT_EQ(f.cases.size(), 16u);
  for (size_t i = 0; i < f.cases.size(); ++i) ASSERT_EQ(f.cases[i].in, i) << "codes must be 0..15 in order";
  check_fixture("dtype_decode_e2m1.txt", 16, 1, 8,
                [](uint32_t c) { return f32_bits(e2m1_to_f32(static_cast<uint8_t>(c))); });
}

TEST(DTypeFixture, DecodeE8M0AllCodes) {
  const Fixture f = load_fixture("dtype_decode_e8m0.txt");
  ASSERT_EQ(f.cases.size(), 256u);
  for (size_t i = 0; i < f.cases.size(); ++i) ASSERT_EQ(f.cases[i].in, i) << "codes must be 0..255 in order";
  check_fixture("dtype_decode_e8m0.txt", 256, 2, 8,
                [](uint32_t c) { return f32_bits(e8m0_to_f32(static_cast<uint8_t>(c))); });
}

TEST(DTypeFixture, DecodeF16Sampled) {
  check_fixture("dtype_decode_f16.txt", 1000, 4, 8,
                [](uint32_t c) { return f32_bits(f16_to_f32(static_cast<uint16_t>(c))); });
}

TEST(DTypeFixture, DecodeBF16Sampled) {
  check_fixture("dtype_decode_bf16.txt", 1000, 4, 8,
                [](uint32_t c) { return f32_bits(bf16_to_f32(static_cast<uint16_t>(c))); });
}

// ---- fixtures: encode ---------------------------------------------------------------------------------
TEST(DTypeFixture, EncodeBF16) {
  check_fixture("dtype_encode_bf16.txt", 4000, 8, 4, [](uint32_t b) { return f32_to_bf16(f32_from_bits(b)); });
}

TEST(DTypeFixture, EncodeF16) {
  check_fixture("dtype_encode_f16.txt", 4000, 8, 4, [](uint32_t b) { return f32_to_f16(f32_from_bits(b)); });
}

TEST(DTypeFixture, EncodeE4M3Saturating) {
  check_fixture("dtype_encode_e4m3.txt", 3000, 8, 2, [](uint32_t b) { return f32_to_e4m3(f32_from_bits(b)); });
}

TEST(DTypeFixture, EncodeE2M1Saturating) {
  check_fixture("dtype_encode_e2m1.txt", 1500, 8, 1, [](uint32_t b) { return f32_to_e2m1(f32_from_bits(b)); });
}

TEST(DTypeFixture, E8M0CeilScale) {
  check_fixture("dtype_e8m0_ceil.txt", 1500, 8, 2,
                [](uint32_t b) { return e8m0_ceil_from_f32(f32_from_bits(b)); });
}

// ---- properties (no fixtures) ---------------------------------------------------------------------------
// Random f32 bit patterns, uniform over sign, biased exponent (0..254: finite) and mantissa.
std::vector<float> random_finite_floats(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<float> v(n);
  for (float& x : v) {
    const uint32_t sign = static_cast<uint32_t>(rng() & 1u), exp = static_cast<uint32_t>(rng() % 255u),
                   mant = static_cast<uint32_t>(rng() & 0x7FFFFFu);
    x = f32_from_bits(sign << 31 | exp << 23 | mant);
  }
  return v;
}

// Random finite floats concentrated on [2^lo, 2^(hi+1)) in magnitude, both signs.
std::vector<float> random_floats_in(size_t n, int lo, int hi, uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<float> v(n);
  for (float& x : v) {
    const auto span = static_cast<uint32_t>(hi - lo + 1);
    const auto sign = static_cast<uint32_t>(rng() & 1u);
    const auto e = static_cast<uint32_t>(lo + 127 + static_cast<int>(rng() % span));
    x = f32_from_bits(sign << 31 | e << 23 | static_cast<uint32_t>(rng() & 0x7FFFFFu));
  }
  return v;
}

TEST(DTypeProps, E4M3DecodeEncodeIsIdentityOnFiniteCodes) {
  int finite = 0;
  for (int c = 0; c < 256; ++c) {
    const auto code = static_cast<uint8_t>(c);
    const float v = e4m3_to_f32(code);
    if ((c & 0x7F) == 0x7F) {  // the two NaN codes keep their sign
      EXPECT_TRUE(std::isnan(v)) << c;
      EXPECT_EQ(f32_to_e4m3(v), code) << c;
      continue;
    }
    ++finite;
    EXPECT_TRUE(std::isfinite(v)) << c;
    EXPECT_EQ(f32_to_e4m3(v), code) << "code " << c << " value " << v;
  }
  EXPECT_EQ(finite, 254);
  EXPECT_EQ(f32_to_e4m3(-0.0f), 0x80);
  EXPECT_EQ(f32_bits(e4m3_to_f32(0x80)), 0x80000000u);
  EXPECT_EQ(e4m3_to_f32(0x7E), kE4M3Max);
  EXPECT_EQ(e4m3_to_f32(0x01), std::ldexp(1.0f, -9));  // smallest subnormal
}

TEST(DTypeProps, E2M1DecodeEncodeIsIdentityOnAllCodes) {
  const float mags[8] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f};
  for (int c = 0; c < 16; ++c) {
    const float v = e2m1_to_f32(static_cast<uint8_t>(c));
    EXPECT_EQ(f32_bits(v), f32_bits((c & 8) ? -mags[c & 7] : mags[c & 7])) << c;
    EXPECT_EQ(f32_to_e2m1(v), c) << c;
  }
}

TEST(DTypeProps, E8M0CeilOfEveryScaleIsItsCode) {
  for (int c = 0; c < 255; ++c) {
    const float v = e8m0_to_f32(static_cast<uint8_t>(c));
    EXPECT_EQ(v, std::ldexp(1.0f, c - 127)) << c;
    EXPECT_EQ(e8m0_ceil_from_f32(v), c) << c;
    if (c >= 1 && c < 254) {  // just above a power of two goes to the next scale, just below stays
      EXPECT_EQ(e8m0_ceil_from_f32(std::nextafter(v, INFINITY)), c + 1) << c;
      EXPECT_EQ(e8m0_ceil_from_f32(std::nextafter(v, 0.0f)), c) << c;
    }
  }
  EXPECT_TRUE(std::isnan(e8m0_to_f32(0xFF)));
  EXPECT_EQ(e8m0_ceil_from_f32(std::nextafter(std::ldexp(1.0f, 127), INFINITY)), 0xFF);
  EXPECT_EQ(e8m0_ceil_from_f32(0.0f), 0xFF);
  EXPECT_EQ(e8m0_ceil_from_f32(-1.0f), 0xFF);
}

// The encoders are monotonic: sorting inputs sorts the decoded outputs (codes are sign-magnitude, so the
// comparison is on decoded values).
template <typename Enc, typename Dec>
void expect_monotonic(const char* what, std::vector<float> xs, Enc enc, Dec dec) {
  std::sort(xs.begin(), xs.end());
  float prev = -INFINITY;
  int bad = 0;
  for (float x : xs) {
    const float y = dec(enc(x));
    if (y < prev && bad++ < 5) ADD_FAILURE() << what << ": not monotonic at x=" << x << " (" << y << " < " << prev << ")";
    prev = y;
  }
  EXPECT_EQ(bad, 0) << what;
}

TEST(DTypeProps, EncodeIsMonotonic) {
  std::vector<float> xs = random_finite_floats(100000, 1);
  for (float x : random_floats_in(100000, -12, 10, 2)) xs.push_back(x);
  for (float x : {0.0f, -0.0f, INFINITY, -INFINITY, 448.0f, -448.0f, 464.0f, 6.0f, 7.0f, 65520.0f}) xs.push_back(x);
  expect_monotonic("e4m3", xs, [](float x) { return f32_to_e4m3(x); }, [](uint8_t c) { return e4m3_to_f32(c); });
  expect_monotonic("e2m1", xs, [](float x) { return f32_to_e2m1(x); }, [](uint8_t c) { return e2m1_to_f32(c); });
  expect_monotonic("bf16", xs, [](float x) { return f32_to_bf16(x); }, [](uint16_t c) { return bf16_to_f32(c); });
  expect_monotonic("f16", xs, [](float x) { return f32_to_f16(x); }, [](uint16_t c) { return f16_to_f32(c); });
  std::vector<float> pos;
  for (float x : xs)
    if (x > 0.0f && std::isfinite(x) && x <= std::ldexp(1.0f, 127)) pos.push_back(x);
  expect_monotonic("e8m0_ceil", pos, [](float x) { return e8m0_ceil_from_f32(x); },
                   [](uint8_t c) { return e8m0_to_f32(c); });
}

// Brute-force nearest-value reference for the small formats: saturate at the largest code, else the
// closest code, ties to the even code (mantissa LSB 0, which is the code LSB). Distances are computed in
// double, exact wherever two candidates are close to equidistant.
template <int kCodes>
uint8_t nearest_code(float x, const float (&table)[kCodes], uint8_t sign_bit) {
  const double a = std::fabs(static_cast<double>(x));
  int best = kCodes - 1;
  if (a < table[kCodes - 1]) {
    best = 0;
    for (int c = 1; c < kCodes; ++c) {
      const double d = std::fabs(table[c] - a), db = std::fabs(table[best] - a);
      if (d < db || (d == db && (c & 1) == 0 && (best & 1) == 1)) best = c;
    }
  }
  return static_cast<uint8_t>((std::signbit(x) ? sign_bit : 0) | best);
}

TEST(DTypeProps, SmallFormatsMatchBruteForceNearest) {
  float e4m3[127], e2m1[8];
  for (int c = 0; c < 127; ++c) e4m3[c] = e4m3_to_f32(static_cast<uint8_t>(c));
  for (int c = 0; c < 8; ++c) e2m1[c] = e2m1_to_f32(static_cast<uint8_t>(c));
  std::vector<float> xs = random_finite_floats(50000, 3);
  for (float x : random_floats_in(200000, -12, 10, 4)) xs.push_back(x);
  for (int c = 0; c < 126; ++c) {  // exact ties and their neighbours
    const float mid = 0.5f * (e4m3[c] + e4m3[c + 1]);
    for (float x : {mid, std::nextafter(mid, 0.0f), std::nextafter(mid, INFINITY)}) xs.insert(xs.end(), {x, -x});
  }
  int bad4 = 0, bad2 = 0;
  for (float x : xs) {
    const uint8_t want4 = nearest_code(x, e4m3, 0x80), got4 = f32_to_e4m3(x);
    if (want4 != got4 && bad4++ < 5) ADD_FAILURE() << "e4m3 x=" << x << " want " << int(want4) << " got " << int(got4);
    const uint8_t want2 = nearest_code(x, e2m1, 0x8), got2 = f32_to_e2m1(x);
    if (want2 != got2 && bad2++ < 5) ADD_FAILURE() << "e2m1 x=" << x << " want " << int(want2) << " got " << int(got2);
  }
  EXPECT_EQ(bad4, 0);
  EXPECT_EQ(bad2, 0);
}

TEST(DTypeProps, Fp4PackingLowNibbleIsEvenIndex) {
  uint8_t buf[4] = {0, 0, 0, 0};
  fp4_set(buf, 0, 0x3);
  EXPECT_EQ(buf[0], 0x03);
  fp4_set(buf, 1, 0xA);
  EXPECT_EQ(buf[0], 0xA3);
  fp4_set(buf, 5, 0x1F);  // only the low 4 bits of the code are stored
  EXPECT_EQ(buf[2], 0xF0);
  fp4_set(buf, 4, 0x9);
  EXPECT_EQ(buf[2], 0xF9);
  fp4_set(buf, 0, 0xC);  // overwrite keeps the neighbour
  EXPECT_EQ(buf[0], 0xAC);
  EXPECT_EQ(buf[1], 0x00);
  EXPECT_EQ(buf[3], 0x00);
  EXPECT_EQ(fp4_get(buf, 0), 0xC);
  EXPECT_EQ(fp4_get(buf, 1), 0xA);
  EXPECT_EQ(fp4_get(buf, 4), 0x9);
  EXPECT_EQ(fp4_get(buf, 5), 0xF);
  // Every code at every position round-trips without touching the other nibble.
  for (int i = 0; i < 8; ++i)
    for (int c = 0; c < 16; ++c) {
      uint8_t b[4] = {0x5A, 0xC3, 0x96, 0x0F};
      const uint8_t before[4] = {b[0], b[1], b[2], b[3]};
      fp4_set(b, i, static_cast<uint8_t>(c));
      EXPECT_EQ(fp4_get(b, i), c);
      EXPECT_EQ(fp4_get(b, i ^ 1), (before[i >> 1] >> ((~i & 1) * 4)) & 0xF);
      for (int j = 0; j < 4; ++j) {
        if (j != i / 2) {
          EXPECT_EQ(b[j], before[j]);
        }
      }
    }
}

TEST(DTypeProps, RoundBf16IsIdempotent) {
  std::vector<float> xs = random_finite_floats(100000, 5);
  for (float x : {0.0f, -0.0f, INFINITY, -INFINITY, std::numeric_limits<float>::max(),
                  std::numeric_limits<float>::quiet_NaN(), f32_from_bits(0xFF800001u)})
    xs.push_back(x);
  for (float x : xs) {
    const uint32_t once = f32_bits(round_bf16(x)), twice = f32_bits(round_bf16(f32_from_bits(once)));
    ASSERT_EQ(once, twice) << "x bits " << hex(f32_bits(x), 8);
    ASSERT_EQ(once & 0xFFFFu, 0u) << "x bits " << hex(f32_bits(x), 8);
  }
}

TEST(DTypeProps, F16OverflowThreshold) {
  EXPECT_EQ(f32_to_f16(65504.0f), 0x7BFF);
  EXPECT_EQ(f32_to_f16(65520.0f), 0x7C00);  // tie with the virtual 65536: rounds to even = inf
  EXPECT_EQ(f32_to_f16(65519.99f), 0x7BFF);
  EXPECT_EQ(f32_to_f16(std::nextafter(65520.0f, 0.0f)), 0x7BFF);
  EXPECT_EQ(f32_to_f16(-65520.0f), 0xFC00);
  EXPECT_EQ(f32_to_f16(-65519.99f), 0xFBFF);
  EXPECT_EQ(f32_to_f16(1e30f), 0x7C00);
  EXPECT_EQ(f16_to_f32(0x7BFF), 65504.0f);
}

TEST(DTypeProps, SaturationBoundaries) {
  EXPECT_EQ(f32_to_e4m3(448.0f), 0x7E);
  EXPECT_EQ(f32_to_e4m3(464.0f), 0x7E);
  EXPECT_EQ(f32_to_e4m3(480.0f), 0x7E);
  EXPECT_EQ(f32_to_e4m3(INFINITY), 0x7E);
  EXPECT_EQ(f32_to_e4m3(-INFINITY), 0xFE);
  EXPECT_EQ(f32_to_e4m3(std::nextafter(448.0f, 0.0f)), 0x7E);
  EXPECT_EQ(f32_to_e4m3(432.0f), 0x7E);  // tie 416|448 -> even mantissa (448)
  EXPECT_EQ(f32_to_e2m1(6.0f), 0x7);
  EXPECT_EQ(f32_to_e2m1(7.0f), 0x7);
  EXPECT_EQ(f32_to_e2m1(-INFINITY), 0xF);
  EXPECT_EQ(f32_to_e2m1(5.0f), 0x6);  // tie 4|6 -> 4 (even code)
  EXPECT_EQ(f32_to_e2m1(0.25f), 0x0);  // tie 0|0.5 -> 0
  EXPECT_EQ(f32_to_e2m1(-0.25f), 0x8);
}

// F16 decode of all 65536 codes against an independent formula (ldexp), and encode(decode(h)) == h.
TEST(DTypeProps, F16AllCodesDecodeAndRoundTrip) {
  int bad = 0;
  for (uint32_t h = 0; h < 65536; ++h) {
    const uint32_t s = h >> 15, e = (h >> 10) & 0x1F, m = h & 0x3FF;
    uint32_t want;
    if (e == 0x1F) {
      want = s << 31 | 0x7F800000u | m << 13;  // inf, NaN with the payload in the top mantissa bits
    } else {
      const float mag = e == 0 ? std::ldexp(static_cast<float>(m), -24)
                               : std::ldexp(static_cast<float>(1024 + m), static_cast<int>(e) - 25);
      want = f32_bits(s ? -mag : mag);
    }
    const float v = f16_to_f32(static_cast<uint16_t>(h));
    if (f32_bits(v) != want && bad++ < 5) ADD_FAILURE() << "f16 decode " << hex(h, 4) << " got " << hex(f32_bits(v), 8);
    if (f32_to_f16(v) != h && bad++ < 5) ADD_FAILURE() << "f16 round trip " << hex(h, 4) << " got " << hex(f32_to_f16(v), 4);
  }
  EXPECT_EQ(bad, 0);
}

// BF16 decode is the top half of an f32; encode(decode(h)) == h except NaN, which becomes quiet 0x7FC0.
TEST(DTypeProps, BF16AllCodesDecodeAndRoundTrip) {
  int bad = 0;
  for (uint32_t h = 0; h < 65536; ++h) {
    const float v = bf16_to_f32(static_cast<uint16_t>(h));
    if (f32_bits(v) != h << 16 && bad++ < 5) ADD_FAILURE() << "bf16 decode " << hex(h, 4);
    const bool nan = (h & 0x7F80u) == 0x7F80u && (h & 0x7Fu) != 0;
    const uint32_t want = nan ? ((h & 0x8000u) | 0x7FC0u) : h;
    if (f32_to_bf16(v) != want && bad++ < 5) ADD_FAILURE() << "bf16 round trip " << hex(h, 4) << " got " << hex(f32_to_bf16(v), 4);
  }
  EXPECT_EQ(bad, 0);
}

}  // namespace
}  // namespace dsv4

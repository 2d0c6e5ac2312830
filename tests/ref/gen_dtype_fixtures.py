#!/usr/bin/env python3
"""Oracle fixtures for the scalar conversions in src/runtime/dtype.h.

Writes tests/fixtures/dtype_*.txt: plain text, '#' header lines (generator, package versions, format of
a case), then one case per line: "<input bits hex> <expected output bits hex>". tests/runtime/
test_dtype.cpp checks every line bit-for-bit (NaN outputs included).

Oracles (independent of the C++ code):
  BF16     ml_dtypes.bfloat16                      (f32 array .astype)
  F16      numpy.float16                           (f32 array .astype)
  F8_E4M3  ml_dtypes.float8_e4m3fn(np.clip(x, -448, 448))   (saturating; NaN passes through clip)
  F4_E2M1  ml_dtypes.float4_e2m1fn                 (already saturating)
  E8M0     decode: ml_dtypes.float8_e8m0fnu; ceil scale: math.frexp on the exact value (no ml_dtypes)

Deterministic: random cases come from Python's random.Random(SEED).getrandbits, whose stream is stable
across Python versions. Usage:
  gen_dtype_fixtures.py [--out DIR]   write the fixtures (default: tests/fixtures next to this script)
  gen_dtype_fixtures.py --check       regenerate in memory and compare with the files in DIR
"""

import argparse
import math
import random
import sys
import warnings
from pathlib import Path

import ml_dtypes
import numpy as np

SEED = 0xD5F4
GENERATOR = "tests/ref/gen_dtype_fixtures.py"

F32_INF = 0x7F800000


# ---- f32 helpers ------------------------------------------------------------------------------------
def f32(bits):
    return np.array([bits], dtype=np.uint32).view(np.float32)[0]


def bits_of(x):
    """Bits of a Python float / numpy scalar after exact conversion to f32 (asserts exactness)."""
    v = np.float32(x)
    if not math.isnan(float(x)) and float(v) != float(x):
        raise AssertionError(f"{x!r} is not exactly representable in f32")
    return int(np.array([v], dtype=np.float32).view(np.uint32)[0])


def ulp_neighbours(b):
    """b, and the f32 one ulp above and below b (magnitudes, b a positive finite bit pattern)."""
    out = [b]
    if b < 0x7F7FFFFF:
        out.append(b + 1)
    if b > 0:
        out.append(b - 1)
    return out


def with_signs(bits_list):
    out = []
    for b in bits_list:
        out.append(b & 0x7FFFFFFF)
        out.append((b & 0x7FFFFFFF) | 0x80000000)
    return out


def rand_f32_any(rng):
    """Uniform over (sign, biased exponent 0..255, mantissa): spreads over all exponents."""
    return (rng.getrandbits(1) << 31) | (rng.getrandbits(8) << 23) | rng.getrandbits(23)


def rand_f32_exp(rng, lo, hi):
    """Random sign and mantissa, unbiased exponent uniform in [lo, hi] (normal f32 exponents)."""
    e = lo + rng.randrange(hi - lo + 1)
    return (rng.getrandbits(1) << 31) | ((e + 127) << 23) | rng.getrandbits(23)


def f32_edge_cases():
    """Specials common to every encoder."""
    mags = [
        0x00000000,  # 0
        0x00000001, 0x00000002, 0x00000003,  # smallest subnormals
        0x00200000, 0x00400000, 0x00400001, 0x005FFFFF,
        0x007FFFFE, 0x007FFFFF,  # largest subnormals
        0x00800000, 0x00800001,  # smallest normals
        0x3F800000, 0x3F800001, 0x3F7FFFFF,  # 1 and neighbours
        0x7F7FFFFE, 0x7F7FFFFF,  # largest finite
        0x7F000000, 0x7E800000,
        F32_INF,
        # NaNs: quiet, signalling, various payloads
        0x7F800001, 0x7F800002, 0x7F801FFF, 0x7F802000, 0x7F803FFF, 0x7F804000,
        0x7F810000, 0x7F8FFFFF, 0x7F900000, 0x7FA00000, 0x7FBFFFFF,
        0x7FC00000, 0x7FC00001, 0x7FC0FFFF, 0x7FC10000, 0x7FD55555, 0x7FE00000, 0x7FFFE000, 0x7FFFFFFF,
    ]
    return with_signs(mags)


# ---- minifloat description --------------------------------------------------------------------------
class Minifloat:
    """Sign-magnitude binary format with `mant` mantissa bits and exponent `bias` (subnormals at E=0)."""

    def __init__(self, mant, bias, max_code):
        self.mant, self.bias, self.max_code = mant, bias, max_code

    def value(self, code):
        """Exact value of a non-negative finite code, as a Python float (float64, exact)."""
        e, m = code >> self.mant, code & ((1 << self.mant) - 1)
        if e == 0:
            return math.ldexp(m, 1 - self.bias - self.mant)
        return math.ldexp((1 << self.mant) | m, e - self.bias - self.mant)

    def ulp(self, code):
        e = code >> self.mant
        return math.ldexp(1.0, max(e, 1) - self.bias - self.mant)

    def midpoint_bits(self, code):
        """f32 bits of the exact midpoint between code and the next code up (or the virtual code past
        the largest finite value: that midpoint is the overflow / saturation boundary)."""
        return bits_of(self.value(code) + self.ulp(code) / 2)

    def rounding_cases(self, codes, value_neighbours=True):
        """For each code: the value, the tie above it, and one f32 ulp either side of the tie (and of the
        value when value_neighbours)."""
        out = []
        for c in codes:
            v = bits_of(self.value(c))
            out += ulp_neighbours(v) if value_neighbours else [v]
            out += ulp_neighbours(self.midpoint_bits(c))
        return out

    def random_ties(self, rng, n, max_e):
        """Random exact midpoints: random code below max_code, tie above it, bits returned as f32."""
        out = []
        for _ in range(n):
            c = rng.randrange(min(self.max_code, (max_e + 1) << self.mant))
            out.append(self.midpoint_bits(c))
        return out


BF16 = Minifloat(7, 127, 0x7F7F)
F16 = Minifloat(10, 15, 0x7BFF)
E4M3 = Minifloat(3, 7, 0x7E)
E2M1 = Minifloat(1, 1, 0x7)


# ---- oracles ----------------------------------------------------------------------------------------
def as_f32(bits_list):
    return np.array(bits_list, dtype=np.uint32).view(np.float32)


def oracle_bf16(bits_list):
    return [int(v) for v in as_f32(bits_list).astype(ml_dtypes.bfloat16).view(np.uint16)]


def oracle_f16(bits_list):
    return [int(v) for v in as_f32(bits_list).astype(np.float16).view(np.uint16)]


def oracle_e4m3(bits_list):
    x = np.clip(as_f32(bits_list), np.float32(-448.0), np.float32(448.0))
    return [int(v) for v in x.astype(ml_dtypes.float8_e4m3fn).view(np.uint8)]


def oracle_e2m1(bits_list):
    return [int(v) for v in as_f32(bits_list).astype(ml_dtypes.float4_e2m1fn).view(np.uint8)]


def oracle_e8m0_ceil(b):
    """Code of the smallest power of two >= x, computed with math.frexp on the exact value.
    x in (0, 2^-127] -> 0 (the smallest scale); x > 2^127 -> 0xFF. Non-positive, inf, NaN -> 0xFF
    (the documented convention: no valid scale)."""
    x = float(f32(b))
    if not (x > 0.0) or math.isinf(x):
        return 0xFF
    m, e = math.frexp(x)  # x = m * 2^e, 0.5 <= m < 1
    k = e - 1 if m == 0.5 else e  # smallest k with 2^k >= x
    if k <= -127:
        return 0
    if k > 127:
        return 0xFF
    return k + 127


def decode_array(codes, dtype, store):
    return [int(v) for v in np.array(codes, dtype=store).view(dtype).astype(np.float32).view(np.uint32)]


# ---- case sets --------------------------------------------------------------------------------------
def dedup(bits_list):
    seen, out = set(), []
    for b in bits_list:
        if b not in seen:
            seen.add(b)
            out.append(b)
    return out


def cases_bf16(rng):
    codes = [0]
    for e in range(255):  # every exponent field: the last mantissa (odd: tie carries), a random even one
        codes += [e << 7 | 0x7F, e << 7 | (rng.getrandbits(6) << 1)]
    codes = [c for c in codes if c <= BF16.max_code] + [BF16.max_code]
    inp = f32_edge_cases()
    inp += with_signs(BF16.rounding_cases(codes, value_neighbours=False))
    inp += [rand_f32_any(rng) for _ in range(1500)]
    inp += with_signs(BF16.random_ties(rng, 300, 254))
    return dedup(inp)


def cases_f16(rng):
    codes = []
    for e in range(31):
        mants = {0, 1, 2, 0x1FF, 0x200, 0x3FE, 0x3FF}
        mants |= {rng.getrandbits(10) for _ in range(2)}
        codes += [e << 10 | m for m in sorted(mants)]
    inp = f32_edge_cases()
    inp += with_signs(F16.rounding_cases(codes, value_neighbours=False))
    # Overflow threshold: 65504 max, 65520 is the tie with the virtual 65536 (rounds to inf).
    inp += with_signs([bits_of(65504.0), bits_of(65519.9921875), bits_of(65520.0), bits_of(65536.0),
                       bits_of(65535.0), bits_of(131072.0)])
    # Below the smallest subnormal 2^-24: 2^-25 ties to 0; 2^-26 and tiny values flush to 0.
    inp += with_signs(ulp_neighbours(bits_of(2.0**-25)) + ulp_neighbours(bits_of(2.0**-26)) +
                      ulp_neighbours(bits_of(1.5 * 2.0**-25)))
    inp += with_signs(F16.random_ties(rng, 300, 30))
    inp += [rand_f32_any(rng) for _ in range(1000)]
    inp += [rand_f32_exp(rng, -27, 17) for _ in range(1200)]
    return dedup(inp)


def cases_e4m3(rng):
    codes = list(range(E4M3.max_code + 1))  # every finite magnitude, tie above each (464 past 448)
    inp = f32_edge_cases()
    inp += with_signs(E4M3.rounding_cases(codes))
    # Saturation: 448 max, 464 (tie with the virtual 512*0.9375), 480, large, inf.
    inp += with_signs(ulp_neighbours(bits_of(448.0)) + ulp_neighbours(bits_of(464.0)) +
                      ulp_neighbours(bits_of(480.0)) + [bits_of(496.0), bits_of(512.0), bits_of(1e6)])
    # Below the smallest subnormal 2^-9.
    inp += with_signs(ulp_neighbours(bits_of(2.0**-10)) + ulp_neighbours(bits_of(2.0**-11)) +
                      ulp_neighbours(bits_of(1.5 * 2.0**-10)))
    inp += with_signs(E4M3.random_ties(rng, 150, 15))
    inp += [rand_f32_any(rng) for _ in range(1200)]
    inp += [rand_f32_exp(rng, -12, 10) for _ in range(1800)]
    return dedup(inp)


def cases_e2m1(rng):
    codes = list(range(E2M1.max_code + 1))
    inp = f32_edge_cases()
    inp += with_signs(E2M1.rounding_cases(codes))
    inp += with_signs(ulp_neighbours(bits_of(6.0)) + ulp_neighbours(bits_of(7.0)) +
                      ulp_neighbours(bits_of(8.0)) + [bits_of(12.0), bits_of(1e6)])
    inp += with_signs(ulp_neighbours(bits_of(0.25)) + ulp_neighbours(bits_of(0.125)) +
                      ulp_neighbours(bits_of(0.375)))
    inp += [rand_f32_any(rng) for _ in range(800)]
    inp += [rand_f32_exp(rng, -4, 4) for _ in range(1200)]
    return dedup(inp)


def cases_e8m0_ceil(rng):
    inp = []
    for e in range(1, 255):  # every normal exponent: 2^k, just above, just below, the top mantissa
        p = e << 23
        inp += [p, p + 1, p - 1, p | 0x400000, p | 0x7FFFFF]
    for k in range(23):  # f32 subnormal powers of two 2^-149 .. 2^-127 and their neighbours
        p = 1 << k
        inp += [p, p + 1, p - 1 if p > 1 else p]
    inp += [0x00400000, 0x00400001, 0x005FFFFF, 0x007FFFFF, 0x00800000]
    inp += [0x7F000000, 0x7F000001, 0x7F7FFFFF, 0x7EFFFFFF]  # 2^127 -> 0xFE; just above -> 0xFF
    inp += f32_edge_cases()  # zeros, negatives, inf, NaN -> 0xFF
    inp += [rand_f32_any(rng) & 0x7FFFFFFF for _ in range(600)]
    inp += [rng.getrandbits(23) for _ in range(100)]  # positive subnormals
    return dedup(inp)


# ---- writing ----------------------------------------------------------------------------------------
def header(title, fmt):
    return [
        f"# {title}",
        f"# generated by {GENERATOR} (numpy {np.__version__}, ml_dtypes {ml_dtypes.__version__}, "
        f"seed 0x{SEED:X}); do not edit",
        f"# one case per line: {fmt}",
    ]


def render(lines_header, pairs, in_digits, out_digits):
    lines = list(lines_header)
    lines.append(f"# cases: {len(pairs)}")
    lines += [f"{a:0{in_digits}x} {b:0{out_digits}x}" for a, b in pairs]
    return "\n".join(lines) + "\n"


def build():
    rng = random.Random(SEED)
    files = {}

    # -- decode --
    codes = list(range(256))
    files["dtype_decode_e4m3.txt"] = render(
        header("F8_E4M3 (e4m3fn) decode, all 256 codes (oracle: ml_dtypes.float8_e4m3fn -> float32)",
               "<e4m3 code> <f32 bits>"),
        list(zip(codes, decode_array(codes, ml_dtypes.float8_e4m3fn, np.uint8))), 2, 8)
    codes16 = list(range(16))
    files["dtype_decode_e2m1.txt"] = render(
        header("F4_E2M1 decode, all 16 codes (oracle: ml_dtypes.float4_e2m1fn -> float32)",
               "<e2m1 code> <f32 bits>"),
        list(zip(codes16, decode_array(codes16, ml_dtypes.float4_e2m1fn, np.uint8))), 1, 8)
    files["dtype_decode_e8m0.txt"] = render(
        header("F8_E8M0 decode, all 256 codes (oracle: ml_dtypes.float8_e8m0fnu -> float32; 0xFF is NaN)",
               "<e8m0 code> <f32 bits>"),
        list(zip(codes, decode_array(codes, ml_dtypes.float8_e8m0fnu, np.uint8))), 2, 8)
    # F16 / BF16 decode: every exponent field and both signs x a set of mantissas (the C++ test also
    # checks all 65536 codes against an independent formula).
    f16_codes = []
    for s in (0, 1):
        for e in range(32):
            mants = {0, 1, 2, 3, 0x155, 0x1FF, 0x200, 0x201, 0x2AA, 0x3FE, 0x3FF}
            mants |= {rng.getrandbits(10) for _ in range(13)}
            f16_codes += [s << 15 | e << 10 | m for m in sorted(mants)]
    files["dtype_decode_f16.txt"] = render(
        header("F16 decode, sampled: both signs x all 32 exponent fields x 24 mantissas "
               "(oracle: numpy.float16 -> float32)", "<f16 code> <f32 bits>"),
        list(zip(f16_codes, decode_array(f16_codes, np.float16, np.uint16))), 4, 8)
    bf16_codes = []
    for s in (0, 1):
        for e in range(256):
            mants = {0, 0x7F, rng.getrandbits(7)}
            bf16_codes += [s << 15 | e << 7 | m for m in sorted(mants)]
    files["dtype_decode_bf16.txt"] = render(
        header("BF16 decode, sampled: both signs x all 256 exponent fields x 3 mantissas "
               "(oracle: ml_dtypes.bfloat16 -> float32)", "<bf16 code> <f32 bits>"),
        list(zip(bf16_codes, decode_array(bf16_codes, ml_dtypes.bfloat16, np.uint16))), 4, 8)

    # -- encode --
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "invalid value encountered in cast" for NaN inputs
        inp = cases_bf16(rng)
        files["dtype_encode_bf16.txt"] = render(
            header("F32 -> BF16, round-to-nearest-even (oracle: ml_dtypes.bfloat16)",
                   "<f32 bits> <bf16 bits>"), list(zip(inp, oracle_bf16(inp))), 8, 4)
        inp = cases_f16(rng)
        files["dtype_encode_f16.txt"] = render(
            header("F32 -> F16, round-to-nearest-even, overflow to inf (oracle: numpy.float16)",
                   "<f32 bits> <f16 bits>"), list(zip(inp, oracle_f16(inp))), 8, 4)
        inp = cases_e4m3(rng)
        files["dtype_encode_e4m3.txt"] = render(
            header("F32 -> F8_E4M3 saturating RNE "
                   "(oracle: ml_dtypes.float8_e4m3fn(np.clip(x, -448, 448)))",
                   "<f32 bits> <e4m3 code>"), list(zip(inp, oracle_e4m3(inp))), 8, 2)
        inp = cases_e2m1(rng)
        files["dtype_encode_e2m1.txt"] = render(
            header("F32 -> F4_E2M1 saturating RNE (oracle: ml_dtypes.float4_e2m1fn)",
                   "<f32 bits> <e2m1 code>"), list(zip(inp, oracle_e2m1(inp))), 8, 1)

    inp = cases_e8m0_ceil(rng)
    files["dtype_e8m0_ceil.txt"] = render(
        header("F32 -> F8_E8M0 ceiling scale: code of the smallest power of two >= x; x <= 2^-127 -> 0, "
               "x > 2^127 / x <= 0 / inf / NaN -> 0xFF (oracle: math.frexp, not ml_dtypes)",
               "<f32 bits> <e8m0 code>"), [(b, oracle_e8m0_ceil(b)) for b in inp], 8, 2)
    return files


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "fixtures")
    ap.add_argument("--check", action="store_true", help="compare with the existing files instead of writing")
    args = ap.parse_args()
    files = build()
    if args.check:
        bad = [n for n, t in files.items() if not (args.out / n).exists() or (args.out / n).read_text() != t]
        for n in bad:
            print(f"differs: {args.out / n}", file=sys.stderr)
        return 1 if bad else 0
    args.out.mkdir(parents=True, exist_ok=True)
    total = 0
    for name, text in sorted(files.items()):
        (args.out / name).write_text(text)
        n = sum(1 for line in text.splitlines() if line and not line.startswith("#"))
        total += n
        print(f"{args.out / name}: {n} cases, {len(text)} bytes")
    print(f"total: {total} cases")
    return 0


if __name__ == "__main__":
    sys.exit(main())

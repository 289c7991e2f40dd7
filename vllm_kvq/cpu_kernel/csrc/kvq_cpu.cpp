// KVQ's CPU kernels: store into and attend directly from packed KV blocks.
//
// The torch reference (vllm_kvq/paged_attention.py and vllm_kvq/formats/) defines what these
// compute; tests compare the two (stored bytes exactly, attention within a derived bound).
//
// Fields (one of a slot's key or value bytes), as ``fmt`` int lists from Python:
//   [kind, bits, group, offset, rotate]   kind 0 = the model's 16-bit values,
//                                         kind 1 = per-token integer codes in channel groups
//   int layout: [codes: D*bits/8 | fp16 scale x D/group | fp16 min x D/group], codes packed
//   little-endian (1/2/4/8 bits) or as planes (3 bits: the low 2 bits, then the high bit).
//   rotate: stored as R x with R = H diag(s) / sqrt(D) (Sylvester Hadamard H, signs s).
// A layer's KV heads may store different formats (head groups, vllm_kvq/formats/head_layout.py):
// every op takes the layer's whole page and a list of groups (``GroupSpec``), so a layer is
// one store and one attention call whatever its groups.
//
// Attention never dequantizes a cache copy: each 16-token tile of packed keys is unpacked
// into registers-sized scratch (codes as floats, transposed so a tile is one vector lane
// per token) and shared by every query row of the KV head's GQA group; scores use
//   <q, scale*c + min> = scale * <q, c> + min * sum(q)      (per channel group),
// values accumulate scale-weighted codes and the mins per group; one online softmax per row.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#ifdef __AVX512F__
#include <immintrin.h>
#endif
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define KVQ_INT_DOTS 1  // integer key dots: vpdpbusd on the codes, the query in int8
#endif
#if defined(KVQ_INT_DOTS) && defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#define KVQ_AMX 1  // prompt chunks' tile products on AMX-BF16 (Sapphire Rapids and later)
#endif

namespace kvq {

constexpr int TILE = 16;         // keys per tile: bs is a multiple of 16, so one block
constexpr int MAX_ROWS = 64;     // query rows per work item (tokens x GQA group)
constexpr int MAX_HEAD = 256;
constexpr float NEG_INF = -std::numeric_limits<float>::infinity();

enum Kind { RAW = 0, INT = 1 };

// 16 floats, one per token of a tile: GCC lowers it to one AVX-512 register, two AVX2 or four
// NEON registers, so the hot loops are explicit vector code on every target.
typedef float v16 __attribute__((vector_size(64)));
inline v16 load_v16(const float* p) {
  v16 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void store_v16(float* p, v16 v) { std::memcpy(p, &v, sizeof(v)); }
typedef int32_t v16i __attribute__((vector_size(64)));
#if defined(__GNUC__) && !defined(__clang__)
#define KVQ_SHUFFLES 1  // GCC's __builtin_shuffle (clang spells it differently)
#endif

// Horizontal max and sum of 16 lanes: shuffle trees on AVX-512, a scalar loop elsewhere.
inline float hmax16(v16 v) {
#ifdef KVQ_INT_DOTS
  return _mm512_reduce_max_ps(__m512(v));
#else
  float m = v[0];
  for (int t = 1; t < 16; ++t) m = std::max(m, v[t]);
  return m;
#endif
}

inline float hsum16(v16 v) {
#ifdef KVQ_INT_DOTS
  return _mm512_reduce_add_ps(__m512(v));
#else
  float total = 0.0f;
  for (int t = 0; t < 16; ++t) total += v[t];
  return total;
#endif
}

struct Field {
  int kind, bits, group, offset, rotate;
  int head;  // D
  int groups() const { return kind == RAW ? 1 : head / group; }
  int code_bytes() const { return head * bits / 8; }
};

Field parse_field(const std::vector<int64_t>& f, int head) {
  TORCH_CHECK(f.size() == 5, "kvq_cpu: a field is [kind, bits, group, offset, rotate]");
  Field out{int(f[0]), int(f[1]), int(f[2]), int(f[3]), int(f[4]), head};
  TORCH_CHECK(out.kind == RAW || out.kind == INT, "kvq_cpu: unknown field kind ", out.kind);
  if (out.kind == INT) {
    TORCH_CHECK(out.bits == 1 || out.bits == 2 || out.bits == 3 || out.bits == 4 ||
                    out.bits == 8,
                "kvq_cpu: unsupported bit width ", out.bits);
    TORCH_CHECK(out.group >= 8 && head % out.group == 0, "kvq_cpu: bad group ", out.group);
  }
  TORCH_CHECK(!out.rotate || (head & (head - 1)) == 0, "kvq_cpu: rotation needs 2^k heads");
  return out;
}

// Reductions over n floats in 16 lanes (the compiler may not reorder a float sum, or a
// chain of maxima, by itself; a serial chain waits on its own latency every element).
inline float dot_f32(const float* a, const float* b, int n) {
  v16 lanes = v16{0};
  int i = 0;
  for (; i + 16 <= n; i += 16) lanes += load_v16(a + i) * load_v16(b + i);
  float s = hsum16(lanes);
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

#ifdef KVQ_SHUFFLES
// Lane t of the result = the sum of the 16 lanes of a[t]: four levels of two-source shuffles
// (30 shuffles, 15 adds) instead of a horizontal sum per vector (16 trees of 8).
inline v16 transpose_sums(const v16* a) {
  v16 b[8], c[4], e[2];
  for (int i = 0; i < 8; ++i)
    b[i] = __builtin_shuffle(a[2 * i], a[2 * i + 1],
                             v16i{0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23}) +
           __builtin_shuffle(a[2 * i], a[2 * i + 1],
                             v16i{8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31});
  for (int i = 0; i < 4; ++i)
    c[i] = __builtin_shuffle(b[2 * i], b[2 * i + 1],
                             v16i{0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27}) +
           __builtin_shuffle(b[2 * i], b[2 * i + 1],
                             v16i{4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31});
  for (int i = 0; i < 2; ++i)
    e[i] = __builtin_shuffle(c[2 * i], c[2 * i + 1],
                             v16i{0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29}) +
           __builtin_shuffle(c[2 * i], c[2 * i + 1],
                             v16i{2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31});
  return __builtin_shuffle(e[0], e[1],
                           v16i{0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30}) +
         __builtin_shuffle(e[0], e[1],
                           v16i{1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31});
}
#endif

inline float sum_f32(const float* a, int n) {
  v16 lanes = v16{0};
  int i = 0;
  for (; i + 16 <= n; i += 16) lanes += load_v16(a + i);
  float s = hsum16(lanes);
  for (; i < n; ++i) s += a[i];
  return s;
}

inline float abs_max(const float* a, int n) {
  v16 lanes = v16{0};
  int i = 0;
  for (; i + 16 <= n; i += 16) {
    const v16 v = load_v16(a + i), m = v < 0 ? -v : v;
    lanes = m > lanes ? m : lanes;
  }
  float s = hmax16(lanes);
  for (; i < n; ++i) s = std::max(s, std::fabs(a[i]));
  return s;
}

// -- 16-bit values ---------------------------------------------------------------------------
template <typename T16>
inline void load16(const void* src, int n, float* dst) {
  const T16* p = static_cast<const T16*>(src);
  int i = 0;
#ifdef __AVX512F__
  for (; i + 16 <= n; i += 16) {  // exact conversions, 16 lanes at a time
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i));
    if constexpr (std::is_same_v<T16, c10::BFloat16>) {
      const __m512i bits = _mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16);
      _mm512_storeu_ps(dst + i, _mm512_castsi512_ps(bits));
    } else {
      _mm512_storeu_ps(dst + i, _mm512_cvtph_ps(h));
    }
  }
#endif
  for (; i < n; ++i) dst[i] = static_cast<float>(p[i]);
}

inline float half_at(const uint8_t* p, int i) {
  return static_cast<float>(reinterpret_cast<const c10::Half*>(p)[i]);
}

// -- codes -----------------------------------------------------------------------------------
// Codes to floats through per-byte tables: one byte -> its 8 / BITS codes as floats, one
// small copy per byte instead of a shift and mask per code.
template <int BITS>
struct CodeTable {
  static constexpr int PER = 8 / BITS;
  float codes[256][PER];
  explicit CodeTable(float unit) {
    for (int b = 0; b < 256; ++b)
      for (int k = 0; k < PER; ++k) codes[b][k] = unit * float((b >> (k * BITS)) & ((1 << BITS) - 1));
  }
};

template <int BITS>
inline void unpack_whole(const uint8_t* src, int n, float* dst) {
  static const CodeTable<BITS> table(1.0f);
  constexpr int PER = 8 / BITS;
  for (int j = 0; j < n / PER; ++j) std::memcpy(dst + j * PER, table.codes[src[j]], sizeof(float) * PER);
}

inline void unpack3(const uint8_t* src, int n, float* dst) {  // low plane + 4 x high plane
  static const CodeTable<1> high_table(4.0f);
  float high[MAX_HEAD];
  unpack_whole<2>(src, n, dst);
  for (int j = 0; j < n / 8; ++j) std::memcpy(high + 8 * j, high_table.codes[src[n / 4 + j]], 32);
  for (int i = 0; i < n; ++i) dst[i] += high[i];
}

inline void unpack_codes(const uint8_t* src, int bits, int n, float* dst) {
  switch (bits) {
    case 1: unpack_whole<1>(src, n, dst); break;
    case 2: unpack_whole<2>(src, n, dst); break;
    case 3: unpack3(src, n, dst); break;
    case 4: unpack_whole<4>(src, n, dst); break;
    default: for (int i = 0; i < n; ++i) dst[i] = float(src[i]);
  }
}

// -- codes as vectors ------------------------------------------------------------------------
// Codes of 1/2/4/8 bits never straddle a 32-bit word (little-endian packing), so code i of a
// word is (word >> i * bits) & mask: a shift, a mask and a conversion per 16 codes, where the
// tables above cost a copy per byte.
typedef uint32_t v16u __attribute__((vector_size(64)));

inline uint32_t load_u32(const uint8_t* p) {
  uint32_t x;
  std::memcpy(&x, p, 4);
  return x;
}

inline v16 codes_to_floats(v16u words, v16u shifts, uint32_t mask) {
  return __builtin_convertvector((words >> shifts) & mask, v16);
}

// 16 consecutive codes starting at code c0 (a multiple of 16) of one token, as floats.
template <int BITS>
inline v16 code_run(const uint8_t* src, int c0) {
  constexpr uint32_t mask = (1u << BITS) - 1;
  if constexpr (BITS == 8) {
    typedef uint8_t v16b __attribute__((vector_size(16)));
    v16b b;
    std::memcpy(&b, src + c0, 16);
    return __builtin_convertvector(b, v16);
  } else if constexpr (BITS == 4) {  // two words, eight codes each
    const uint32_t a = load_u32(src + c0 / 2), b = load_u32(src + c0 / 2 + 4);
    const v16u words = {a, a, a, a, a, a, a, a, b, b, b, b, b, b, b, b};
    const v16u shifts = {0, 4, 8, 12, 16, 20, 24, 28, 0, 4, 8, 12, 16, 20, 24, 28};
    return codes_to_floats(words, shifts, mask);
  } else if constexpr (BITS == 2) {  // one word
    const uint32_t a = load_u32(src + c0 / 4);
    const v16u words = {a, a, a, a, a, a, a, a, a, a, a, a, a, a, a, a};
    const v16u shifts = {0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30};
    return codes_to_floats(words, shifts, mask);
  } else {  // 1 bit: half a word
    uint16_t h;
    std::memcpy(&h, src + c0 / 8, 2);
    const uint32_t a = h;
    const v16u words = {a, a, a, a, a, a, a, a, a, a, a, a, a, a, a, a};
    const v16u shifts = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
    return codes_to_floats(words, shifts, mask);
  }
}

template <int BITS>
inline void unpack_row(const uint8_t* src, int n, float* dst) {
  for (int c0 = 0; c0 < n; c0 += 16) store_v16(dst + c0, code_run<BITS>(src, c0));
}

// A token's n codes as floats (n a multiple of 16 here; 3 bits: low plane + 4 x high plane).
// (always inlined: a call per token cost more than the unpack at head size 64)
__attribute__((always_inline)) inline void unpack_row_codes(const uint8_t* src, int bits, int n,
                                                            float* dst) {
  switch (bits) {
    case 1: unpack_row<1>(src, n, dst); break;
    case 2: unpack_row<2>(src, n, dst); break;
    case 3:
      for (int c0 = 0; c0 < n; c0 += 16)
        store_v16(dst + c0, code_run<2>(src, c0) + 4.0f * code_run<1>(src + n / 4, c0));
      break;
    case 4: unpack_row<4>(src, n, dst); break;
    default: unpack_row<8>(src, n, dst);
  }
}

// The codes of a tile's tokens, transposed: dst[c][t] = code c of token t (0 for t >= n).
// One 32-bit word of every token is read into the 16 lanes, then each of its codes is one
// shift, mask and conversion for all 16 tokens (no scalar transpose). ``add``: dst += unit *
// codes (the high plane of 3-bit codes).
template <int BITS>
inline void transpose_codes(const uint8_t* p0, int64_t stride, int n, int code_bytes,
                            float unit, bool add, float (*dst)[TILE]) {
  constexpr int PER = 32 / BITS;
  constexpr uint32_t mask = (1u << BITS) - 1;
  for (int w = 0; w < code_bytes / 4; ++w) {
    // one word of every token (scalar loads: AVX-512 gathers measured slower on Zen 4)
    v16u words = {0};
    for (int t = 0; t < n; ++t) words[t] = load_u32(p0 + t * stride + 4 * w);
    for (int k = 0; k < PER; ++k) {
      const v16 c = __builtin_convertvector((words >> uint32_t(k * BITS)) & mask, v16);
      float* row = dst[w * PER + k];
      store_v16(row, add ? load_v16(row) + unit * c : c);
    }
  }
}

// Whether the vector paths cover a field of n channels (whole words per token for keys,
// runs of 16 codes for values); other shapes use the tables.
inline bool vector_codes(int bits, int n) {
  const int plane_bytes = bits == 3 ? n / 8 : n * bits / 8;  // the smallest plane
  return n % 16 == 0 && plane_bytes % 4 == 0;
}

inline void transpose_field_codes(const uint8_t* p0, int64_t stride, int n, int bits, int d,
                                  float (*dst)[TILE]) {
  switch (bits) {
    case 1: transpose_codes<1>(p0, stride, n, d / 8, 1.0f, false, dst); break;
    case 2: transpose_codes<2>(p0, stride, n, d / 4, 1.0f, false, dst); break;
    case 3:
      transpose_codes<2>(p0, stride, n, d / 4, 1.0f, false, dst);
      transpose_codes<1>(p0 + d / 4, stride, n, d / 8, 4.0f, true, dst);
      break;
    case 4: transpose_codes<4>(p0, stride, n, d / 2, 1.0f, false, dst); break;
    default: transpose_codes<8>(p0, stride, n, d, 1.0f, false, dst);
  }
}

inline void pack_codes(const uint8_t* codes, int bits, int n, uint8_t* dst) {
  if (bits == 8) {
    std::memcpy(dst, codes, n);
    return;
  }
  if (bits == 3) {  // planes: low two bits, then the high bit
    uint8_t low[MAX_HEAD], high[MAX_HEAD];
    for (int i = 0; i < n; ++i) low[i] = codes[i] & 3, high[i] = codes[i] >> 2;
    pack_codes(low, 2, n, dst);
    pack_codes(high, 1, n, dst + n / 4);
    return;
  }
  const int per = 8 / bits;
#ifdef KVQ_INT_DOTS
  if (n % 64 == 0) {  // 64 codes at a time: each lane's codes shifted into its low byte
    for (int j = 0; j < n; j += 64) {
      const __m512i c = _mm512_loadu_si512(codes + j);
      if (bits == 1) {  // bit k of byte i: code 8i + k
        const uint64_t packed = _mm512_test_epi8_mask(c, c);
        std::memcpy(dst + j / 8, &packed, 8);
      } else if (bits == 2) {  // 4 codes per 32-bit lane
        const __m512i t = _mm512_or_si512(
            _mm512_or_si512(c, _mm512_srli_epi32(c, 6)),
            _mm512_or_si512(_mm512_srli_epi32(c, 12), _mm512_srli_epi32(c, 18)));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + j / 4), _mm512_cvtepi32_epi8(t));
      } else {  // 4 bits: 2 codes per 16-bit lane
        const __m512i t = _mm512_or_si512(c, _mm512_srli_epi16(c, 4));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + j / 2), _mm512_cvtepi16_epi8(t));
      }
    }
    return;
  }
#endif
  for (int j = 0; j < n / per; ++j) {
    int b = 0;
    for (int k = 0; k < per; ++k) b |= codes[j * per + k] << (k * bits);
    dst[j] = uint8_t(b);
  }
}

// -- rotation: R x = H (s * x) / sqrt(D), the in-place Sylvester-order Walsh-Hadamard ---------
// The torch reference (formats/int_group.hadamard_transform) runs the same butterflies in the
// same order in fp32, so stored bytes are identical.
// Vectorized for n >= 16: the stages h = 1..8 inside each run of 16 floats as
// x * sign_h + x[i ^ h] (sign_h = -1 where bit h of the lane is set: exactly a + b and a - b,
// so the bytes stay identical), the wider stages on whole vectors.
inline void hadamard(float* x, int n) {
  int h = 1;
#ifdef KVQ_SHUFFLES
  if (n >= 16) {
    for (int i = 0; i < n; i += 16) {
      v16 v = load_v16(x + i);
      for (int hs = 1; hs < 16; hs *= 2) {
        v16i partner, lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
        partner = lane ^ hs;
        const v16 sign = (lane & hs) ? v16{0} - 1.0f : v16{0} + 1.0f;
        v = v * sign + __builtin_shuffle(v, partner);
      }
      store_v16(x + i, v);
    }
    for (h = 16; h < n; h *= 2)
      for (int i = 0; i < n; i += 2 * h)
        for (int j = i; j < i + h; j += 16) {
          const v16 a = load_v16(x + j), b = load_v16(x + j + h);
          store_v16(x + j, a + b);
          store_v16(x + j + h, a - b);
        }
    return;
  }
#endif
  for (; h < n; h *= 2)
    for (int i = 0; i < n; i += 2 * h)
      for (int j = i; j < i + h; ++j) {
        const float a = x[j], b = x[j + h];
        x[j] = a + b;
        x[j + h] = a - b;
      }
}

inline float inv_sqrt(int n) { return float(1.0 / std::sqrt(double(n))); }

inline void rotate(float* x, const float* signs, int n) {  // x <- R x
  for (int i = 0; i < n; ++i) x[i] *= signs[i];
  hadamard(x, n);
  const float c = inv_sqrt(n);
  for (int i = 0; i < n; ++i) x[i] *= c;
}

inline void unrotate(float* x, const float* signs, int n) {  // x <- R^T x = s * H x / sqrt(D)
  hadamard(x, n);
  const float c = inv_sqrt(n);
  for (int i = 0; i < n; ++i) x[i] *= signs[i] * c;
}

// -- store -----------------------------------------------------------------------------------
template <typename T16>
void encode_field(const Field& f, const T16* src, const float* signs, uint8_t* dst) {
  const int d = f.head;
  if (f.kind == RAW) {
    std::memcpy(dst, src, 2 * d);
    return;
  }
  float x[MAX_HEAD];
  load16<T16>(src, d, x);
  if (f.rotate) rotate(x, signs, d);
  const int levels = (1 << f.bits) - 1, ng = f.groups(), cb = f.code_bytes();
  uint8_t codes[MAX_HEAD];
  c10::Half* scales = reinterpret_cast<c10::Half*>(dst + cb);
  c10::Half* mins = scales + ng;
  for (int g = 0; g < ng; ++g) {
    const float* v = x + g * f.group;
    float lo = v[0], hi = v[0];
#ifdef KVQ_INT_DOTS
    const bool lanes16 = f.group % 16 == 0 && f.bits != 1;  // (1 bit: centroids, scalar)
    if (lanes16) {
      v16 vlo = load_v16(v), vhi = vlo;
      for (int i = 16; i < f.group; i += 16) {
        const v16 y = load_v16(v + i);
        vlo = y < vlo ? y : vlo;
        vhi = y > vhi ? y : vhi;
      }
      lo = _mm512_reduce_min_ps(__m512(vlo)), hi = _mm512_reduce_max_ps(__m512(vhi));
    }
#else
    constexpr bool lanes16 = false;
#endif
    for (int i = 1; i < f.group && !lanes16; ++i) lo = std::min(lo, v[i]), hi = std::max(hi, v[i]);
    if (f.bits == 1) {  // two centroids (formats/int_group.two_level_centroids), double sums
      const float mid = (lo + hi) * 0.5f;
      double sum_lo = 0, sum_hi = 0;
      int n_up = 0;
      for (int i = 0; i < f.group; ++i) {
        if (v[i] > mid) sum_hi += v[i], ++n_up;
        else sum_lo += v[i];
      }
      const float low = float(sum_lo / double(std::max(f.group - n_up, 1)));
      hi = n_up > 0 ? float(sum_hi / double(n_up)) : low;
      lo = low;
    }
    const c10::Half scale16(static_cast<float>((hi - lo) / float(levels)));
    const c10::Half lo16(lo);
    const float s = static_cast<float>(scale16), safe = s == 0.0f ? 1.0f : s;
    const float m = static_cast<float>(lo16);
#ifdef KVQ_INT_DOTS
    // the same division and round-half-to-even as the scalar loop, 16 codes at a time
    for (int i = 0; i < f.group && lanes16; i += 16) {
      const v16 q = (load_v16(v + i) - m) / safe;
      __m512 c = _mm512_roundscale_ps(__m512(q), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      c = _mm512_min_ps(_mm512_max_ps(c, _mm512_setzero_ps()), _mm512_set1_ps(float(levels)));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(codes + g * f.group + i),
                       _mm512_cvtepi32_epi8(_mm512_cvttps_epi32(c)));
    }
#endif
    for (int i = 0; i < f.group && !lanes16; ++i) {
      const float c = std::nearbyint((v[i] - m) / safe);
      codes[g * f.group + i] = uint8_t(std::min(std::max(c, 0.0f), float(levels)));
    }
    scales[g] = scale16;
    mins[g] = lo16;
  }
  pack_codes(codes, f.bits, d, dst);
}

// -- attention -------------------------------------------------------------------------------
inline float fast_exp(float x) {
  // e^x = 2^n e^r, |r| <= ln2/2; degree-6 Taylor on r (relative error < 2e-7); 0 below -87.
  const float k = std::nearbyint(x * 1.44269504088896341f);
  const float r = x - k * 0.693145751953125f - k * 1.428606765330187045e-06f;
  float p = 1.0f / 720;
  p = p * r + 1.0f / 120;
  p = p * r + 1.0f / 24;
  p = p * r + 1.0f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t e = (int32_t(std::max(k, -126.0f)) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &e, 4);
  return x < -87.0f ? 0.0f : p * two_n;
}

// fast_exp of 16 lanes: the same polynomial; k rounded by the 1.5 * 2^23 trick (ties to even,
// as nearbyint), lanes below -87 (masked scores: -inf) give 0.
inline v16 fast_exp_v16(v16 x) {
  const v16i dead = x < -87.0f;
  x = dead ? -87.0f : x;  // every lane finite from here on
  const float magic = 12582912.0f;
  const v16 k = (x * 1.44269504088896341f + magic) - magic;
  const v16 r = x - k * 0.693145751953125f - k * 1.428606765330187045e-06f;
  v16 p = r * (1.0f / 720) + 1.0f / 120;
  p = p * r + 1.0f / 24;
  p = p * r + 1.0f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
#ifdef __AVX512F__
  // p * 2^k in one instruction (VSCALEFPS: exact, as the product below, for k >= -126)
  const v16 scaled = (v16)_mm512_scalef_ps((__m512)p, (__m512)k);
  return dead ? 0.0f : scaled;
#else
  const v16i e = (__builtin_convertvector(k < -126.0f ? -126.0f : k, v16i) + 127) << 23;
  v16 two_n;
  std::memcpy(&two_n, &e, sizeof(two_n));
  return dead ? 0.0f : p * two_n;
#endif
}

#ifdef KVQ_INT_DOTS
// Words w..w+3 of 16 tokens from 16-byte chunks: z_j holds tokens j, j+4, j+8, j+12 in its
// 128-bit lanes; a 4x4 transpose inside each lane leaves word w of token t in dword t.
inline void transpose_chunk(const uint8_t* p0, int64_t stride, __m512i* words) {
  __m512i z[4];
  for (int j = 0; j < 4; ++j) {
    __m512i v = _mm512_castsi128_si512(_mm_loadu_si128((const __m128i*)(p0 + j * stride)));
    v = _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i*)(p0 + (j + 4) * stride)), 1);
    v = _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i*)(p0 + (j + 8) * stride)), 2);
    z[j] = _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i*)(p0 + (j + 12) * stride)), 3);
  }
  const __m512i t0 = _mm512_unpacklo_epi32(z[0], z[1]), t1 = _mm512_unpackhi_epi32(z[0], z[1]);
  const __m512i t2 = _mm512_unpacklo_epi32(z[2], z[3]), t3 = _mm512_unpackhi_epi32(z[2], z[3]);
  words[0] = _mm512_unpacklo_epi64(t0, t2);
  words[1] = _mm512_unpackhi_epi64(t0, t2);
  words[2] = _mm512_unpacklo_epi64(t1, t3);
  words[3] = _mm512_unpackhi_epi64(t1, t3);
}

// A field's per-group scales and mins for a tile, one lane per token (0 outside [lo, n)), from
// one 16-byte chunk of every slot, transposed: their 4 * groups bytes must fit in it (groups
// <= 4). The chunk ends at the slot's end at the latest, so it never leaves the slot.
inline bool vector_scales(const Field& f, int slot_bytes) {
  return f.kind == INT && f.groups() <= 4 && slot_bytes >= 16;
}

inline void load_scales_vec(const Field& f, const uint8_t* slot0, int64_t stride, int slot_bytes,
                            int lo, int n, float (*scale)[TILE], float (*min)[TILE]) {
  const int at = f.offset + f.code_bytes(), start = std::min(at, slot_bytes - 16);
  __m512i words[4];
  transpose_chunk(slot0 + start, stride, words);
  const __mmask16 live = __mmask16(((1u << n) - 1) & ~((1u << lo) - 1));
  auto half_lanes = [&](int i) {  // the chunk's fp16 number i of every token, as floats
    const __m512i w = i % 2 ? _mm512_srli_epi32(words[i / 2], 16) : words[i / 2];
    return _mm512_maskz_mov_ps(live, _mm512_cvtph_ps(_mm512_cvtepi32_epi16(w)));
  };
  const int first = (at - start) / 2, ng = f.groups();
  for (int g = 0; g < ng; ++g) {
    _mm512_storeu_ps(scale[g], half_lanes(first + g));
    _mm512_storeu_ps(min[g], half_lanes(first + ng + g));
  }
}
#endif

// One KV head's tile of packed keys, transposed: codes[d][t], per-group scale/min[g][t].
struct KeyTile {
  float codes[MAX_HEAD][TILE];
  float scale[MAX_HEAD / 8][TILE];
  float min[MAX_HEAD / 8][TILE];
};

// A tile of packed values: codes token-major codes[t][d], scale/min[g][t] (one vector lane per
// token, like the softmax weights they multiply).
struct ValueTile {
  float codes[TILE][MAX_HEAD];
  float scale[MAX_HEAD / 8][TILE];
  float min[MAX_HEAD / 8][TILE];
};

// Per-group scales and mins of a tile's keys, one lane per token (0 past the context).
inline void load_key_scales(const Field& f, const uint8_t* slot0, int64_t slot_stride,
                            int slot_bytes, int n, KeyTile& k) {
#ifdef KVQ_INT_DOTS
  if (vector_scales(f, slot_bytes))
    return load_scales_vec(f, slot0, slot_stride, slot_bytes, 0, n, k.scale, k.min);
#else
  (void)slot_bytes;
#endif
  const int ng = f.groups(), cb = f.code_bytes();
  for (int t = 0; t < TILE; ++t) {
    const uint8_t* p = slot0 + t * slot_stride + f.offset + cb;
    for (int g = 0; g < ng; ++g) {
      k.scale[g][t] = t < n ? half_at(p, g) : 0.0f;
      k.min[g][t] = t < n ? half_at(p, ng + g) : 0.0f;
    }
  }
}

template <typename T16, int DC>
void load_key_tile(const Field& f, const uint8_t* slot0, int64_t slot_stride, int slot_bytes,
                   int n, KeyTile& k) {
  const int d = DC ? DC : f.head, ng = f.groups(), cb = f.code_bytes();
  if (f.kind == INT && vector_codes(f.bits, d)) {
    transpose_field_codes(slot0 + f.offset, slot_stride, n, f.bits, d, k.codes);
    load_key_scales(f, slot0, slot_stride, slot_bytes, n, k);
    return;
  }
  float rows[TILE][DC ? DC : MAX_HEAD];
  for (int t = 0; t < TILE; ++t) {
    const uint8_t* p = slot0 + t * slot_stride + f.offset;
    if (t >= n) {
      std::fill(rows[t], rows[t] + d, 0.0f);
      for (int g = 0; g < ng; ++g) k.scale[g][t] = 0.0f, k.min[g][t] = 0.0f;
    } else if (f.kind == RAW) {
      load16<T16>(p, d, rows[t]);
      k.scale[0][t] = 1.0f;
      k.min[0][t] = 0.0f;
    } else {
      unpack_codes(p, f.bits, d, rows[t]);
      for (int g = 0; g < ng; ++g) k.scale[g][t] = half_at(p + cb, g),
                                   k.min[g][t] = half_at(p + cb, ng + g);
    }
  }
  for (int i = 0; i < d; ++i)  // transpose: one vector lane per token
    for (int t = 0; t < TILE; ++t) k.codes[i][t] = rows[t][i];
}

// Tokens [lo, n) of the tile are read; the others are zeroed (masked: weight 0, and 0 * 0,
// never 0 * junk: slots past the context are unwritten, those before lo may be freed).
template <typename T16>
void load_value_tile(const Field& f, const uint8_t* slot0, int64_t slot_stride, int slot_bytes,
                     int lo, int n, ValueTile& v) {
  const int d = f.head, ng = f.groups(), cb = f.code_bytes();
#ifdef KVQ_INT_DOTS
  const bool fast_scales = vector_scales(f, slot_bytes);
  if (fast_scales) load_scales_vec(f, slot0, slot_stride, slot_bytes, lo, n, v.scale, v.min);
#else
  const bool fast_scales = false;
  (void)slot_bytes;
#endif
  for (int t = 0; t < TILE; ++t) {
    if (t >= lo && t < n) continue;
    std::fill(v.codes[t], v.codes[t] + d, 0.0f);
    if (fast_scales) continue;
    for (int g = 0; g < ng; ++g) v.scale[g][t] = 0.0f, v.min[g][t] = 0.0f;
  }
  for (int t = lo; t < n; ++t) {
    const uint8_t* p = slot0 + t * slot_stride + f.offset;
    if (f.kind == RAW) {
      load16<T16>(p, d, v.codes[t]);
      v.scale[0][t] = 1.0f;
      v.min[0][t] = 0.0f;
    } else {
      if (vector_codes(f.bits, d)) unpack_row_codes(p, f.bits, d, v.codes[t]);
      else unpack_codes(p, f.bits, d, v.codes[t]);
      if (fast_scales) continue;
      for (int g = 0; g < ng; ++g) v.scale[g][t] = half_at(p + cb, g),
                                   v.min[g][t] = half_at(p + cb, ng + g);
    }
  }
}

// Running softmax state of M rows: max, sum, acc[M][D] (+ per-group value mins).
struct RowState {
  float* max;   // [M]
  float* sum;   // [M]
  float* acc;   // [M][D]  packed values (codec domain)
  float* mins;  // [M][NG] sum of p * min per value group
};

// Fold the scores of `tiles` tiles of one row (s + k * stride, TILE each; scaled, -inf where
// masked) into its state: one online-softmax step. Returns the probabilities in place (0 where
// masked) and the factor the old accumulators are scaled by; false if nothing is visible.
inline bool softmax_step(float* s, int stride, int tiles, float& max, float& sum,
                         float& alpha) {
  v16 top = load_v16(s);
  for (int k = 1; k < tiles; ++k) {
    const v16 x = load_v16(s + k * stride);
    top = x > top ? x : top;
  }
  const float tile_max = hmax16(top);
  if (tile_max == NEG_INF) return false;
  const float new_max = std::max(max, tile_max);
  alpha = max == NEG_INF ? 0.0f : fast_exp(max - new_max);
  v16 total = v16{0};
  for (int k = 0; k < tiles; ++k) {
    const v16 p = fast_exp_v16(load_v16(s + k * stride) - new_max);  // -inf (masked) -> 0
    store_v16(s + k * stride, p);
    total += p;
  }
  sum = sum * alpha + hsum16(total);
  max = new_max;
  return true;
}

// One head group of a layer (its KV heads store one format): every pointer below is already
// offset to the group's first head, so head h of an item is the group's h-th.
struct Problem {
  // shapes
  int64_t requests, heads, group, d;
  // inputs
  const void* query;    // [T, Hq, D] fp32 or the K/V dtype (model space: rotated here for
  bool query_f32;       // rotated keys), element strides q_t (token) and q_h (query head)
  int64_t q_t, q_h;
  const uint8_t* cache;          // the group's region of block 0
  int64_t c_blk, c_head, c_slot, block_size;
  int slot_bytes;                // a slot's own bytes (its fields; c_slot may be larger)
  const int32_t* block_table;
  int64_t bt_stride;
  const int32_t* context_lens;   // [R] packed tokens before the window
  const int32_t* query_start;    // [R + 1]
  const int32_t* row_limits;     // [T] or null: packed keys before this position
  const int32_t* first_keys;     // [T] or null: each token's first visible key (a sliding
                                 // window); blocks wholly before it may hold anything
  const void* fresh_k;           // [T, H, D] model dtype
  const void* fresh_v;
  int64_t fk_t, fk_h, fv_t, fv_h;
  const void* ring_k;            // [S, W, H, D] model dtype, or null
  const void* ring_v;
  int64_t ring_size, r_slot, r_pos, r_head;
  const int32_t* window_slots;   // [R]
  const int32_t* window_exact;   // [R]
  Field kf, vf;
  const float* ksigns;           // [H, D] rotation signs of the keys, or null
  const float* vsigns;           // [H, D] of the values, or null
  float scale;
  void* out;                     // [T, Hq, D] fp32 or the K/V dtype, strides o_t and o_h
  bool out_f32;
  int64_t o_t, o_h;
  int amx_parts;                 // bf16 parts of the AMX path's operands ("prompt chunks on AMX")
};

// The query row of `token` and query head `qh` (of the group) as floats.
template <typename T16>
inline void query_row(const Problem& P, int64_t token, int64_t qh, float* dst) {
  const int64_t at = token * P.q_t + qh * P.q_h;
  if (P.query_f32)
    std::memcpy(dst, static_cast<const float*>(P.query) + at, P.d * sizeof(float));
  else
    load16<T16>(static_cast<const T16*>(P.query) + at, int(P.d), dst);
}

#ifdef __AVX512F__
// x * inv rounded to the output's dtype in 16 lanes, to nearest even as T16(float) rounds
// (VCVTNEPS2BF16 reads subnormal inputs, below 1.2e-38, as zero).
inline void store_rounded(v16 x, float inv, c10::Half* dst) {
  const __m512 v = __m512(x * inv);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst),
                      _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
inline void store_rounded(v16 x, float inv, c10::BFloat16* dst) {
  x *= inv;
#ifdef __AVX512BF16__
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), (__m256i)_mm512_cvtneps_pbh(__m512(x)));
#else
  for (int i = 0; i < 16; ++i) dst[i] = c10::BFloat16(x[i]);
#endif
}
#endif

// Write (acc + exact) * inv as the output row of `token` and query head `qh`, rounded to the
// output's dtype (to nearest even, as a float32 result's .to() would).
template <typename T16>
inline void write_row(const Problem& P, int64_t token, int64_t qh, const float* acc,
                      const float* exact, float inv) {
  const int64_t at = token * P.o_t + qh * P.o_h;
  if (P.out_f32) {
    float* o = static_cast<float*>(P.out) + at;
    for (int i = 0; i < P.d; ++i) o[i] = (acc[i] + exact[i]) * inv;
  } else {
    T16* o = static_cast<T16*>(P.out) + at;
    int i = 0;
#ifdef __AVX512F__
    for (; i + 16 <= P.d; i += 16)
      store_rounded(load_v16(acc + i) + load_v16(exact + i), inv, o + i);
#endif
    for (; i < P.d; ++i) o[i] = T16((acc[i] + exact[i]) * inv);
  }
}

// A work item: rows of query tokens [t0, t1) of request r, KV head h of head group grp,
// packed keys [p0, p1).
struct Item {
  int32_t grp, r, h, t0, t1, p0, p1;
  int64_t state;  // offset of its RowState in the scratch buffer
};

inline int64_t row_limit(const Problem& P, int r, int64_t token) {
  return P.row_limits ? P.row_limits[token] : P.context_lens[r];
}

inline int64_t first_key(const Problem& P, int64_t token) {
  return P.first_keys ? P.first_keys[token] : 0;
}

// The first packed key any row of an item reads: its tile of rows starts there.
inline int64_t items_first_key(const Problem& P, int r, int t0, int t1) {
  int64_t lo = std::numeric_limits<int64_t>::max();
  for (int t = t0; t < t1; ++t) lo = std::min(lo, first_key(P, P.query_start[r] + t));
  return lo;
}

// Scores of RB rows for a tile of keys as floats (before masking): each code vector is loaded
// once and meets the RB rows' query entries (one load, RB FMAs), so the tile is read once per
// RB rows rather than per row -- a prefill item has up to 64 rows.
template <int RB>
inline void float_key_scores(const KeyTile& kt, const float (*q)[MAX_HEAD],
                             const float (*qsum)[MAX_HEAD / 8], int nkg, int kgs,
                             float (*s)[TILE]) {
  v16 acc[RB];
  for (int r = 0; r < RB; ++r) acc[r] = v16{0};
  for (int kg = 0; kg < nkg; ++kg) {
    // two independent FMA chains per row (one would wait on its own latency every channel)
    v16 d0[RB], d1[RB];
    for (int r = 0; r < RB; ++r) d0[r] = v16{0}, d1[r] = v16{0};
    for (int i = kg * kgs; i < (kg + 1) * kgs; i += 2) {
      const v16 c0 = load_v16(kt.codes[i]), c1 = load_v16(kt.codes[i + 1]);
      for (int r = 0; r < RB; ++r) d0[r] += q[r][i] * c0, d1[r] += q[r][i + 1] * c1;
    }
    const v16 sc = load_v16(kt.scale[kg]), mn = load_v16(kt.min[kg]);
    for (int r = 0; r < RB; ++r) acc[r] += sc * (d0[r] + d1[r]) + mn * qsum[r][kg];
  }
  for (int r = 0; r < RB; ++r) store_v16(s[r], acc[r]);
}

// -- integer key dots (AVX-512 VNNI) ---------------------------------------------------------
// Keys of at most 4 bits are scored without turning codes into floats: vpdpbusd multiplies 4
// codes (u8) by 4 int8 query values and adds them, in 16 token lanes at once. The query of
// each key group is written in three int8 digits (base 254) on the group's step
// (unit = max |q| / 127):
//   q ~= unit * (d0 + d1 / 254 + d2 / 254^2),  |residual| <= unit / (2 * 254^2)
// so per group
//   <q, scale*c + min> = scale * unit * (<d0, c> + <d1, c> / 254 + <d2, c> / 254^2)
//                        + scale * mid * sum(residual) + min * sum(q)
// with mid = (2^bits - 1) / 2: the last residual meets codes centered on mid, never their
// mean. What is left is ~2^-24 of the group's largest query entry per channel: float32's own
// rounding, so the integer path is held to the float path's tolerance and to the backend's
// output-rounding budget (two digits, ~2^-16, measured up to 1.1e-4 off the reference at
// unit-scale outputs: over the fp16 budget of tests/test_backend_conformance.py).
//
// A 32-bit word of 1/2/4-bit codes holds 32/bits channels; "extraction" k of a word,
// (word >> k*bits) & 0x0101..*mask, leaves in byte m the code of channel (32/bits)*w +
// (8/bits)*m + k. Vector j = w*(8/bits) + k of a tile pairs with the query's 4 int8 digits of
// those channels, packed in one int32 (``quads``). 3-bit codes are two planes (2-bit, then the
// 1-bit high plane weighted 4), each its own run of vectors.
constexpr int MAX_PLANES = 2;

struct Plane {
  int bits, offset, weight;  // codes of `bits` at byte `offset` of the field, times `weight`
};

inline int code_planes(const Field& f, Plane* out) {
  if (f.bits == 3) {
    out[0] = {2, 0, 1};
    out[1] = {1, f.head / 4, 4};
    return 2;
  }
  out[0] = {f.bits, 0, 1};
  return 1;
}

// Whether a key field is scored with integer dots: codes of at most 4 bits, every word of
// codes inside one channel group (its 4-code lanes share a scale), planes of whole 16-byte
// chunks (the tile transpose below).
inline bool int_dot_keys(const Field& f) {
#ifdef KVQ_INT_DOTS
  if (f.kind != INT || f.bits > 4) return false;
  Plane pl[MAX_PLANES];
  const int np = code_planes(f, pl);
  for (int i = 0; i < np; ++i)
    if ((f.group * pl[i].bits) % 32 || (f.head * pl[i].bits / 8) % 16) return false;
  return true;
#else
  (void)f;
  return false;
#endif
}

// One query row, in int8 digits for the integer dots.
constexpr int DIGITS = 3;
constexpr float DIGIT_BASE = 254.0f;

struct IntQuery {
  int32_t quads[DIGITS][MAX_PLANES][MAX_HEAD / 4];  // digit, plane, vector j: 4 int8s
  float step[DIGITS][MAX_HEAD / 8];                 // per digit and key group: its step
  float center[MAX_HEAD / 8];                       // per key group: mid * sum(residual)
};

// The query channel of each byte of a plane's quads: byte m of quad j = w * per_byte + k
// holds channel per_word * w + per_byte * m + k (the order load_int_key_tile extracts codes
// in). A word's channels are one key group's, so group g's channels fill bytes
// [g * group, (g + 1) * group) of the quads, in another order. Built once per work item.
struct QuadOrder {
  int16_t channel[MAX_PLANES][MAX_HEAD];
};

inline void quad_order(const Field& f, QuadOrder& out) {
  Plane pl[MAX_PLANES];
  const int np = code_planes(f, pl);
  for (int p = 0; p < np; ++p) {
    const int per_word = 32 / pl[p].bits, per_byte = 8 / pl[p].bits;
    for (int w = 0; w < f.head * pl[p].bits / 32; ++w)
      for (int k = 0; k < per_byte; ++k)
        for (int m = 0; m < 4; ++m)
          out.channel[p][(w * per_byte + k) * 4 + m] = int16_t(per_word * w + per_byte * m + k);
  }
}

// One int8 digit of n query entries on a step: digit = round(rest / step), rest -= step *
// digit. |rest| <= 127 steps on entry, so |digit| <= 127.
typedef int8_t v16c __attribute__((vector_size(16)));
inline void next_digits(float* rest, int n, float step, int8_t* digit) {
  const float per_step = 1.0f / step;  // any rounding of it is the next digit's
  const float magic = 12582912.0f;     // 1.5 * 2^23: x + magic - magic rounds x to an integer
  int i = 0;
  for (; i + 16 <= n; i += 16) {
    const v16 x = load_v16(rest + i), d = (x * per_step + magic) - magic;
    store_v16(rest + i, x - step * d);
    const v16c bytes = __builtin_convertvector(__builtin_convertvector(d, v16i), v16c);
    std::memcpy(digit + i, &bytes, sizeof(bytes));
  }
  for (; i < n; ++i) {
    const float d = std::nearbyint(rest[i] * per_step);
    rest[i] -= step * d;
    digit[i] = int8_t(d);
  }
}

// q: the row as scored (rotated, times the softmax scale). Each plane's digits are computed
// in its quads' channel order, so they are written in place (the groups' steps and residuals
// do not depend on the order).
inline void round_query(const Field& f, const QuadOrder& order, const float* q, IntQuery& out) {
  const int ng = f.groups(), gs = f.group;
  const float mid = float((1 << f.bits) - 1) * 0.5f;
  Plane pl[MAX_PLANES];
  const int np = code_planes(f, pl);
  for (int p = 0; p < np; ++p) {
    alignas(64) float rest[MAX_HEAD];
    for (int i = 0; i < f.head; ++i) rest[i] = q[order.channel[p][i]];
    for (int g = 0; g < ng; ++g) {
      float* r = rest + g * gs;
      const float amax = abs_max(r, gs);
      float step = amax > 0.0f ? amax / 127.0f : 1.0f;
      for (int dg = 0; dg < DIGITS; ++dg, step /= DIGIT_BASE) {
        next_digits(r, gs, step, reinterpret_cast<int8_t*>(out.quads[dg][p]) + g * gs);
        out.step[dg][g] = step;
      }
      out.center[g] = mid * sum_f32(r, gs);
    }
  }
}

#ifdef KVQ_INT_DOTS
// A tile's codes, extracted: vectors[p][j], 16 token lanes of 4 codes each.
struct IntKeyTile {
  __m512i vectors[MAX_PLANES][MAX_HEAD / 4];
};

// All 16 slots of the tile are read (a tile never crosses a block, so they are memory of the
// block); lanes past the context carry junk codes, masked by the caller.
inline void load_int_key_tile(const Field& f, const uint8_t* field0, int64_t stride,
                              IntKeyTile& kt) {
  Plane pl[MAX_PLANES];
  const int np = code_planes(f, pl);
  for (int p = 0; p < np; ++p) {
    const int b = pl[p].bits, per_byte = 8 / b, plane_bytes = f.head * b / 8;
    const __m512i mask = _mm512_set1_epi8(char((1 << b) - 1));
    for (int c = 0; c < plane_bytes / 16; ++c) {
      __m512i words[4];
      transpose_chunk(field0 + pl[p].offset + 16 * c, stride, words);
      for (int w = 0; w < 4; ++w)
        for (int k = 0; k < per_byte; ++k)
          kt.vectors[p][(4 * c + w) * per_byte + k] =
              _mm512_and_si512(_mm512_srli_epi32(words[w], unsigned(k * b)), mask);
    }
  }
}

// dot[r][dg] += <digit dg of row r, codes> over vectors [j0, j1) of plane p.
template <int RB>
inline void plane_dots(const __m512i* vectors, const IntQuery* iq, int p, int j0, int j1,
                       __m512i (*dot)[DIGITS]) {
  for (int j = j0; j < j1; ++j) {
    const __m512i v = vectors[j];
    for (int r = 0; r < RB; ++r)
      for (int dg = 0; dg < DIGITS; ++dg)
        dot[r][dg] = _mm512_dpbusd_epi32(dot[r][dg], v, _mm512_set1_epi32(iq[r].quads[dg][p][j]));
  }
}

// Scores of RB rows for the tile (before masking): s[r][t] for its 16 tokens. Each code
// vector is loaded once for the RB rows' three digits (vpdpbusd with a broadcast operand).
template <int RB>
inline void int_key_scores(const Field& f, const IntKeyTile& kt, const IntQuery* iq,
                           const KeyTile& meta, const float (*qsum)[MAX_HEAD / 8],
                           float (*s)[TILE]) {
  Plane pl[MAX_PLANES];
  const int np = code_planes(f, pl);
  const int ng = f.groups(), per_group = f.group / 4;  // vectors per group and plane
  __m512 acc[RB];
  for (int r = 0; r < RB; ++r) acc[r] = _mm512_setzero_ps();
  for (int g = 0; g < ng; ++g) {
    // per row and digit, <digit, c> summed over the planes (weight 4: the 3-bit high plane),
    // exact in int32 and in float (<= 256 channels x 15 x 127 < 2^24)
    __m512i dot[RB][DIGITS];
    for (int r = 0; r < RB; ++r)
      for (int dg = 0; dg < DIGITS; ++dg) dot[r][dg] = _mm512_setzero_si512();
    for (int p = 0; p < np; ++p) {
      if (pl[p].weight == 1) {
        plane_dots<RB>(kt.vectors[p], iq, p, g * per_group, (g + 1) * per_group, dot);
        continue;
      }
      __m512i part[RB][DIGITS];  // the 3-bit high plane: its own sums, then times 4
      for (int r = 0; r < RB; ++r)
        for (int dg = 0; dg < DIGITS; ++dg) part[r][dg] = _mm512_setzero_si512();
      plane_dots<RB>(kt.vectors[p], iq, p, g * per_group, (g + 1) * per_group, part);
      for (int r = 0; r < RB; ++r)
        for (int dg = 0; dg < DIGITS; ++dg)
          dot[r][dg] = _mm512_add_epi32(dot[r][dg], _mm512_slli_epi32(part[r][dg], 2));
    }
    const __m512 sc = _mm512_loadu_ps(meta.scale[g]), mn = _mm512_loadu_ps(meta.min[g]);
    for (int r = 0; r < RB; ++r) {
      __m512 code_part = _mm512_set1_ps(iq[r].center[g]);
      for (int dg = 0; dg < DIGITS; ++dg)
        code_part = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[r][dg]),
                                    _mm512_set1_ps(iq[r].step[dg][g]), code_part);
      acc[r] = _mm512_fmadd_ps(sc, code_part, acc[r]);
      acc[r] = _mm512_fmadd_ps(mn, _mm512_set1_ps(qsum[r][g]), acc[r]);
    }
  }
  for (int r = 0; r < RB; ++r) _mm512_storeu_ps(s[r], acc[r]);
}
#endif

// f(std::integral_constant<int, RB>, m) over rows [m0, rows) in blocks of RB rows, then of
// RB/2, ... 1 for the rest: kernels templated on RB keep RB rows' accumulators in registers.
template <int RB, class F>
inline void for_row_blocks(int m0, int rows, F&& f) {
  int m = m0;
  for (; m + RB <= rows; m += RB) f(std::integral_constant<int, RB>{}, m);
  if constexpr (RB > 1) for_row_blocks<RB / 2>(m, rows, f);
}

// acc[r] = acc[r] * alpha[r] + sum_t ws[r][group][t] * codes[t] for RB rows (weights with a
// stride of nvg * TILE floats per row, accumulators of CH * 16): each 16-channel run of a
// token's codes is loaded once for the RB rows.
template <int RB, int CH>
inline void weighted_values(const ValueTile& vt, const float* ws, int nvg, const float* alpha,
                            int vgs, float* acc) {
  v16 a[RB][CH];
  for (int r = 0; r < RB; ++r)
    for (int j = 0; j < CH; ++j) a[r][j] = load_v16(acc + (r * CH + j) * 16) * alpha[r];
  for (int t = 0; t < TILE; ++t)
    for (int j = 0; j < CH; ++j) {
      const v16 c = load_v16(vt.codes[t] + 16 * j);
      for (int r = 0; r < RB; ++r) a[r][j] += ws[(r * nvg + 16 * j / vgs) * TILE + t] * c;
    }
  for (int r = 0; r < RB; ++r)
    for (int j = 0; j < CH; ++j) store_v16(acc + (r * CH + j) * 16, a[r][j]);
}

// 16 codes of a token from channel c0 on (``bits``: 1, 2, 3, 4 or 8; 3 = the 2-bit plane
// plus 4 x the 1-bit plane at n / 4 bytes).
template <int BITS>
inline v16 token_codes(const uint8_t* src, int n, int c0) {
  if constexpr (BITS == 3) return code_run<2>(src, c0) + 4.0f * code_run<1>(src + n / 4, c0);
  else return code_run<BITS>(src, c0);
}

// weighted_values for rows that fit one register block (decode: the GQA group), with the
// codes unpacked in registers straight from the cache instead of through a float tile:
// each token's codes are read once for all RB rows and never stored. Every slot of the tile
// is read (memory of its block); slots outside the context carry zero weights (their scales
// are zeroed), and codes are finite, so they add nothing.
template <int RB, int CH, int BITS>
inline void weighted_codes(const uint8_t* codes0, int64_t stride, const float* ws, int nvg,
                           const float* alpha, int vgs, float* acc) {
  v16 a[RB][CH];
  for (int r = 0; r < RB; ++r)
    for (int j = 0; j < CH; ++j) a[r][j] = load_v16(acc + (r * CH + j) * 16) * alpha[r];
  for (int t = 0; t < TILE; ++t)
    for (int j = 0; j < CH; ++j) {
      const v16 c = token_codes<BITS>(codes0 + t * stride, CH * 16, 16 * j);
      for (int r = 0; r < RB; ++r) a[r][j] += ws[(r * nvg + 16 * j / vgs) * TILE + t] * c;
    }
  for (int r = 0; r < RB; ++r)
    for (int j = 0; j < CH; ++j) store_v16(acc + (r * CH + j) * 16, a[r][j]);
}

template <int RB, int CH>
inline void weighted_codes_of(int bits, const uint8_t* codes0, int64_t stride, const float* ws,
                              int nvg, const float* alpha, int vgs, float* acc) {
  switch (bits) {
    case 1: weighted_codes<RB, CH, 1>(codes0, stride, ws, nvg, alpha, vgs, acc); break;
    case 2: weighted_codes<RB, CH, 2>(codes0, stride, ws, nvg, alpha, vgs, acc); break;
    case 3: weighted_codes<RB, CH, 3>(codes0, stride, ws, nvg, alpha, vgs, acc); break;
    case 4: weighted_codes<RB, CH, 4>(codes0, stride, ws, nvg, alpha, vgs, acc); break;
    default: weighted_codes<RB, CH, 8>(codes0, stride, ws, nvg, alpha, vgs, acc);
  }
}

// f(std::integral_constant<int, RB>) with RB = rows (1-4).
template <class F>
inline void with_rows(int rows, F&& f) {
  switch (rows) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    default: f(std::integral_constant<int, 4>{});
  }
}

// A served model's decode step reads each layer's cache once, from DRAM or a far cache level
// (30 layers of SmolLM2 at 8k tokens: 47 MB packed): the tile PREFETCH_TILES ahead is asked
// for while this one is computed. Its slots are contiguous (a tile never crosses a block),
// but consecutive tiles of a head may be a block apart, where the hardware's stream
// prefetchers stop.
constexpr int PREFETCH_TILES = 2;
// Key tiles per online-softmax step: the per-row costs of a step (maximum, rescale factor,
// sums) are paid once per 64 keys.
constexpr int STEP_TILES = 4;
inline void prefetch_tile(const uint8_t* slot0, int64_t slot_stride) {
  for (int64_t at = 0; at < TILE * slot_stride; at += 64) __builtin_prefetch(slot0 + at);
}

#ifdef KVQ_AMX
// -- prompt chunks on AMX --------------------------------------------------------------------
// A prompt chunk's work item has up to 64 query rows sharing every key tile: its scores and
// weighted values are matrix products, which AMX-BF16 computes 16 x 16 x 32 at a time
// (TDPBF16PS: bf16 pairs, fp32 sums). Codes (integers below 256) are exact in bf16; the
// queries and the softmax weights times value scales are split into bf16 parts, each rounded
// to nearest. Two parts (the rest ~2^-16 of the entry) where the model attends in bfloat16:
// its outputs are rounded to bfloat16 (half an ulp: 2^-8 of the value), and an fp32 model
// attending in bfloat16 has had its queries and K/V rounded so; outputs were at most 3.8e-5
// off the float32 reference at unit scale, 1% of that half ulp, for 8-10% less prefill time
// than three. Three (hi + mid + lo, the rest ~2^-24: float32's own rounding) for float16,
// whose outputs near zero the backend tests hold to 2e-5 (test_backend_conformance.py): at
// most 3.0e-6 off over 30 draws per format. One part is 1e-2 off (the codes' products cancel
// against the mins' term). Scales and mins are applied per group afterwards as on the other
// paths:
//   s[m][t] = sum_g scale_g[t] * (Q_g C_g^T)[m][t] + min_g[t] * qsum_g[m]
//   acc[m][c] += sum_t (p[m][t] * scale_g(c)[t]) * code[t][c]
// Scores are products per 16-key tile; values once per online-softmax step (64 keys, two
// products of 32 keys), so the accumulators are loaded and stored once per step. Every
// product runs in pairs on two accumulator tiles (two row blocks for scores, two channel
// blocks for values): a tile product waits on its accumulator's previous one.
// Used for prompt items of >= AMX_MIN_ROWS rows (a decode item's 8 rows, GQA 8, ran 12% slower
// than on the vector path) whose key and value fields are integer codes, with key groups of
// whole 32-channel chunks and value groups of whole 16-channel blocks; VLLM_KVQ_CPU_AMX=0
// turns it off (benchmarks, tests).
constexpr int AMX_MIN_ROWS = 16;
constexpr int STEP_KEYS = STEP_TILES * TILE, HALF_KEYS = 32;  // a product's K: 32 bf16

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Linux grants a process AMX state only on request (once; threads inherit it).
inline bool amx_enabled() {
  static const bool on = [] {
    const char* env = std::getenv("VLLM_KVQ_CPU_AMX");
    if (env && std::string(env) == "0") return false;
    constexpr int ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18;
    return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
  }();
  return on;
}

// Eight tiles of 16 rows x 64 bytes: accumulators 0 and 1 (16 x 16 fp32), left operands 2 and
// 3 (16 rows x 32 bf16), right operands 4-7 (16 pairs of 16 bf16 pairs). Tile registers are
// not renamed: a load into a tile waits for the product reading it, so consecutive products
// take their operands from alternating tiles. A static object: GCC drops stores to a local
// one that only LDTILECFG reads.
inline void configure_tiles() {
  static const TileConfig cfg = [] {
    TileConfig c;
    for (int t = 0; t < 8; ++t) c.rows[t] = 16, c.colsb[t] = 64;
    return c;
  }();
  _tile_loadconfig(&cfg);
}

typedef uint16_t v16h __attribute__((vector_size(32)));

// x split into `parts` bf16 numbers (each rounded to nearest), written at out[k * stride].
inline void bf16_parts(v16 x, int parts, uint16_t* out, int64_t stride) {
  for (int k = 0; k < parts; ++k) {
    v16u bits;
    std::memcpy(&bits, &x, sizeof(bits));
    bits = (bits + 0x7FFFu + ((bits >> 16) & 1u)) & 0xFFFF0000u;  // finite inputs only
    const v16h half = __builtin_convertvector(bits >> 16, v16h);
    std::memcpy(out + k * stride, &half, sizeof(half));
    v16 part;
    std::memcpy(&part, &bits, sizeof(part));
    x -= part;  // exact: the part is x's leading bits
  }
}

// Two 16-lane rows of integer-valued floats as one row of bf16 pairs: dword i holds (a[i],
// b[i]) (an integer below 256 is exact in bf16: its float's low 16 bits are zero).
inline void bf16_pairs(const float* a, const float* b, uint32_t* out) {
  v16u x, y;
  std::memcpy(&x, a, sizeof(x));
  std::memcpy(&y, b, sizeof(y));
  const v16u pair = (x >> 16) | (y & 0xFFFF0000u);
  std::memcpy(out, &pair, sizeof(pair));
}

// A work item's AMX operands: the queries in bf16 parts (once per item), a tile's keys and a
// step's values as rows of bf16 pairs, the step's weights in bf16 parts, and the value
// accumulators of 16-row blocks. One per thread, its buffers reused from item to item: the
// last block's padding rows keep whatever an earlier item left there (finite: bf16 parts of
// finite numbers, or the zeros they started as), and only land in accumulator rows that are
// never read.
struct AmxItem {
  int rows, blocks, d, nkg, kgs, nvg, vgs, parts;  // parts: bf16 parts of queries and weights
  std::vector<uint16_t> query;    // [block][part][32-channel chunk][16 rows][32]
  std::vector<uint32_t> keys;     // [chunk][16 channel pairs][16 tokens]
  std::vector<uint32_t> values;   // [half][16-channel block][16 token pairs][16 channels]
  std::vector<uint16_t> weights;  // [block][value group][part][half][16 rows][32 tokens]
  std::vector<float> acc;         // [blocks * 16][d]
  float out[2][16][TILE];         // two score tiles, stored

  // Start an item: its shape, its queries' parts and zero accumulators.
  void start(const float (*q)[MAX_HEAD], int rows_, int d_, int nkg_, int nvg_, int parts_) {
    rows = rows_, blocks = (rows_ + 15) / 16, d = d_, nkg = nkg_, kgs = d_ / nkg_;
    nvg = nvg_, vgs = d_ / nvg_, parts = parts_;
    grow(query, size_t(blocks) * parts * d * 16);
    grow(keys, size_t(d) * 8);
    grow(values, size_t(STEP_KEYS / HALF_KEYS) * d * 16);
    grow(weights, size_t(blocks) * nvg * parts * STEP_KEYS * 16);
    grow(acc, size_t(blocks) * 16 * d);
    std::fill_n(acc.data(), size_t(blocks) * 16 * d, 0.0f);
    for (int m = 0; m < rows; ++m)
      for (int c = 0; c < d / 32; ++c)
        for (int i = 0; i < 32; i += 16)
          bf16_parts(load_v16(q[m] + 32 * c + i), parts,
                     query_tile(m / 16, 0, c) + m % 16 * 32 + i, int64_t(d) * 16);
  }
  template <typename T>
  static void grow(std::vector<T>& v, size_t n) {
    if (v.size() < n) v.resize(n);  // new elements are zeros
  }
  uint16_t* query_tile(int b, int part, int chunk) {
    return query.data() + ((size_t(b) * parts + part) * (d / 32) + chunk) * 512;
  }
  uint32_t* value_tile(int half, int cb) {
    return values.data() + (size_t(half) * (d / 16) + cb) * 256;
  }
  uint16_t* weight_tile(int b, int vg, int part, int half) {
    return weights.data() + (((size_t(b) * nvg + vg) * parts + part) * 2 + half) * 512;
  }

  // Scores of every row for a tile of keys (kt: transposed float codes, scales, mins), two
  // row blocks at a time.
  void scores(const KeyTile& kt, const float (*qsum)[MAX_HEAD / 8], float (*s)[TILE]) {
    for (int c = 0; c < d / 32; ++c)
      for (int r = 0; r < 16; ++r)
        bf16_pairs(kt.codes[32 * c + 2 * r], kt.codes[32 * c + 2 * r + 1],
                   keys.data() + (c * 16 + r) * 16);
    for (int m = 0; m < rows; ++m) store_v16(s[m], v16{0});
    // The products of chunk c for row blocks b (into tile 0) and b + 1 (tile 1): the keys
    // from tile B, block b's query parts from tiles 2 / 6 and block b + 1's from 3 / 7 in turn
    // (the keys' tiles alternate per chunk, the queries' per product).
#define KVQ_SCORE_PRODUCTS(B)                                    \
  _tile_loadd(B, keys.data() + c * 256, 64);                     \
  for (int part = 0; part < parts; ++part) {                     \
    if (products++ % 2) {                                        \
      _tile_loadd(6, query_tile(b, part, c), 64);                \
      _tile_dpbf16ps(0, 6, B);                                   \
      if (!pair) continue;                                       \
      _tile_loadd(7, query_tile(b + 1, part, c), 64);            \
      _tile_dpbf16ps(1, 7, B);                                   \
    } else {                                                     \
      _tile_loadd(2, query_tile(b, part, c), 64);                \
      _tile_dpbf16ps(0, 2, B);                                   \
      if (!pair) continue;                                       \
      _tile_loadd(3, query_tile(b + 1, part, c), 64);            \
      _tile_dpbf16ps(1, 3, B);                                   \
    }                                                            \
  }
    int chunks_done = 0, products = 0;  // the tiles alternate from one product to the next
    for (int b = 0; b < blocks; b += 2) {
      const bool pair = b + 1 < blocks;
      for (int g = 0; g < nkg; ++g) {
        _tile_zero(0);
        _tile_zero(1);
        for (int c = g * kgs / 32; c < (g + 1) * kgs / 32; ++c) {
          if (chunks_done++ % 2) {
            KVQ_SCORE_PRODUCTS(5)
          } else {
            KVQ_SCORE_PRODUCTS(4)
          }
        }
        _tile_stored(0, out[0], 64);
        _tile_stored(1, out[1], 64);
        const v16 sc = load_v16(kt.scale[g]), mn = load_v16(kt.min[g]);
        for (int m = 16 * b; m < std::min(rows, 16 * b + 32); ++m)
          store_v16(s[m], load_v16(s[m]) + sc * load_v16(out[(m >> 4) - b][m & 15]) +
                              mn * qsum[m][g]);
      }
    }
#undef KVQ_SCORE_PRODUCTS
  }

  // Tile ti of a step: its values (vt: float codes, token-major, zero outside the context)
  // and its weights ps[m] times each value group's scales, into the step's operands.
  void step_tile(int ti, const ValueTile& vt, const float (*ps)[TILE]) {
    const int half = ti / 2, t0 = (ti % 2) * TILE;  // the tile's tokens in its half
    for (int cb = 0; cb < d / 16; ++cb)
      for (int r = 0; r < TILE / 2; ++r)
        bf16_pairs(vt.codes[2 * r] + 16 * cb, vt.codes[2 * r + 1] + 16 * cb,
                   value_tile(half, cb) + (t0 / 2 + r) * 16);
    for (int m = 0; m < rows; ++m)
      for (int vg = 0; vg < nvg; ++vg)
        bf16_parts(load_v16(ps[m]) * load_v16(vt.scale[vg]), parts,
                   weight_tile(m / 16, vg, 0, half) + m % 16 * 32 + t0, 2 * 512);
  }

  // Zero operands for the tiles a short step does not have (weights and codes 0).
  void clear_tiles(int from) {
    for (int ti = from; ti < STEP_TILES; ++ti) {
      const int half = ti / 2, t0 = (ti % 2) * TILE;
      for (int cb = 0; cb < d / 16; ++cb)
        std::fill_n(value_tile(half, cb) + t0 / 2 * 16, TILE / 2 * 16, 0u);
      for (int b = 0; b < blocks; ++b)
        for (int vg = 0; vg < nvg; ++vg)
          for (int part = 0; part < parts; ++part)
            for (int r = 0; r < 16; ++r)
              std::fill_n(weight_tile(b, vg, part, half) + r * 32 + t0, TILE, uint16_t(0));
    }
  }

  // acc[m] = acc[m] * alpha[m] + the step's weighted codes, two channel blocks at a time.
  void step_values(const float* alpha, int halves) {
    int products = 0;  // the weights' tile alternates from one product to the next
    for (int m = 0; m < rows; ++m)
      for (int i = 0; i < d; i += 16)
        store_v16(&acc[size_t(m) * d + i], load_v16(&acc[size_t(m) * d + i]) * alpha[m]);
    for (int b = 0; b < blocks; ++b)
      for (int cb = 0; cb < d / 16; cb += 2) {
        float* c0 = acc.data() + size_t(16 * b) * d + 16 * cb;
        const int vg0 = 16 * cb / vgs, vg1 = 16 * (cb + 1) / vgs;
        _tile_loadd(0, c0, d * 4);
        _tile_loadd(1, c0 + 16, d * 4);
        // half 0 from tiles 4/5, half 1 from 6/7; one value group's weights alternate
        // between tiles 2 and 3 (two groups, 16-channel ones, take one each)
        _tile_loadd(4, value_tile(0, cb), 64);
        _tile_loadd(5, value_tile(0, cb + 1), 64);
        if (halves > 1) {
          _tile_loadd(6, value_tile(1, cb), 64);
          _tile_loadd(7, value_tile(1, cb + 1), 64);
        }
        for (int half = 0; half < halves; ++half)
          for (int part = 0; part < parts; ++part, ++products) {
            if (vg1 != vg0) {
              _tile_loadd(2, weight_tile(b, vg0, part, half), 64);
              _tile_loadd(3, weight_tile(b, vg1, part, half), 64);
              if (half) { _tile_dpbf16ps(0, 2, 6); _tile_dpbf16ps(1, 3, 7); }
              else { _tile_dpbf16ps(0, 2, 4); _tile_dpbf16ps(1, 3, 5); }
              continue;
            }
            const bool odd = products % 2;
            if (odd) _tile_loadd(3, weight_tile(b, vg0, part, half), 64);
            else _tile_loadd(2, weight_tile(b, vg0, part, half), 64);
            if (half && odd) { _tile_dpbf16ps(0, 3, 6); _tile_dpbf16ps(1, 3, 7); }
            else if (half) { _tile_dpbf16ps(0, 2, 6); _tile_dpbf16ps(1, 2, 7); }
            else if (odd) { _tile_dpbf16ps(0, 3, 4); _tile_dpbf16ps(1, 3, 5); }
            else { _tile_dpbf16ps(0, 2, 4); _tile_dpbf16ps(1, 2, 5); }
          }
        _tile_stored(0, c0, d * 4);
        _tile_stored(1, c0 + 16, d * 4);
      }
  }
};

inline bool amx_item(const Problem& P, const Item& it, int rows, int d) {
  return it.t1 - it.t0 > 1 && rows >= AMX_MIN_ROWS && P.kf.kind == INT && P.vf.kind == INT &&
         d % 32 == 0 && (d / P.kf.groups()) % 32 == 0 && (d / P.vf.groups()) % 16 == 0 &&
         amx_enabled();
}
#endif

// DC: the head size as a constant (64 / 128 / 256; 0 = read P.d), so the loops over channels
// have fixed trip counts and the row accumulators stay in vector registers.
template <typename T16, int DC>
void attend_packed(const Problem& P, const Item& it, float* scratch) {
  const int g = int(P.group), d = DC ? DC : int(P.d), rows = (it.t1 - it.t0) * g;
  const int nkg = P.kf.groups(), nvg = P.vf.groups();
  RowState st{scratch, scratch + rows, scratch + 2 * rows, scratch + 2 * rows + rows * d};
  std::fill(st.max, st.max + rows, NEG_INF);
  std::fill(st.sum, st.sum + rows, 0.0f);
  if (it.p1 <= it.p0) {  // nothing packed to read: an empty state
    std::fill(st.acc, st.acc + rows * (d + nvg), 0.0f);
    return;
  }
  float q[MAX_ROWS][MAX_HEAD], qsum[MAX_ROWS][MAX_HEAD / 8];
  int32_t limit[MAX_ROWS], first[MAX_ROWS];
  for (int m = 0; m < rows; ++m) {
    const int64_t token = P.query_start[it.r] + it.t0 + m / g;
    query_row<T16>(P, token, it.h * g + m % g, q[m]);
    if (P.kf.rotate) rotate(q[m], P.ksigns + it.h * d, d);  // <R q, R k> = <q, k>
    for (int i = 0; i < d; ++i) q[m][i] *= P.scale;
    for (int kg = 0; kg < nkg; ++kg) qsum[m][kg] = sum_f32(q[m] + kg * (d / nkg), d / nkg);
    limit[m] = int32_t(row_limit(P, it.r, token));
    first[m] = int32_t(first_key(P, token));
  }
#ifdef KVQ_AMX
  static thread_local AmxItem amx_buffers;
  AmxItem* amx = nullptr;
  if (DC != 0 && amx_item(P, it, rows, d)) {
    amx = &amx_buffers;
    amx->start(q, rows, d, nkg, nvg, P.amx_parts);
    configure_tiles();
  }
#else
  constexpr bool amx = false;
#endif
  // the vector paths accumulate in place (the AMX path in its own tiles, copied at the end;
  // the mins' sums are written at the end either way)
  if (!amx) std::fill(st.acc, st.acc + rows * d, 0.0f);
#ifdef KVQ_INT_DOTS
  const bool int_keys = !amx && int_dot_keys(P.kf);
  std::vector<IntQuery> iq(int_keys ? rows : 0);  // 1.9 KB a row: on the heap
  IntKeyTile ikt;
  if (int_keys) {
    QuadOrder order;
    quad_order(P.kf, order);
    for (int m = 0; m < rows; ++m) round_query(P.kf, order, q[m], iq[m]);
  }
#endif
  const int64_t lowest = items_first_key(P, it.r, it.t0, it.t1);
  // keys [all_from, all_to) are visible to every row
  const int32_t all_from = *std::max_element(first, first + rows);
  const int32_t all_to = *std::min_element(limit, limit + rows);
  // sum of p * min per row and value group, one lane per token slot: summed once at the end
  std::vector<v16> min_lanes(rows * nvg, v16{0});
  KeyTile kt;  // on the stack (~34 KB with vt): thread-local storage costs a call per use
  ValueTile vt;
  // scores of the step's tiles: s[tile][row][token]
  float s[STEP_TILES][MAX_ROWS][TILE];
  // softmax weights x value scales: row m, value group vg at ws[(m * nvg + vg) * TILE]
  std::vector<float> ws(amx ? 0 : size_t(rows) * nvg * TILE);  // AMX: its own operands
  const int32_t* blocks = P.block_table + it.r * P.bt_stride;
  const int kgs = d / nkg, vgs = d / nvg;
  // Decode (the rows' accumulators fit 16 registers: 4 rows at head size 64, 2 at 128): value
  // codes are unpacked in registers, once per tile, where they can be (vector scales,
  // 16-channel runs).
#ifdef KVQ_INT_DOTS
  const bool codes_in_registers = DC != 0 && rows * DC <= 256 && vgs % 16 == 0 &&
                                  vector_codes(P.vf.bits, d) &&
                                  vector_scales(P.vf, P.slot_bytes);
#else
  constexpr bool codes_in_registers = false;
#endif
  auto tile_slots = [&](int p) {
    return P.cache + int64_t(blocks[p / P.block_size]) * P.c_blk + it.h * P.c_head +
           (p % P.block_size) * P.c_slot;
  };
  float alpha[MAX_ROWS], ones[MAX_ROWS];
  std::fill(ones, ones + rows, 1.0f);
  // Scores of a tile of n keys (before masking) into out[row][token].
  auto tile_scores = [&](int n, const uint8_t* slot0, float (*out)[TILE]) {
#ifdef KVQ_AMX
    if (amx) {
      load_key_tile<T16, DC>(P.kf, slot0, P.c_slot, P.slot_bytes, n, kt);
      amx->scores(kt, qsum, out);
      return;
    }
#endif
#ifdef KVQ_INT_DOTS
    if (int_keys) {
      load_int_key_tile(P.kf, slot0 + P.kf.offset, P.c_slot, ikt);
      load_key_scales(P.kf, slot0, P.c_slot, P.slot_bytes, n, kt);
      auto scores = [&](auto rb, int m) {
        int_key_scores<decltype(rb)::value>(P.kf, ikt, &iq[m], kt, qsum + m, out + m);
      };
      if (P.kf.bits == 3) for_row_blocks<2>(0, rows, scores);  // two planes: more registers
      else if (rows <= 4) with_rows(rows, [&](auto rb) { scores(rb, 0); });  // decode: one pass
      else for_row_blocks<4>(0, rows, scores);
      return;
    }
#endif
    load_key_tile<T16, DC>(P.kf, slot0, P.c_slot, P.slot_bytes, n, kt);
    for_row_blocks<4>(0, rows, [&](auto rb, int m) {
      float_key_scores<decltype(rb)::value>(kt, q + m, qsum + m, nkg, kgs, out + m);
    });
  };
  // Weighted values of tile p for every row: s[ti] holds its probabilities, alpha the factor
  // the rows' accumulators are scaled by first.
  auto tile_values = [&](int p, int n, const uint8_t* slot0, float (*ps)[TILE],
                         const float* alpha) {
    const int lo = int(std::max<int64_t>(0, lowest - p));
#ifdef KVQ_INT_DOTS
    if (codes_in_registers)
      load_scales_vec(P.vf, slot0, P.c_slot, P.slot_bytes, lo, n, vt.scale, vt.min);
    else
#endif
      load_value_tile<T16>(P.vf, slot0, P.c_slot, P.slot_bytes, lo, n, vt);
    // weights x value scales per group (0 for masked tokens: their codes are zero-filled);
    // the AMX path splits them into its own operands
    for (int m = 0; m < rows; ++m) {
      const v16 w = load_v16(ps[m]);
      v16* mins = min_lanes.data() + m * nvg;
      for (int vg = 0; vg < nvg; ++vg) {
        if (!amx) store_v16(&ws[(m * nvg + vg) * TILE], w * load_v16(vt.scale[vg]));
        mins[vg] = mins[vg] * alpha[m] + w * load_v16(vt.min[vg]);
      }
    }
#ifdef KVQ_AMX
    if (amx) {
      amx->step_tile((p - it.p0) / TILE % STEP_TILES, vt, ps);  // the products: per step
      return;
    }
#endif
    if constexpr (DC != 0) {
      if (codes_in_registers) {
        constexpr int CH = DC / 16;
        with_rows(rows, [&](auto rb) {
          weighted_codes_of<decltype(rb)::value, CH>(P.vf.bits, slot0 + P.vf.offset, P.c_slot,
                                                     ws.data(), nvg, alpha, vgs, st.acc);
        });
        return;
      }
    }
    if (DC && vgs % 16 == 0) {  // RB rows' accumulators in registers for the whole tile
      constexpr int CH = (DC ? DC : 16) / 16;
      for_row_blocks<CH <= 4 ? 4 : CH <= 8 ? 2 : 1>(0, rows, [&](auto rb, int m) {
        weighted_values<decltype(rb)::value, CH>(vt, &ws[m * nvg * TILE], nvg, alpha + m, vgs,
                                                 st.acc + m * d);
      });
      return;
    }
    for (int m = 0; m < rows; ++m) {
      float* acc = st.acc + m * d;
      for (int i = 0; i < d; ++i) acc[i] *= alpha[m];
      for (int t = 0; t < TILE; ++t) {
        for (int vg = 0; vg < nvg; ++vg) {
          const float ws_t = ws[(m * nvg + vg) * TILE + t];
          const float* c = vt.codes[t] + vg * vgs;
          for (int i = 0; i < vgs; ++i) acc[vg * vgs + i] += ws_t * c[i];
        }
      }
    }
  };
  const int step_keys = STEP_TILES * TILE;
  for (int b0 = it.p0; b0 < it.p1; b0 += step_keys) {
    const int tiles = std::min(STEP_TILES, (it.p1 - b0 + TILE - 1) / TILE);
    for (int ti = 0; ti < tiles; ++ti) {
      const int p = b0 + ti * TILE, n = std::min(TILE, it.p1 - p);
      if (p + PREFETCH_TILES * TILE < it.p1)
        prefetch_tile(tile_slots(p + PREFETCH_TILES * TILE), P.c_slot);
      tile_scores(n, tile_slots(p), s[ti]);
      if (n == TILE && p >= all_from && p + TILE <= all_to) continue;  // every row sees it all
      for (int m = 0; m < rows; ++m) {
        const int visible = std::max(0, std::min(n, limit[m] - p));
        for (int t = visible; t < TILE; ++t) s[ti][m][t] = NEG_INF;
        for (int t = 0; t < std::min(visible, first[m] - p); ++t) s[ti][m][t] = NEG_INF;
      }
    }
    bool any = false;
    for (int m = 0; m < rows; ++m) {
      if (softmax_step(&s[0][m][0], MAX_ROWS * TILE, tiles, st.max[m], st.sum[m], alpha[m])) {
        any = true;
      } else {  // nothing visible in this step: the row's state passes through unchanged
        for (int ti = 0; ti < tiles; ++ti) std::fill(s[ti][m], s[ti][m] + TILE, 0.0f);
        alpha[m] = 1.0f;
      }
    }
    if (!any) continue;
    for (int ti = 0; ti < tiles; ++ti) {
      const int p = b0 + ti * TILE;
      tile_values(p, std::min(TILE, it.p1 - p), tile_slots(p), s[ti], ti ? ones : alpha);
    }
#ifdef KVQ_AMX
    if (amx) {
      if (tiles < STEP_TILES) amx->clear_tiles(tiles);
      amx->step_values(alpha, (tiles + 1) / 2);
    }
#endif
  }
  for (int i = 0; i < rows * nvg; ++i) st.mins[i] = hsum16(min_lanes[i]);
#ifdef KVQ_AMX
  if (amx) {
    std::copy(amx->acc.begin(), amx->acc.begin() + size_t(rows) * d, st.acc);
    _tile_release();
  }
#endif
}

// The softmax state of one query row while its exact keys are folded in: the packed parts'
// running max and sum, their weighted values (codec domain, unrotated at the end) and the
// exact keys' weighted values (model domain).
struct ExactRow {
  float max, sum;
  float* acc;
  float* exact;
};

// Merge the packed parts of row m (each part's max, sum, weighted codes and weighted mins).
inline void merge_parts(const Item* parts, int num_parts, const float* scratch, int rows, int m,
                        int d, int nvg, ExactRow& row) {
  const int vgs = d / nvg;
  row.max = NEG_INF, row.sum = 0.0f;
  std::fill(row.acc, row.acc + d, 0.0f);
  std::fill(row.exact, row.exact + d, 0.0f);
  for (int pi = 0; pi < num_parts; ++pi) {
    const float* st = scratch + parts[pi].state;
    const float pm = st[m], ps = st[rows + m];
    if (pm == NEG_INF) continue;
    const float new_max = std::max(row.max, pm);
    const float a = row.max == NEG_INF ? 0.0f : fast_exp(row.max - new_max);
    const float b = fast_exp(pm - new_max);
    const float* pacc = st + 2 * rows + m * d;
    const float* pmin = st + 2 * rows + rows * d + m * nvg;
    for (int vg = 0; vg < nvg; ++vg) {
      const float mb = pmin[vg] * b;
      float* acc = row.acc + vg * vgs;
      const float* pa = pacc + vg * vgs;
      for (int i = 0; i < vgs; ++i) acc[i] = acc[i] * a + pa[i] * b + mb;
    }
    row.sum = row.sum * a + ps * b;
    row.max = new_max;
  }
}

// Fold a tile of n <= TILE exact keys (floats, [TILE][MAX_HEAD]) into RB rows (the query heads
// of one token: they read the same keys): all n scores, one online-softmax step per row (one
// rescale of its accumulators per tile, not per key). Each key and value vector is loaded once
// for the RB rows.
template <int RB>
inline void fold_exact_tile(const float* q, const float (*k)[MAX_HEAD],
                            const float (*v)[MAX_HEAD], int n, int d, float scale,
                            ExactRow* rows) {
  alignas(64) float s[RB][TILE];
#ifdef KVQ_SHUFFLES
  if (d % 16 == 0) {  // the n dots' lanes summed all at once
    v16 prod[RB][TILE];
    for (int t = 0; t < TILE; ++t) {
      v16 acc[RB];
      for (int r = 0; r < RB; ++r) acc[r] = v16{0};
      for (int i = 0; t < n && i < d; i += 16) {
        const v16 kv = load_v16(k[t] + i);
        for (int r = 0; r < RB; ++r) acc[r] += load_v16(q + r * d + i) * kv;
      }
      for (int r = 0; r < RB; ++r) prod[r][t] = acc[r];
    }
    for (int r = 0; r < RB; ++r) {
      store_v16(s[r], transpose_sums(prod[r]) * scale);
      for (int t = n; t < TILE; ++t) s[r][t] = NEG_INF;
    }
  } else
#endif
    for (int r = 0; r < RB; ++r)
      for (int t = 0; t < TILE; ++t)
        s[r][t] = t < n ? dot_f32(q + r * d, k[t], d) * scale : NEG_INF;
  bool seen[RB];
  for (int r = 0; r < RB; ++r) {
    ExactRow& row = rows[r];
    float alpha;
    seen[r] = softmax_step(s[r], 0, 1, row.max, row.sum, alpha);
    if (seen[r] && alpha != 1.0f)
      for (int i = 0; i < d; ++i) row.acc[i] *= alpha, row.exact[i] *= alpha;
    if (!seen[r]) std::fill(s[r], s[r] + TILE, 0.0f);  // adds nothing below
  }
  int i = 0;
  for (; i + 16 <= d; i += 16) {  // 16 channels of each row in a register across the keys
    v16 e[RB];
    for (int r = 0; r < RB; ++r) e[r] = load_v16(rows[r].exact + i);
    for (int t = 0; t < n; ++t) {
      const v16 vv = load_v16(v[t] + i);
      for (int r = 0; r < RB; ++r) e[r] += s[r][t] * vv;
    }
    for (int r = 0; r < RB; ++r) store_v16(rows[r].exact + i, e[r]);
  }
  for (; i < d; ++i)
    for (int r = 0; r < RB; ++r)
      for (int t = 0; t < n; ++t) rows[r].exact[i] += s[r][t] * v[t][i];
}

// Merge the parts of one (request, head, token tile), fold in its exact keys (window ring and
// the step's fresh tokens, at positions >= each row's limit), finish and write the output.
// Exact key positions are contiguous ([ctx, ctx + win) in the ring, then the fresh tokens)
// and each token's range [max(from, ctx), own] moves forward with the token, so the keys and
// values of the whole tile's union of ranges are converted to floats once, for every row.
template <typename T16>
void finish_rows(const Problem& P, const Item* parts, int num_parts, float* scratch) {
  const Item& it = parts[0];
  const int g = int(P.group), d = int(P.d), rows = (it.t1 - it.t0) * g, nvg = P.vf.groups();
  const int64_t ctx = P.context_lens[it.r];
  const int64_t win = P.ring_k ? P.window_exact[it.r] : 0;
  const int64_t chunk_start = ctx + win, q0 = P.query_start[it.r];
  const int64_t rslot = P.ring_k ? P.window_slots[it.r] : 0;
  // the exact keys a token reads: positions [max(from, ctx), own position]
  auto exact_from = [&](int64_t token) {
    return std::max(ctx, std::max(row_limit(P, it.r, token), first_key(P, token)));
  };
  const int64_t base = exact_from(q0 + it.t0);
  const int64_t last = chunk_start + it.t1 - 1;  // the tile's last token's own position
  const int64_t span = std::max<int64_t>(0, last + 1 - base);
  static thread_local std::vector<float> kv_buf;
  kv_buf.resize(size_t(2 * span) * MAX_HEAD);
  auto* keys = reinterpret_cast<float (*)[MAX_HEAD]>(kv_buf.data());
  auto* values = keys + span;
  const T16* rk = static_cast<const T16*>(P.ring_k);
  const T16* rv = static_cast<const T16*>(P.ring_v);
  for (int64_t i = 0; i < span; ++i) {
    const int64_t pos = base + i;
    const T16 *k, *v;
    if (pos < chunk_start) {
      const int64_t at = (pos % P.ring_size) * P.r_pos + rslot * P.r_slot + it.h * P.r_head;
      k = rk + at, v = rv + at;
    } else {
      const int64_t j = q0 + (pos - chunk_start);
      k = static_cast<const T16*>(P.fresh_k) + j * P.fk_t + it.h * P.fk_h;
      v = static_cast<const T16*>(P.fresh_v) + j * P.fv_t + it.h * P.fv_h;
    }
    load16<T16>(k, d, keys[i]);
    load16<T16>(v, d, values[i]);
  }
  std::vector<float> row_buf(size_t(g) * 2 * d);
  std::vector<ExactRow> state(g);
  std::vector<float> q_rows(size_t(g) * d);
  for (int tt = 0; tt < it.t1 - it.t0; ++tt) {
    const int64_t token = q0 + it.t0 + tt;
    for (int gi = 0; gi < g; ++gi) {
      state[gi].acc = row_buf.data() + 2 * gi * d;
      state[gi].exact = state[gi].acc + d;
      merge_parts(parts, num_parts, scratch, rows, tt * g + gi, d, nvg, state[gi]);
    }
    const int64_t lo = exact_from(token) - base, hi = chunk_start + it.t0 + tt + 1 - base;
    for (int gi = 0; gi < g && lo < hi; ++gi)
      query_row<T16>(P, token, it.h * g + gi, q_rows.data() + gi * d);
    for (int64_t e0 = lo; e0 < hi; e0 += TILE) {
      const int n = int(std::min<int64_t>(TILE, hi - e0));
      auto fold = [&](auto rb, int m) {
        fold_exact_tile<decltype(rb)::value>(q_rows.data() + m * d, keys + e0, values + e0, n,
                                             d, P.scale, state.data() + m);
      };
      if (g <= 4) with_rows(g, [&](auto rb) { fold(rb, 0); });  // a token's rows at once
      else for_row_blocks<4>(0, g, fold);
    }
    for (int gi = 0; gi < g; ++gi) {
      ExactRow& row = state[gi];
      if (P.vf.rotate) unrotate(row.acc, P.vsigns + it.h * d, d);
      write_row<T16>(P, token, it.h * g + gi, row.acc, row.exact,
                     row.sum > 0.0f ? 1.0f / row.sum : 0.0f);
    }
  }
}

// Packed tokens per part: whole contexts when the (request, head, tile) groups already give
// every thread work; otherwise contexts are cut so there are about 4 parts per thread.
// (Every head group has the same requests, GQA group and lengths: P is any of them.)
int64_t auto_split(const Problem& P, int64_t heads) {
  const int tile_tokens = std::max(1, MAX_ROWS / int(P.group));
  int64_t groups = 0, longest = 0;
  for (int r = 0; r < P.requests; ++r) {
    const int tq = P.query_start[r + 1] - P.query_start[r];
    groups += heads * ((tq + tile_tokens - 1) / tile_tokens);
    longest = std::max<int64_t>(longest, P.context_lens[r] + tq);
  }
  const int64_t threads = at::get_num_threads();
  if (groups >= 2 * threads) return std::numeric_limits<int32_t>::max();
  const int64_t parts = (4 * threads + groups - 1) / std::max<int64_t>(groups, 1);
  return std::max<int64_t>(512, (longest + parts - 1) / parts);
}

// f(i) for i in [0, n) on every thread, the costliest first, each thread taking the next
// index when it is done. Work items differ in cost by orders of magnitude (a prompt's last
// token tile reads its whole chunk, its first almost nothing; decode rows sit beside prompt
// rows): at::parallel_for's equal contiguous ranges left one thread idle for up to half of a
// prompt chunk.
template <class Cost, class F>
void for_each_costliest_first(int64_t n, Cost&& cost, F&& f) {
  std::vector<int64_t> order(n), costs(n);
  for (int64_t i = 0; i < n; ++i) order[i] = i, costs[i] = cost(i);
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return costs[a] > costs[b]; });
  std::atomic<int64_t> next{0};
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n));
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    for (int64_t i; (i = next.fetch_add(1, std::memory_order_relaxed)) < n;) f(order[i]);
  });
}

// All head groups of a layer in one pass: one list of work items, one parallel loop.
template <typename T16>
void attend_impl(const std::vector<Problem>& groups, int64_t split_tokens) {
  const Problem& P0 = groups[0];
  int64_t heads = 0;
  for (const Problem& P : groups) heads += P.heads;
  if (split_tokens <= 0) split_tokens = auto_split(P0, heads);
  split_tokens = std::max<int64_t>(TILE, split_tokens / TILE * TILE);
  // Work items: (request, head group, KV head, token tile, packed part). Parts split long
  // contexts so every core has work at batch 1; tiles bound the rows sharing an unpacked key
  // tile.
  const int g = int(P0.group);
  const int tile_tokens = std::max(1, MAX_ROWS / g);
  std::vector<Item> items;
  std::vector<int64_t> first_part;  // index of each (r, group, h, tile)'s first item
  int64_t offset = 0;
  for (int r = 0; r < P0.requests; ++r) {
    const int tq = P0.query_start[r + 1] - P0.query_start[r];
    for (int grp = 0; grp < int(groups.size()); ++grp) {
      const Problem& P = groups[grp];
      const int nvg = P.vf.groups();
      for (int h = 0; h < P.heads; ++h)
        for (int t0 = 0; t0 < tq; t0 += tile_tokens) {
          const int t1 = std::min(tq, t0 + tile_tokens);
          int64_t packed = 0;
          for (int t = t0; t < t1; ++t)
            packed = std::max(packed, row_limit(P, r, P.query_start[r] + t));
          const int rows = (t1 - t0) * g;
          first_part.push_back(int64_t(items.size()));
          // tiles are 16-aligned positions, so one never crosses a block (bs % 16 == 0)
          const int64_t start = items_first_key(P, r, t0, t1) / TILE * TILE;
          for (int64_t p0 = start; p0 < std::max<int64_t>(packed, start + 1);
               p0 += split_tokens) {
            const int64_t p1 = std::min(packed, p0 + split_tokens);
            items.push_back(Item{grp, r, h, t0, t1, int32_t(p0), int32_t(p1), offset});
            offset += 2 * rows + rows * (P.d + nvg);
          }
        }
    }
  }
  first_part.push_back(int64_t(items.size()));
  // Every item writes its whole state before reading it. The buffer is the calling thread's,
  // kept between calls (a prompt chunk's states are megabytes: fresh pages every call cost
  // about a tenth of a prefill in page faults), grown to the largest step so far.
  static thread_local std::unique_ptr<float[]> scratch;
  static thread_local int64_t scratch_size = 0;
  if (offset > scratch_size) {
    scratch.reset(new float[offset]);
    scratch_size = offset;
  }
  float* const states = scratch.get();  // (inside the loops `scratch` is each thread's own)
  auto rows_of = [&](const Item& it) { return int64_t(it.t1 - it.t0) * g; };
  // A tile read in one part is finished by the same task, while its state (16 KB for 64 rows
  // at head size 64) is still in this core's cache: finishing every tile in a second pass
  // read the states, queries and fresh keys back from memory (a sixth of a prompt chunk's
  // attention). Tiles of several parts are merged in a second pass.
  std::vector<uint8_t> whole(items.size(), 0);
  std::vector<int64_t> merged;  // tiles of several parts
  for (size_t i = 0; i + 1 < first_part.size(); ++i) {
    if (first_part[i + 1] - first_part[i] == 1) whole[first_part[i]] = 1;
    else merged.push_back(int64_t(i));
  }
  for_each_costliest_first(
      int64_t(items.size()),
      [&](int64_t i) { return rows_of(items[i]) * (items[i].p1 - items[i].p0 + TILE); },
      [&](int64_t i) {
        const Problem& P = groups[items[i].grp];
        float* state = states + items[i].state;
        switch (P.d) {
          case 64: attend_packed<T16, 64>(P, items[i], state); break;
          case 128: attend_packed<T16, 128>(P, items[i], state); break;
          case 256: attend_packed<T16, 256>(P, items[i], state); break;
          default: attend_packed<T16, 0>(P, items[i], state);
        }
        if (whole[i]) finish_rows<T16>(P, &items[i], 1, states);
      });
  for_each_costliest_first(
      int64_t(merged.size()), [&](int64_t i) { return rows_of(items[first_part[merged[i]]]); },
      [&](int64_t i) {
        const int64_t tile = merged[i];
        const Item* parts = items.data() + first_part[tile];
        finish_rows<T16>(groups[parts->grp], parts,
                         int(first_part[tile + 1] - first_part[tile]), states);
      });
}

// A layer's head groups, from Python as GROUP_INTS ints each: [start, stop) of its KV heads,
// its slots' offset into a block (bytes per block-token: the group's region of a block starts
// at block_size * offset) and their size, then its key and value fields; and two optional
// tensors of rotation signs each ([heads of the group, D]: keys, values).
constexpr int GROUP_INTS = 14;
struct GroupSpec {
  int64_t start, stop, offset, slot_bytes;
  Field kf, vf;
  const float* ksigns;
  const float* vsigns;
};

const float* signs_ptr(const std::optional<at::Tensor>& s) {
  return s.has_value() && s->defined() ? s->data_ptr<float>() : nullptr;
}

std::vector<GroupSpec> parse_groups(const std::vector<int64_t>& ints,
                                    const std::vector<std::optional<at::Tensor>>& signs,
                                    int d, const at::Tensor& cache) {
  const int64_t n = int64_t(ints.size()) / GROUP_INTS;
  TORCH_CHECK(n > 0 && int64_t(ints.size()) == n * GROUP_INTS && int64_t(signs.size()) == 2 * n,
              "kvq_cpu: head groups are ", GROUP_INTS, " ints and two sign tensors each");
  TORCH_CHECK(cache.dim() == 4 && cache.scalar_type() == at::kByte && cache.stride(3) == 1 &&
                  cache.stride(2) == cache.size(3) && cache.stride(1) == cache.size(2) *
                  cache.size(3),
              "kvq_cpu: the cache must be [blocks, heads, block size, bytes] uint8 with "
              "contiguous blocks");
  const int64_t page = cache.size(1) * cache.size(3);  // bytes per block-token
  std::vector<GroupSpec> out;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t* x = ints.data() + i * GROUP_INTS;
    GroupSpec s{x[0], x[1], x[2], x[3],
                parse_field(std::vector<int64_t>(x + 4, x + 9), d),
                parse_field(std::vector<int64_t>(x + 9, x + 14), d),
                signs_ptr(signs[2 * i]), signs_ptr(signs[2 * i + 1])};
    TORCH_CHECK(0 <= s.start && s.start < s.stop && s.stop <= cache.size(1) &&
                    s.offset + (s.stop - s.start) * s.slot_bytes <= page,
                "kvq_cpu: head group ", i, " does not fit the cache's pages");
    TORCH_CHECK(!s.kf.rotate || s.ksigns, "kvq_cpu: rotated keys need their signs");
    TORCH_CHECK(!s.vf.rotate || s.vsigns, "kvq_cpu: rotated values need their signs");
    out.push_back(s);
  }
  return out;
}

template <typename T16>
void store_impl(const at::Tensor& key, const at::Tensor& value, at::Tensor& cache,
                const at::Tensor& slots, const std::vector<GroupSpec>& groups) {
  const int64_t n = std::min(slots.size(0), key.size(0)), bs = cache.size(2);
  const int64_t c_blk = cache.stride(0);
  std::vector<std::pair<int, int64_t>> heads;  // (group, head within it) of each stored head
  for (int gi = 0; gi < int(groups.size()); ++gi)
    for (int64_t h = 0; h < groups[gi].stop - groups[gi].start; ++h) heads.push_back({gi, h});
  const int64_t nh = int64_t(heads.size());
  const int64_t* slot = slots.data_ptr<int64_t>();
  const T16* k = static_cast<const T16*>(key.data_ptr());
  const T16* v = static_cast<const T16*>(value.data_ptr());
  uint8_t* base = cache.data_ptr<uint8_t>();
  const int64_t kt = key.stride(0), kh = key.stride(1), vt = value.stride(0),
                vh = value.stride(1);
  at::parallel_for(0, n * nh, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t t = i / nh, s = slot[t];
      if (s < 0) continue;  // padding
      const GroupSpec& G = groups[heads[i % nh].first];
      const int64_t h = heads[i % nh].second, head = G.start + h;
      const int d = G.kf.head;
      const int used = G.vf.offset + (G.vf.kind == RAW ? 2 * G.vf.head
                                                       : G.vf.code_bytes() + 4 * G.vf.groups());
      uint8_t* dst = base + (s / bs) * c_blk + (bs * G.offset) +
                     (h * bs + s % bs) * G.slot_bytes;
      encode_field<T16>(G.kf, k + t * kt + head * kh, G.ksigns ? G.ksigns + h * d : nullptr,
                        dst + G.kf.offset);
      encode_field<T16>(G.vf, v + t * vt + head * vh, G.vsigns ? G.vsigns + h * d : nullptr,
                        dst + G.vf.offset);
      std::memset(dst + used, 0, G.slot_bytes - used);
    }
  });
}

void store(const at::Tensor& key, const at::Tensor& value, at::Tensor cache,
           const at::Tensor& slot_mapping, std::vector<int64_t> group_ints,
           const std::vector<std::optional<at::Tensor>>& signs) {
  const int d = int(key.size(2));
  TORCH_CHECK(d <= MAX_HEAD && key.stride(2) == 1 && value.stride(2) == 1,
              "kvq_cpu.store: unsupported layout");
  const std::vector<GroupSpec> groups = parse_groups(group_ints, signs, d, cache);
  const at::Tensor slots = slot_mapping.to(at::kLong).contiguous();
  if (key.scalar_type() == at::kBFloat16)
    store_impl<c10::BFloat16>(key, value, cache, slots, groups);
  else if (key.scalar_type() == at::kHalf)
    store_impl<c10::Half>(key, value, cache, slots, groups);
  else
    TORCH_CHECK(false, "kvq_cpu.store: K/V must be bfloat16 or float16");
}

void attend(const at::Tensor& query, const at::Tensor& key,
            const at::Tensor& value, const at::Tensor& cache, const at::Tensor& block_table,
            const at::Tensor& context_lens, const at::Tensor& query_start,
            const std::optional<at::Tensor>& row_limits,
            const std::optional<at::Tensor>& first_keys, const std::optional<at::Tensor>& ring_k,
            const std::optional<at::Tensor>& ring_v,
            const std::optional<at::Tensor>& window_slots,
            const std::optional<at::Tensor>& window_exact, std::vector<int64_t> group_ints,
            const std::vector<std::optional<at::Tensor>>& signs, double scale,
            int64_t split_tokens, at::Tensor out) {
  Problem P{};
  P.d = query.size(2);
  TORCH_CHECK(P.d <= MAX_HEAD, "kvq_cpu: head size above ", MAX_HEAD);
  TORCH_CHECK(query.stride(2) == 1 && out.stride(2) == 1 && out.sizes() == query.sizes(),
              "kvq_cpu.attend: queries and output must be [tokens, query heads, head size] "
              "with contiguous rows");
  P.out_f32 = out.scalar_type() == at::kFloat;
  TORCH_CHECK(P.out_f32 || out.scalar_type() == key.scalar_type(),
              "kvq_cpu.attend: the output must be float32 or the K/V dtype");
  P.amx_parts = key.scalar_type() == at::kBFloat16 ? 2 : 3;  // "prompt chunks on AMX"
  for (const at::Tensor* t : {&block_table, &context_lens, &query_start})
    TORCH_CHECK(t->scalar_type() == at::kInt && t->is_contiguous(),
                "kvq_cpu.attend: block table and lengths must be contiguous int32");
  TORCH_CHECK(key.stride(2) == 1 && value.stride(2) == 1, "kvq_cpu.attend: unsupported layout");
  P.requests = context_lens.size(0);
  const int64_t heads = key.size(1);
  P.group = query.size(1) / heads;
  TORCH_CHECK(query.size(1) % heads == 0 && P.group <= MAX_ROWS,
              "kvq_cpu.attend: query heads per KV head must divide evenly and be at most ",
              MAX_ROWS, ", got ", query.size(1), " / ", heads);
  P.query_f32 = query.scalar_type() == at::kFloat;
  TORCH_CHECK(P.query_f32 || query.scalar_type() == key.scalar_type(),
              "kvq_cpu.attend: queries must be float32 or the K/V dtype");
  P.q_t = query.stride(0), P.q_h = query.stride(1), P.o_t = out.stride(0), P.o_h = out.stride(1);
  P.c_blk = cache.stride(0);
  P.block_size = cache.size(2);
  P.block_table = block_table.data_ptr<int32_t>();
  P.bt_stride = block_table.stride(0);
  P.context_lens = context_lens.data_ptr<int32_t>();
  P.query_start = query_start.data_ptr<int32_t>();
  P.row_limits = row_limits.has_value() && row_limits->defined()
                     ? row_limits->data_ptr<int32_t>() : nullptr;
  P.first_keys = first_keys.has_value() && first_keys->defined()
                     ? first_keys->data_ptr<int32_t>() : nullptr;
  P.fk_t = key.stride(0), P.fk_h = key.stride(1), P.fv_t = value.stride(0),
  P.fv_h = value.stride(1);
  if (ring_k.has_value() && ring_k->defined()) {
    TORCH_CHECK(ring_k->dim() == 4 && ring_k->stride(3) == 1 &&
                    ring_k->strides() == ring_v->strides() && ring_k->size(2) == heads &&
                    ring_k->scalar_type() == key.scalar_type() &&
                    ring_v->scalar_type() == key.scalar_type(),
                "kvq_cpu.attend: the window rings must be [slots, window, KV heads, D] with "
                "contiguous rows, equal strides and the model dtype");
    P.ring_size = ring_k->size(1);
    P.r_slot = ring_k->stride(0), P.r_pos = ring_k->stride(1), P.r_head = ring_k->stride(2);
    P.window_slots = window_slots->data_ptr<int32_t>();
    P.window_exact = window_exact->data_ptr<int32_t>();
  }
  P.scale = float(scale);
  const int64_t elem = key.element_size(), q_elem = query.element_size(),
                o_elem = out.element_size();
  std::vector<Problem> groups;
  for (const GroupSpec& G : parse_groups(group_ints, signs, int(P.d), cache)) {
    TORCH_CHECK(G.stop <= heads, "kvq_cpu.attend: a head group past the layer's KV heads");
    Problem Pg = P;  // the group's heads: every per-head pointer moved to its first one
    const int64_t q0 = G.start * P.group;
    Pg.heads = G.stop - G.start;
    Pg.query = static_cast<const char*>(query.data_ptr()) + q0 * P.q_h * q_elem;
    Pg.out = static_cast<char*>(out.data_ptr()) + q0 * P.o_h * o_elem;
    Pg.fresh_k = static_cast<const char*>(key.data_ptr()) + G.start * P.fk_h * elem;
    Pg.fresh_v = static_cast<const char*>(value.data_ptr()) + G.start * P.fv_h * elem;
    if (ring_k.has_value() && ring_k->defined()) {
      Pg.ring_k = static_cast<const char*>(ring_k->data_ptr()) + G.start * P.r_head * elem;
      Pg.ring_v = static_cast<const char*>(ring_v->data_ptr()) + G.start * P.r_head * elem;
    }
    Pg.cache = cache.data_ptr<uint8_t>() + P.block_size * G.offset;
    Pg.c_head = P.block_size * G.slot_bytes, Pg.c_slot = G.slot_bytes;
    Pg.slot_bytes = int(G.slot_bytes);
    Pg.kf = G.kf, Pg.vf = G.vf, Pg.ksigns = G.ksigns, Pg.vsigns = G.vsigns;
    groups.push_back(Pg);
  }
  if (key.scalar_type() == at::kBFloat16)
    attend_impl<c10::BFloat16>(groups, split_tokens);
  else if (key.scalar_type() == at::kHalf)
    attend_impl<c10::Half>(groups, split_tokens);
  else
    TORCH_CHECK(false, "kvq_cpu.attend: K/V must be bfloat16 or float16");
}

// The exact window's ring (vllm_kvq/window.py, ``write_ring``): token t's K/V [H, D] rows go
// to ring index positions[t] % R of ring slot slots[t] (a negative slot counts from the end,
// as torch indexing does: -1 is the spare slot that takes the tokens the ring does not keep).
// A memcpy per token and head: 3.4 us per layer of an 8-request decode step, where the torch
// version (two index_put_ and a remainder) took 16 us, 6% of the layer's attention.
void write_ring(at::Tensor ring_k, at::Tensor ring_v, const at::Tensor& key,
                const at::Tensor& value, const at::Tensor& slots, const at::Tensor& positions) {
  TORCH_CHECK(ring_k.dim() == 4 && ring_k.is_contiguous() && ring_v.is_contiguous() &&
                  ring_v.sizes() == ring_k.sizes() && key.dim() == 3 && value.dim() == 3 &&
                  key.stride(2) == 1 && value.stride(2) == 1 &&
                  key.scalar_type() == ring_k.scalar_type() &&
                  value.scalar_type() == ring_v.scalar_type() &&
                  key.size(1) == ring_k.size(2) && key.size(2) == ring_k.size(3) &&
                  value.size(1) == ring_v.size(2) && value.size(2) == ring_v.size(3),
              "kvq_cpu.write_ring: unsupported layout");
  const at::Tensor s = slots.to(at::kInt).contiguous(), p = positions.to(at::kInt).contiguous();
  const int64_t n = s.numel(), num_slots = ring_k.size(0), size = ring_k.size(1);
  TORCH_CHECK(p.numel() == n && key.size(0) >= n && value.size(0) >= n,
              "kvq_cpu.write_ring: ", n, " slots for ", p.numel(), " positions and ",
              key.size(0), " tokens");
  const int32_t* sp = s.data_ptr<int32_t>();
  const int32_t* pp = p.data_ptr<int32_t>();
  const int64_t heads = ring_k.size(2), esize = key.element_size();
  const int64_t row_bytes = ring_k.size(3) * esize;
  auto* rk = static_cast<uint8_t*>(ring_k.data_ptr());
  auto* rv = static_cast<uint8_t*>(ring_v.data_ptr());
  const auto* k = static_cast<const uint8_t*>(key.data_ptr());
  const auto* v = static_cast<const uint8_t*>(value.data_ptr());
  for (int64_t t = 0; t < n; ++t) {
    const int64_t slot = sp[t] < 0 ? sp[t] + num_slots : sp[t];
    TORCH_CHECK(slot >= 0 && slot < num_slots && pp[t] >= 0,
                "kvq_cpu.write_ring: slot ", sp[t], " position ", pp[t]);
    const int64_t row0 = (slot * size + pp[t] % size) * heads;
    for (int64_t h = 0; h < heads; ++h) {
      std::memcpy(rk + (row0 + h) * row_bytes,
                  k + (t * key.stride(0) + h * key.stride(1)) * esize, row_bytes);
      std::memcpy(rv + (row0 + h) * row_bytes,
                  v + (t * value.stride(0) + h * value.stride(1)) * esize, row_bytes);
    }
  }
}

bool int_dot_keys_op(std::vector<int64_t> key_fmt, int64_t head) {
  return int_dot_keys(parse_field(key_fmt, int(head)));
}

bool amx_prompts_op() {
#ifdef KVQ_AMX
  return amx_enabled();
#else
  return false;
#endif
}

// The threads a parallel loop of these kernels runs on: at::get_num_threads(), or 1 where the
// build lost OpenMP (at::parallel_for's pragma is compiled into this file: without -fopenmp
// every loop runs on the calling thread).
int64_t parallel_threads_op() {
  std::vector<int> ran(at::get_num_threads(), 0);
  at::parallel_for(0, int64_t(ran.size()), 1, [&](int64_t, int64_t) {
    ran[at::get_thread_num()] = 1;
  });
  return std::count(ran.begin(), ran.end(), 1);
}

}  // namespace kvq

TORCH_LIBRARY(kvq_cpu, m) {
  m.def("store(Tensor key, Tensor value, Tensor(a!) cache, Tensor slot_mapping, int[] groups, "
        "Tensor?[] signs) -> ()");
  m.def("int_dot_keys(int[] key_fmt, int head) -> bool", &kvq::int_dot_keys_op);
  m.def("amx_prompts() -> bool", &kvq::amx_prompts_op);
  m.def("parallel_threads() -> int", &kvq::parallel_threads_op);
  m.def("write_ring(Tensor(a!) ring_k, Tensor(b!) ring_v, Tensor key, Tensor value, "
        "Tensor slots, Tensor positions) -> ()");
  m.def("attend(Tensor query, Tensor key, Tensor value, Tensor cache, "
        "Tensor block_table, Tensor context_lens, Tensor query_start, Tensor? row_limits, "
        "Tensor? first_keys, "
        "Tensor? ring_k, Tensor? ring_v, Tensor? window_slots, Tensor? window_exact, "
        "int[] groups, Tensor?[] signs, float scale, int split_tokens, "
        "Tensor(b!) out) -> ()");
}

TORCH_LIBRARY_IMPL(kvq_cpu, CPU, m) {
  m.impl("store", &kvq::store);
  m.impl("attend", &kvq::attend);
  m.impl("write_ring", &kvq::write_ring);
}

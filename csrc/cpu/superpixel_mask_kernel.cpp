// superpixel_mask on the CPU: N perturbed copies of every image, one write pass.
//
// Per image the kept value and the baseline value of every pixel are prepared once (normalised
// and rounded to the output dtype when mean/std are given; a per-segment colour or a constant
// expanded to an image). The keep bits of 32 coalitions are packed into one word per pixel,
// and each (image, coalition) task writes every channel as a branch-free bitwise select of two
// cache-resident rows, so the output -- N times larger than anything read -- is written once,
// with streaming stores.
//
// With channels_last output the unit is the pixel instead of the row: image, baseline and
// output are [.., HW, C], each (image, coalition) task writes one contiguous HW * C run, and a
// pixel's keep bit selects its C consecutive values at once (select_pixels below).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "xai_serve.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace xai_serve {
namespace {

constexpr int kBits = 32;  // coalitions per bit word

// dst[p] = bit `bit` of words[p] ? a[p] : b[p], on the raw bits of values already in the output
// dtype; `b` is a row, or with kConstB one value (a constant baseline) for every pixel.
//
// On x86 the output is written with non-temporal (streaming) stores: it is far larger than any
// cache and never re-read here, and streaming stores skip reading each line before writing it.
// An AVX2 variant (compiled with a target attribute, picked at run time) halves the
// instructions per byte; the SSE2 one is the x86-64 baseline; other CPUs take the scalar loop.
template <typename bits_t, bool kConstB>
inline void select_scalar(bits_t* __restrict dst, const bits_t* __restrict a,
                          const bits_t* __restrict b, const uint32_t* __restrict words, int bit,
                          int64_t p, int64_t n) {
  for (; p < n; ++p) {
    const bits_t m = static_cast<bits_t>(0u - ((words[p] >> bit) & 1u));
    dst[p] = (a[p] & m) | ((kConstB ? b[0] : b[p]) & ~m);
  }
}

// Scalar steps until dst + p is `bytes`-aligned (or n is reached); returns the new p.
template <typename bits_t, bool kConstB>
inline int64_t select_head(bits_t* dst, const bits_t* a, const bits_t* b, const uint32_t* words,
                           int bit, int64_t n, uintptr_t bytes) {
  int64_t p = 0;
  while (p < n && (reinterpret_cast<uintptr_t>(dst + p) & (bytes - 1)) != 0) ++p;
  select_scalar<bits_t, kConstB>(dst, a, b, words, bit, 0, p);
  return p;
}

#if defined(__x86_64__)
template <typename bits_t, bool kConstB>
void select_row_sse2(bits_t* __restrict dst, const bits_t* __restrict a,
                     const bits_t* __restrict b, const uint32_t* __restrict words, int bit,
                     int64_t n) {
  constexpr int64_t kLanes = 16 / sizeof(bits_t);
  int64_t p = select_head<bits_t, kConstB>(dst, a, b, words, bit, n, 16);
  const __m128i to_top = _mm_cvtsi32_si128(31 - bit);
  const __m128i vb_const = sizeof(bits_t) == 4 ? _mm_set1_epi32(static_cast<int>(b[0]))
                                               : _mm_set1_epi16(static_cast<short>(b[0]));
  const auto mask4 = [&](int64_t q) {  // bit -> sign bit -> all ones / zeros, per 32-bit lane
    const __m128i w = _mm_loadu_si128(reinterpret_cast<const __m128i*>(words + q));
    return _mm_srai_epi32(_mm_sll_epi32(w, to_top), 31);
  };
  for (; p + kLanes <= n; p += kLanes) {
    __m128i m = mask4(p);
    if constexpr (sizeof(bits_t) == 2) m = _mm_packs_epi32(m, mask4(p + 4));
    const __m128i va = _mm_loadu_si128(reinterpret_cast<const __m128i*>(a + p));
    const __m128i vb =
        kConstB ? vb_const : _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + p));
    _mm_stream_si128(reinterpret_cast<__m128i*>(dst + p),
                     _mm_or_si128(_mm_and_si128(m, va), _mm_andnot_si128(m, vb)));
  }
  select_scalar<bits_t, kConstB>(dst, a, b, words, bit, p, n);
}

// The keep bit of 8 words -> sign bit -> all ones / zeros per 32-bit lane.
__attribute__((target("avx2"))) inline __m256i mask8_avx2(const uint32_t* words, __m128i to_top) {
  const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(words));
  return _mm256_srai_epi32(_mm256_sll_epi32(w, to_top), 31);
}

template <typename bits_t, bool kConstB>
__attribute__((target("avx2"))) void select_row_avx2(bits_t* __restrict dst,
                                                     const bits_t* __restrict a,
                                                     const bits_t* __restrict b,
                                                     const uint32_t* __restrict words, int bit,
                                                     int64_t n) {
  constexpr int64_t kLanes = 32 / sizeof(bits_t);
  int64_t p = select_head<bits_t, kConstB>(dst, a, b, words, bit, n, 32);
  const __m128i to_top = _mm_cvtsi32_si128(31 - bit);
  const __m256i vb_const = sizeof(bits_t) == 4 ? _mm256_set1_epi32(static_cast<int>(b[0]))
                                               : _mm256_set1_epi16(static_cast<short>(b[0]));
  for (; p + kLanes <= n; p += kLanes) {
    __m256i m = mask8_avx2(words + p, to_top);
    if constexpr (sizeof(bits_t) == 2) {
      // packs works per 128-bit half: [m0-3 m8-11 | m4-7 m12-15] -> reorder the 64-bit quarters
      m = _mm256_permute4x64_epi64(_mm256_packs_epi32(m, mask8_avx2(words + p + 8, to_top)),
                                   0xD8);
    }
    const __m256i va = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + p));
    const __m256i vb =
        kConstB ? vb_const : _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + p));
    _mm256_stream_si256(reinterpret_cast<__m256i*>(dst + p),
                        _mm256_or_si256(_mm256_and_si256(m, va), _mm256_andnot_si256(m, vb)));
  }
  select_scalar<bits_t, kConstB>(dst, a, b, words, bit, p, n);
}

bool cpu_has_avx2() {
  static const bool has = __builtin_cpu_supports("avx2");
  return has;
}
#endif

template <typename bits_t, bool kConstB>
void select_row(bits_t* __restrict dst, const bits_t* __restrict a, const bits_t* __restrict b,
                const uint32_t* __restrict words, int bit, int64_t n) {
#if defined(__x86_64__)
  if (cpu_has_avx2()) {
    select_row_avx2<bits_t, kConstB>(dst, a, b, words, bit, n);
  } else {
    select_row_sse2<bits_t, kConstB>(dst, a, b, words, bit, n);
  }
#else
  select_scalar<bits_t, kConstB>(dst, a, b, words, bit, 0, n);
#endif
}

// Channels_last rows: dst[p * C + c] = bit `bit` of words[p] ? a[p * C + c] : b[p * C + c]
// for the n pixels of a row; with kConstB, b holds C values (one per channel) for every pixel.
template <typename bits_t, bool kConstB>
inline void select_pixels_scalar(bits_t* __restrict dst, const bits_t* __restrict a,
                                 const bits_t* __restrict b, const uint32_t* __restrict words,
                                 int bit, int64_t C, int64_t p, int64_t n) {
  for (; p < n; ++p) {
    const bits_t m = static_cast<bits_t>(0u - ((words[p] >> bit) & 1u));
    for (int64_t c = 0; c < C; ++c) {
      const int64_t e = p * C + c;
      dst[e] = (a[e] & m) | ((kConstB ? b[c] : b[e]) & ~m);
    }
  }
}

// The vector unit of a channels_last row is a group of kGroup pixels: kGroup * C values, that
// is C * sizeof(bits_t) / 2 vectors of 32 bytes, always starting at channel 0. Per group the
// keep bits of the 16 pixels become 16 mask bytes (0x00 / 0xFF) in both 128-bit halves of a
// register; one byte shuffle per output vector spreads each pixel's byte over the bytes of its
// C values. The shuffle indices (and a constant baseline's channel pattern) depend only on C
// and the dtype, so they are built once per call.
constexpr int64_t kGroup = 16;

struct PixelTables {
  int64_t vecs = 0;               // 32-byte vectors per group of kGroup pixels
  std::vector<uint8_t> shuffle;   // vecs * 32 byte-shuffle indices into the pixel mask bytes
  std::vector<uint8_t> constant;  // vecs * 32 bytes: a constant baseline's values, channel-cycled
};

// The byte of pixel q (0..15) in the mask register built by select_pixels_avx2: the two packs
// leave pixels 0-3, 8-11, 4-7, 12-15 in that order (bits 2 and 3 of q swapped).
inline uint8_t pixel_mask_byte(int64_t q) {
  return static_cast<uint8_t>((q & 3) | ((q & 4) << 1) | ((q & 8) >> 1));
}

template <typename bits_t>
PixelTables pixel_tables(int64_t C, const bits_t* constant) {
  PixelTables t;
  t.vecs = C * static_cast<int64_t>(sizeof(bits_t)) / 2;
  t.shuffle.resize(t.vecs * 32);
  for (int64_t byte = 0; byte < t.vecs * 32; ++byte) {
    t.shuffle[byte] = pixel_mask_byte(byte / static_cast<int64_t>(sizeof(bits_t)) / C);
  }
  if (constant != nullptr) {
    t.constant.resize(t.vecs * 32);
    bits_t* values = reinterpret_cast<bits_t*>(t.constant.data());
    for (int64_t e = 0; e < kGroup * C; ++e) values[e] = constant[e % C];
  }
  return t;
}

#if defined(__x86_64__)
template <typename bits_t, bool kConstB>
__attribute__((target("avx2"))) void select_pixels_avx2(bits_t* __restrict dst,
                                                        const bits_t* __restrict a,
                                                        const bits_t* __restrict b,
                                                        const uint32_t* __restrict words,
                                                        int bit, int64_t C, int64_t n,
                                                        const PixelTables& t) {
  constexpr int64_t kLanes = 32 / sizeof(bits_t);
  // Scalar pixels until a pixel starts on a 32-byte boundary: a row's first pixel is a multiple
  // of C values past an aligned allocation, so one of the next 16 pixels does.
  int64_t p = 0;
  while (p < n && (reinterpret_cast<uintptr_t>(dst + p * C) & 31) != 0) ++p;
  select_pixels_scalar<bits_t, kConstB>(dst, a, b, words, bit, C, 0, p);
  const __m128i to_top = _mm_cvtsi32_si128(31 - bit);
  const int64_t vecs = t.vecs;
  const uint8_t* shuffle = t.shuffle.data();
  const uint8_t* constant = t.constant.data();
  for (; p + kGroup <= n; p += kGroup) {
    // 16 pixel masks as bytes, in both halves: [0-3 8-11 4-7 12-15 | the same].
    const __m256i m16 =
        _mm256_packs_epi32(mask8_avx2(words + p, to_top), mask8_avx2(words + p + 8, to_top));
    const __m256i pixels = _mm256_permute4x64_epi64(_mm256_packs_epi16(m16, m16), 0x88);
    const int64_t e = p * C;
    for (int64_t v = 0; v < vecs; ++v) {
      const __m256i m = _mm256_shuffle_epi8(
          pixels, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(shuffle + 32 * v)));
      const __m256i va = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + e + v * kLanes));
      const __m256i vb =
          kConstB ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(constant + 32 * v))
                  : _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + e + v * kLanes));
      _mm256_stream_si256(reinterpret_cast<__m256i*>(dst + e + v * kLanes),
                          _mm256_blendv_epi8(vb, va, m));
    }
  }
  select_pixels_scalar<bits_t, kConstB>(dst, a, b, words, bit, C, p, n);
}
#endif

template <typename bits_t, bool kConstB>
void select_pixels(bits_t* __restrict dst, const bits_t* __restrict a, const bits_t* __restrict b,
                   const uint32_t* __restrict words, int bit, int64_t C, int64_t n,
                   const PixelTables& t) {
#if defined(__x86_64__)
  if (cpu_has_avx2()) {
    select_pixels_avx2<bits_t, kConstB>(dst, a, b, words, bit, C, n, t);
    return;
  }
#endif
  (void)t;
  select_pixels_scalar<bits_t, kConstB>(dst, a, b, words, bit, C, 0, n);
}

template <typename scalar_t>
scalar_t normalised(float v, int64_t c, const float* mean, const float* std) {
  return static_cast<scalar_t>(mean ? (v - mean[c]) / std[c] : v);
}

// `nhwc`: images, an image baseline and out are channels_last (value (c, p) of image b at
// (b * HW + p) * C + c), else NCHW (at (b * C + c) * HW + p). The prepared kept / dropped values
// take the output's layout, so every output row is a select of rows with the same indexing.
template <typename scalar_t, typename index_t>
void superpixel_mask_impl(const at::Tensor& images, const at::Tensor& segments,
                          const at::Tensor& keep, const std::optional<at::Tensor>& baseline,
                          BaselineMode mode, double fill, const std::optional<at::Tensor>& mean,
                          const std::optional<at::Tensor>& std, bool nhwc, at::Tensor& out) {
  using bits_t = std::conditional_t<sizeof(scalar_t) == 4, uint32_t, uint16_t>;
  static_assert(sizeof(bits_t) == sizeof(scalar_t), "unsupported element size");
  const int64_t B = images.size(0), C = images.size(1);
  const int64_t HW = images.size(2) * images.size(3);
  const int64_t N = keep.size(1), S = keep.size(2);
  const int64_t c_stride = nhwc ? 1 : HW, p_stride = nhwc ? C : 1;

  const scalar_t* img = images.const_data_ptr<scalar_t>();
  const index_t* seg = segments.const_data_ptr<index_t>();
  const uint8_t* kp = static_cast<const uint8_t*>(keep.const_data_ptr());
  const float* mu = mean ? mean->const_data_ptr<float>() : nullptr;
  const float* sd = std ? std->const_data_ptr<float>() : nullptr;
  const scalar_t* base = baseline ? baseline->const_data_ptr<scalar_t>() : nullptr;

  // Kept values: the image itself, or its normalised copy.
  const scalar_t* kept = img;
  std::vector<scalar_t> kept_buf;
  if (mu) {
    kept_buf.resize(B * C * HW);
    at::parallel_for(0, B * C, 1, [&](int64_t begin, int64_t end) {
      for (int64_t bc = begin; bc < end; ++bc) {
        const int64_t c = bc % C;
        const int64_t o = (bc / C) * C * HW + c * c_stride;
        for (int64_t p = 0; p < HW; ++p) {
          const int64_t i = o + p * p_stride;
          kept_buf[i] = normalised<scalar_t>(static_cast<float>(img[i]), c, mu, sd);
        }
      }
    });
    kept = kept_buf.data();
  }
  // Dropped values in the output dtype: one value per channel for a constant baseline, else a
  // full [B, C, HW] image (a per-segment colour expanded once per image, not per coalition).
  const bool constant = mode == BaselineMode::kConstant;
  const scalar_t* dropped = base;
  std::vector<scalar_t> drop_buf;
  if (constant) {
    drop_buf.resize(C);
    for (int64_t c = 0; c < C; ++c) {
      drop_buf[c] = normalised<scalar_t>(static_cast<float>(fill), c, mu, sd);
    }
    dropped = drop_buf.data();
  } else if (mode == BaselineMode::kPerSegment || mu) {
    drop_buf.resize(B * C * HW);
    at::parallel_for(0, B * C, 1, [&](int64_t begin, int64_t end) {
      for (int64_t bc = begin; bc < end; ++bc) {
        const int64_t b = bc / C, c = bc % C;
        const int64_t o = b * C * HW + c * c_stride;
        for (int64_t p = 0; p < HW; ++p) {
          const int64_t i = o + p * p_stride;
          float v;
          if (mode == BaselineMode::kImage) {
            v = static_cast<float>(base[i]);
          } else {
            const int64_t s = static_cast<int64_t>(seg[b * HW + p]);
            v = (s >= 0 && s < S) ? static_cast<float>(base[bc * S + s]) : static_cast<float>(fill);
          }
          drop_buf[i] = normalised<scalar_t>(v, c, mu, sd);
        }
      }
    });
    dropped = drop_buf.data();
  }

  bits_t* dst = reinterpret_cast<bits_t*>(out.data_ptr<scalar_t>());
  const bits_t* kept_bits = reinterpret_cast<const bits_t*>(kept);
  const bits_t* drop_bits = reinterpret_cast<const bits_t*>(dropped);
  const PixelTables tables =
      nhwc ? pixel_tables<bits_t>(C, constant ? drop_bits : nullptr) : PixelTables{};
  // Per image: words[chunk, p] holds, for coalitions chunk*32 .. chunk*32+31, whether pixel p
  // is kept (one bit each), built from a transposed keep table in one pass over the segment
  // ids per 32 coalitions. Then every (coalition, channel) row -- or with channels_last every
  // coalition's HW * C run -- is one select of two cache-resident rows by one bit of these words.
  const int64_t chunks = (N + kBits - 1) / kBits;
  std::vector<uint32_t> words(chunks * HW);
  for (int64_t b = 0; b < B; ++b) {
    at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
      std::vector<uint32_t> table(S);
      for (int64_t ch = begin; ch < end; ++ch) {
        std::fill(table.begin(), table.end(), 0u);
        const int64_t n_end = std::min<int64_t>(N, (ch + 1) * kBits);
        for (int64_t n = ch * kBits; n < n_end; ++n) {
          const uint8_t* row = kp + (b * N + n) * S;
          const uint32_t flag = 1u << (n - ch * kBits);
          for (int64_t s = 0; s < S; ++s) table[s] |= row[s] != 0 ? flag : 0u;
        }
        const index_t* sb = seg + b * HW;
        uint32_t* w = words.data() + ch * HW;
        for (int64_t p = 0; p < HW; ++p) {
          const int64_t s = static_cast<int64_t>(sb[p]);
          w[p] = (s >= 0 && s < S) ? table[s] : 0u;  // unchecked bad ids: never kept
        }
      }
    });
    // Grain: one coalition writes C*HW elements, enough work per task.
    at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        const uint32_t* w = words.data() + (n / kBits) * HW;
        const int bit = static_cast<int>(n % kBits);
        if (nhwc) {
          bits_t* row = dst + (b * N + n) * C * HW;
          const bits_t* keep_row = kept_bits + b * C * HW;
          if (constant) {
            select_pixels<bits_t, true>(row, keep_row, drop_bits, w, bit, C, HW, tables);
          } else {
            select_pixels<bits_t, false>(row, keep_row, drop_bits + b * C * HW, w, bit, C, HW,
                                         tables);
          }
          continue;
        }
        for (int64_t c = 0; c < C; ++c) {
          bits_t* row = dst + ((b * N + n) * C + c) * HW;
          const bits_t* keep_row = kept_bits + (b * C + c) * HW;
          if (constant) {
            select_row<bits_t, true>(row, keep_row, drop_bits + c, w, bit, HW);
          } else {
            select_row<bits_t, false>(row, keep_row, drop_bits + (b * C + c) * HW, w, bit, HW);
          }
        }
      }
#if defined(__x86_64__)
      _mm_sfence();  // streaming stores are weakly ordered: publish them before the join
#endif
    });
  }
}

at::Tensor superpixel_mask_cpu(const at::Tensor& images, const at::Tensor& segments,
                               const at::Tensor& keep, const std::optional<at::Tensor>& baseline,
                               double fill, const std::optional<at::Tensor>& mean,
                               const std::optional<at::Tensor>& std, bool check_segments,
                               bool channels_last) {
  const BaselineMode mode = check_superpixel_mask(images, segments, keep, baseline, mean, std);
  const int64_t B = images.size(0), C = images.size(1), H = images.size(2), W = images.size(3);
  const int64_t N = keep.size(1), S = keep.size(2);
  if (check_segments) check_segment_range(segments, S, "superpixel_mask");
  const auto format =
      channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  at::Tensor out = at::empty({B * N, C, H, W}, images.options().memory_format(format));
  if (out.numel() == 0) return out;

  // The image and an image baseline are read in the output's layout (no copy when they are
  // already in it); with one channel both layouts are the same memory, and the row select is
  // the faster loop.
  const at::Tensor img = images.contiguous(format);
  const at::Tensor seg = segments.contiguous();
  const at::Tensor kp = keep.contiguous();
  const bool nhwc = channels_last && C > 1;
  std::optional<at::Tensor> base, mu, sd;
  if (baseline) {
    base = mode == BaselineMode::kImage ? baseline->contiguous(format) : baseline->contiguous();
  }
  if (mean) mu = mean->contiguous();
  if (std) sd = std->contiguous();
  XAI_SERVE_DISPATCH_FLOATS(img.scalar_type(), "superpixel_mask_cpu", [&] {
    if (seg.scalar_type() == at::kInt) {
      superpixel_mask_impl<scalar_t, int32_t>(img, seg, kp, base, mode, fill, mu, sd, nhwc, out);
    } else {
      superpixel_mask_impl<scalar_t, int64_t>(img, seg, kp, base, mode, fill, mu, sd, nhwc, out);
    }
  });
  return out;
}

}  // namespace
}  // namespace xai_serve

TORCH_LIBRARY_IMPL(xai_serve, CPU, m) {
  m.impl("superpixel_mask", &xai_serve::superpixel_mask_cpu);
}

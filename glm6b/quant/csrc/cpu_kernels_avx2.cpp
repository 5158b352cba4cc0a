// CPU kernels for THUDM's weight-only int4 / int8 layers on CPUs with AVX2 + FMA + F16C and no
// AVX512-BF16 (AMD Zen 2 / Zen 3, Intel Haswell to Ice Lake client): float32 arithmetic.
//
// The weights are THUDM's bytes as they are (see cpu_kernels.cpp): int8 [N, K], or int4 [N, K / 2]
// with column 2c in the high nibble of byte c and column 2c + 1 in the low one (two's complement),
// one float16 scale per output row. Activations are float32, bfloat16 or float16 (x_dtype 0, 1, 2);
// they are converted to float32 once per call, and y is written in the same dtype.
//
// glm6b_avx2_matmul: y[M, N] = x[M, K] @ (q * scale)^T for a few rows (decoding). A tile of weight
// rows is unpacked to float32 in registers 16 columns at a time and multiplied with every input row
// (FMA, float32 sums), so M rows cost far less than M times one row; the row scale is applied to the
// sum. The same products take a bfloat16 weight (kind 16, no scale): a bfloat16 lm_head.
// glm6b_avx2_dequantize: float32 rows of q * scale, for a prefill: the caller multiplies them with the
// float32 GEMM, a block of rows at a time (a CPU without bfloat16 units has no faster product).
// glm6b_avx2_matmul_q8: the same product with the activations quantized per row to int8 (opt-in: it
// changes results), multiplied in integers with vpmaddubsw / vpmaddwd, as ggml does for q4_0 x q8_0.
//
// cpu_kernels.cpp holds the AVX512-BF16 / AMX kernels; glm6b/quant/cpu_kernels.py compiles both files
// into one library and uses these only where those are not built.

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#include <omp.h>

namespace {

constexpr int64_t GROUP = 16;      // columns per step: two vectors of 8 floats
constexpr int64_t K_MULTIPLE = 64;  // the in_features the kernels take (as the AVX-512 ones)
enum Kind { INT4 = 4, INT8 = 8, BF16 = 16 };
enum XDtype { X_F32 = 0, X_BF16 = 1, X_F16 = 2 };

inline float bf16_to_f32(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

inline uint16_t f32_to_bf16(float f) {  // round to nearest even (no NaN inputs here)
    uint32_t bits;
    memcpy(&bits, &f, 4);
    bits += 0x7FFF + ((bits >> 16) & 1);
    return (uint16_t)(bits >> 16);
}

inline float load_x(const void* x, int dtype, int64_t i) {
    if (dtype == X_F32) return ((const float*)x)[i];
    if (dtype == X_BF16) return bf16_to_f32(((const uint16_t*)x)[i]);
    return _cvtsh_ss(((const uint16_t*)x)[i]);
}

inline void store_y(void* y, int dtype, int64_t i, float v) {
    if (dtype == X_F32) ((float*)y)[i] = v;
    else if (dtype == X_BF16) ((uint16_t*)y)[i] = f32_to_bf16(v);
    else ((uint16_t*)y)[i] = _cvtss_sh(v, _MM_FROUND_TO_NEAREST_INT);
}

// The activations as float32 [M, K], in the order load_weights unpacks each group of 16 columns in: for
// int4 and bfloat16 weights the 8 even columns, then the 8 odd ones; for int8 the natural order.
// nullptr without memory.
float* activations_f32(const void* x, int dtype, int64_t M, int64_t K, bool even_odd) {
    float* xf = (float*)aligned_alloc(32, (size_t)(M * K * 4 + 31) / 32 * 32);
    if (!xf) return nullptr;
    for (int64_t m = 0; m < M; ++m)
        for (int64_t g = 0; g < K; g += GROUP)
            for (int i = 0; i < GROUP; ++i) {
                const int64_t column = even_odd ? g + (i < 8 ? 2 * i : 2 * (i - 8) + 1) : g + i;
                xf[m * K + g + i] = load_x(x, dtype, m * K + column);
            }
    return xf;
}

// Columns [16 g, 16 g + 16) of a weight row as two float32 vectors (order: see activations_f32).
template <int KIND, bool SCALED = false>
inline void load_weights(const int8_t* row, int64_t g, __m256& a, __m256& b) {
    if constexpr (KIND == INT4 && SCALED) {
        // The nibbles left where they are, converted as 16 x (high) and 2^28 x (low) their values (exact):
        // one shift fewer than below, on the two pipes that also widen the bytes. The caller scales the
        // sums back (by powers of two: exact too).
        const __m256i v = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(row + g * 8)));
        a = _mm256_cvtepi32_ps(_mm256_and_si256(v, _mm256_set1_epi32(~0xF)));  // 16 x columns 2c
        b = _mm256_cvtepi32_ps(_mm256_slli_epi32(v, 28));                      // 2^28 x columns 2c + 1
    } else if constexpr (KIND == INT4) {
        // Each byte sign-extended to 32 bits: the high nibble is an arithmetic shift away, the low one two.
        const __m256i v = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(row + g * 8)));
        a = _mm256_cvtepi32_ps(_mm256_srai_epi32(v, 4));                          // columns 2c
        b = _mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_slli_epi32(v, 28), 28));  // columns 2c + 1
    } else if constexpr (KIND == INT8) {
        a = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(row + g * 16))));
        b = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(row + g * 16 + 8))));
    } else {
        // bfloat16 pairs in 32-bit lanes: the odd column is the high half (already a float32 with
        // its low bits cleared), the even one the low half shifted up.
        const __m256i v = _mm256_loadu_si256((const __m256i*)(row + g * 32));
        a = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
        b = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32((int)0xFFFF0000)));
    }
}

inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

// sums[m][t] = x[m] . w[t] for MB input rows and NT weight rows: each group of weights is unpacked once
// for all MB rows. With fewer than 8 sums the two halves of a group go to separate accumulators, so
// that enough FMAs are independent to keep both FMA units busy.
template <int KIND, int MB, int NT>
inline void tile(const float* x, int64_t K, const int8_t* w, int64_t row_bytes, float* sums) {
    constexpr int SPLIT = MB * NT < 8 ? 2 : 1;
    constexpr bool SCALED = KIND == INT4 && SPLIT == 2;  // the halves' sums are apart: scale them at the end
    constexpr int64_t group_bytes = KIND * GROUP / 8;
    __m256 acc[SPLIT][MB][NT];
    for (int s = 0; s < SPLIT; ++s)
        for (int m = 0; m < MB; ++m)
            for (int t = 0; t < NT; ++t) acc[s][m][t] = _mm256_setzero_ps();
    const int64_t groups = K / GROUP;
    for (int64_t g = 0; g < groups; ++g) {
        for (int t = 0; t < NT; ++t) {
            // The same place in the next tile's rows, which this thread reads next (static schedule):
            // with NT rows read side by side the hardware prefetchers alone fell behind.
            if (g % (64 / group_bytes) == 0)
                _mm_prefetch((const char*)(w + (NT + t) * row_bytes + g * group_bytes), _MM_HINT_T0);
            __m256 a, b;
            load_weights<KIND, SCALED>(w + t * row_bytes, g, a, b);
            for (int m = 0; m < MB; ++m) {
                const float* xm = x + m * K + g * GROUP;
                acc[0][m][t] = _mm256_fmadd_ps(a, _mm256_load_ps(xm), acc[0][m][t]);
                acc[SPLIT - 1][m][t] = _mm256_fmadd_ps(b, _mm256_load_ps(xm + 8), acc[SPLIT - 1][m][t]);
            }
        }
    }
    for (int m = 0; m < MB; ++m)
        for (int t = 0; t < NT; ++t) {
            if (SCALED) sums[m * NT + t] = hsum(acc[0][m][t]) * 0.0625f + hsum(acc[1][m][t]) * 0x1p-28f;
            else if (SPLIT == 2) sums[m * NT + t] = hsum(_mm256_add_ps(acc[0][m][t], acc[SPLIT - 1][m][t]));
            else sums[m * NT + t] = hsum(acc[0][m][t]);
        }
}

// Weight rows per tile for MB input rows: as many as keep the MB x NT sums and two weight vectors in
// the 16 vector registers (4 x 3, 4 input rows a pass, measured fastest for 8 rows). The integer
// products of the int8-activation path below use the same tiles.
constexpr int tile_rows(int mb) { return mb <= 2 ? 4 : 3; }
constexpr int MAX_BLOCK = 4;  // input rows per pass over a tile (more: several passes, weights hot in cache)

// The float32 products: activations from activations_f32, sums as they are.
template <int KIND>
struct FloatProducts {
    using Sum = float;
    const float* x;
    template <int MB, int NT>
    void tile(int64_t m0, int64_t K, const int8_t* w, int64_t row_bytes, Sum* sums) const {
        ::tile<KIND, MB, NT>(x + m0 * K, K, w, row_bytes, sums);
    }
    float value(int64_t m, Sum sum) const { return sum; }
};

// Input rows [m0, m0 + MB) against the weight rows [n, n + nt): tiles of tile_rows(MB) rows, then single
// rows; y = the product's value times the row scale (none for bfloat16 weights).
template <class Products, int MB>
void rows_block(const Products& products, int64_t K, const int8_t* w, int64_t row_bytes, const uint16_t* scale,
                void* y, int dtype, int64_t N, int64_t n, int64_t nt, int64_t m0) {
    constexpr int T = tile_rows(MB);
    typename Products::Sum sums[MB * T];
    for (int64_t t0 = 0; t0 < nt;) {
        const int64_t step = nt - t0 >= T ? T : 1;
        const int8_t* rows = w + (n + t0) * row_bytes;
        if (step == T) products.template tile<MB, T>(m0, K, rows, row_bytes, sums);
        else products.template tile<MB, 1>(m0, K, rows, row_bytes, sums);
        for (int m = 0; m < MB; ++m)
            for (int64_t t = 0; t < step; ++t) {
                const float s = scale ? _cvtsh_ss(scale[n + t0 + t]) : 1.0f;
                store_y(y, dtype, (m0 + m) * N + n + t0 + t, products.value(m0 + m, sums[m * step + t]) * s);
            }
        t0 += step;
    }
}

// All input rows, in passes of up to MAX_BLOCK (the weight rows stay in cache between passes), against
// the weight rows [n, n + nt).
template <class Products>
void all_rows(const Products& products, int64_t M, int64_t K, const int8_t* w, int64_t row_bytes,
              const uint16_t* scale, void* y, int dtype, int64_t N, int64_t n, int64_t nt) {
    for (int64_t m0 = 0; m0 < M; m0 += MAX_BLOCK) {
        const int64_t mb = M - m0 < MAX_BLOCK ? M - m0 : MAX_BLOCK;
#define BLOCK(R) rows_block<Products, R>(products, K, w, row_bytes, scale, y, dtype, N, n, nt, m0)
        switch (mb) {
            case 1: BLOCK(1); break;
            case 2: BLOCK(2); break;
            case 3: BLOCK(3); break;
            default: BLOCK(4); break;
        }
#undef BLOCK
    }
}

// The weight rows in tiles split between the threads, the rest one by one.
template <class Products>
void all_tiles(const Products& products, int64_t M, int64_t K, const int8_t* w, int64_t row_bytes,
               const uint16_t* scale, int64_t N, void* y, int dtype, int threads) {
    // One tile size for the whole call (that of the first pass of rows), so tiles split evenly.
    const int64_t first = M < MAX_BLOCK ? M : MAX_BLOCK;
    const int64_t nt = tile_rows((int)first);
    const int64_t tiles = N / nt;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t i = 0; i < tiles; ++i) all_rows(products, M, K, w, row_bytes, scale, y, dtype, N, i * nt, nt);
    for (int64_t n = tiles * nt; n < N; ++n) all_rows(products, M, K, w, row_bytes, scale, y, dtype, N, n, 1);
}

// Returns 0, or -1 without memory for the activations.
template <int KIND>
int matmul(const void* x, int dtype, int64_t M, int64_t K, const int8_t* w, const uint16_t* scale, int64_t N,
           void* y, int threads) {
    float* xf = activations_f32(x, dtype, M, K, KIND != INT8);
    if (!xf) return -1;
    all_tiles(FloatProducts<KIND>{xf}, M, K, w, K * KIND / 8, KIND == BF16 ? nullptr : scale, N, y, dtype, threads);
    free(xf);
    return 0;
}

template <int KIND>
void dequantize(const int8_t* w, const uint16_t* scale, int64_t N, int64_t K, float* out, int threads) {
    const int64_t row_bytes = K * KIND / 8;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t n = 0; n < N; ++n) {
        const int8_t* row = w + n * row_bytes;
        float* dst = out + n * K;
        const __m256 s = _mm256_set1_ps(_cvtsh_ss(scale[n]));
        if constexpr (KIND == INT4) {
            for (int64_t c = 0; c < K / 2; c += 8) {  // 8 bytes: 16 columns
                const __m256i v = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(row + c)));
                const __m256 high = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_srai_epi32(v, 4)), s);
                const __m256 low = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_slli_epi32(v, 28), 28)), s);
                // interleave back to column order: [h0 l0 h1 l1 ...]
                const __m256 lo_half = _mm256_unpacklo_ps(high, low);  // h0 l0 h1 l1 | h4 l4 h5 l5
                const __m256 hi_half = _mm256_unpackhi_ps(high, low);  // h2 l2 h3 l3 | h6 l6 h7 l7
                _mm256_storeu_ps(dst + 2 * c, _mm256_permute2f128_ps(lo_half, hi_half, 0x20));
                _mm256_storeu_ps(dst + 2 * c + 8, _mm256_permute2f128_ps(lo_half, hi_half, 0x31));
            }
        } else {
            for (int64_t k = 0; k < K; k += 8) {
                const __m256i v = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(row + k)));
                _mm256_storeu_ps(dst + k, _mm256_mul_ps(_mm256_cvtepi32_ps(v), s));
            }
        }
    }
}

// ------------------------------------------------------------------------- int8 activations
// Each input row is quantized to int8 with its own scale (max |x| / 127, rounded to nearest), and the
// products are integer: vpmaddubsw multiplies unsigned bytes by signed ones and adds neighbouring pairs
// into 16 bits, vpmaddwd adds pairs of those into 32 bits. THUDM's scale is one per row, so the integer
// sums run over the whole row and are scaled once.
// int4: the weights enter as unsigned u = q + 8 (0..15; x's column sums take the 8 back out), 64 columns
// a step ([32 even, 32 odd], the activations reordered to match); two steps of pair sums (at most
// 4 x 2 x 15 x 127 = 15240) stay within 16 bits before vpmaddwd widens them.
// int8: |q| unsigned and the sign moved onto x (vpsignb), 32 columns a step, widened every step (a pair
// of products reaches 2 x 127 x 127 = 32258).

struct QuantizedRows {
    int8_t* q;        // [M, K], for int4 in the order of its 64-column steps
    float* scale;     // [M]
    int32_t* sums;    // [M]: sum of q over the row (the int4 offset)
};

void free_rows(QuantizedRows& r) {
    free(r.q);
    free(r.scale);
    free(r.sums);
}

// r.q == nullptr without memory.
QuantizedRows quantize_rows(const void* x, int dtype, int64_t M, int64_t K, bool even_odd) {
    QuantizedRows r;
    r.q = (int8_t*)aligned_alloc(32, (size_t)(M * K + 31) / 32 * 32);
    r.scale = (float*)malloc(M * sizeof(float));
    r.sums = (int32_t*)malloc(M * sizeof(int32_t));
    if (!r.q || !r.scale || !r.sums) {
        free_rows(r);
        r.q = nullptr;
        return r;
    }
    for (int64_t m = 0; m < M; ++m) {
        float amax = 0.0f;
        for (int64_t k = 0; k < K; ++k) {
            const float v = load_x(x, dtype, m * K + k);
            amax = v > amax ? v : (-v > amax ? -v : amax);
        }
        const float scale = amax / 127.0f;
        const float inverse = amax > 0.0f ? 127.0f / amax : 0.0f;
        int32_t total = 0;
        for (int64_t g = 0; g < K; g += 64)
            for (int i = 0; i < 64; ++i) {
                const int64_t column = even_odd ? g + (i < 32 ? 2 * i : 2 * (i - 32) + 1) : g + i;
                const int q = (int)nearbyintf(load_x(x, dtype, m * K + column) * inverse);
                r.q[m * K + g + i] = (int8_t)q;
                total += q;
            }
        r.scale[m] = scale;
        r.sums[m] = total;
    }
    return r;
}

inline int32_t hsum_epi32(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
    return _mm_cvtsi128_si32(s);
}

template <int BITS, int MB, int NT>
inline void q8_tile(const int8_t* xq, int64_t K, const int8_t* w, int64_t row_bytes, int32_t* sums) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i acc[MB][NT];
    for (int m = 0; m < MB; ++m)
        for (int t = 0; t < NT; ++t) acc[m][t] = _mm256_setzero_si256();
    if constexpr (BITS == 4) {
        const __m256i nibble = _mm256_set1_epi8(0x0F), flip = _mm256_set1_epi8((char)0x88);
        for (int64_t c = 0; c < K; c += 128) {  // two steps of 64 columns (one at the end of an odd count)
            __m256i pairs[MB][NT];
            const int steps = K - c >= 128 ? 2 : 1;
            for (int step = 0; step < steps; ++step) {
                const int64_t k = c + 64 * step;
                for (int t = 0; t < NT; ++t) {
                    const int8_t* p = w + t * row_bytes + k / 2;
                    if (step == 0) _mm_prefetch((const char*)(p + NT * row_bytes), _MM_HINT_T0);
                    const __m256i u = _mm256_xor_si256(_mm256_loadu_si256((const __m256i*)p), flip);  // q + 8
                    const __m256i even = _mm256_and_si256(_mm256_srli_epi16(u, 4), nibble);
                    const __m256i odd = _mm256_and_si256(u, nibble);
                    for (int m = 0; m < MB; ++m) {
                        const int8_t* xm = xq + m * K + k;
                        const __m256i s = _mm256_add_epi16(
                            _mm256_maddubs_epi16(even, _mm256_load_si256((const __m256i*)xm)),
                            _mm256_maddubs_epi16(odd, _mm256_load_si256((const __m256i*)(xm + 32))));
                        pairs[m][t] = step == 0 ? s : _mm256_add_epi16(pairs[m][t], s);
                    }
                }
            }
            for (int m = 0; m < MB; ++m)
                for (int t = 0; t < NT; ++t)
                    acc[m][t] = _mm256_add_epi32(acc[m][t], _mm256_madd_epi16(pairs[m][t], ones));
        }
    } else {
        for (int64_t k = 0; k < K; k += 32) {
            for (int t = 0; t < NT; ++t) {
                const int8_t* p = w + t * row_bytes + k;
                if (k % 64 == 0) _mm_prefetch((const char*)(p + NT * row_bytes), _MM_HINT_T0);
                const __m256i q = _mm256_loadu_si256((const __m256i*)p);
                const __m256i magnitude = _mm256_sign_epi8(q, q);
                for (int m = 0; m < MB; ++m) {
                    const __m256i xs = _mm256_sign_epi8(_mm256_load_si256((const __m256i*)(xq + m * K + k)), q);
                    acc[m][t] = _mm256_add_epi32(acc[m][t], _mm256_madd_epi16(_mm256_maddubs_epi16(magnitude, xs), ones));
                }
            }
        }
    }
    for (int m = 0; m < MB; ++m)
        for (int t = 0; t < NT; ++t) sums[m * NT + t] = hsum_epi32(acc[m][t]);
}

// The integer products: activations from quantize_rows, sums scaled by the row's activation scale (and
// for int4 the offset 8 x the row's sum taken out).
template <int BITS>
struct IntegerProducts {
    using Sum = int32_t;
    QuantizedRows x;
    template <int MB, int NT>
    void tile(int64_t m0, int64_t K, const int8_t* w, int64_t row_bytes, Sum* sums) const {
        q8_tile<BITS, MB, NT>(x.q + m0 * K, K, w, row_bytes, sums);
    }
    float value(int64_t m, Sum sum) const { return (float)(sum - (BITS == 4 ? 8 * x.sums[m] : 0)) * x.scale[m]; }
};

// Returns 0, or -1 without memory for the quantized activations.
template <int BITS>
int q8_matmul(const void* x, int dtype, int64_t M, int64_t K, const int8_t* w, const uint16_t* scale, int64_t N,
              void* y, int threads) {
    QuantizedRows xq = quantize_rows(x, dtype, M, K, BITS == 4);
    if (!xq.q) return -1;
    all_tiles(IntegerProducts<BITS>{xq}, M, K, w, K * BITS / 8, scale, N, y, dtype, threads);
    free_rows(xq);
    return 0;
}

// ------------------------------------------------------------------------- 16-bit activations (int4)
// bfloat16 / float16 activations as 16-bit integers, 64 columns a block: each block is scaled by a power
// of two 2^-E that puts its largest magnitude in [2^14, 2^15), and rounded to nearest. A bfloat16 value
// has 8 significant bits (float16: 11), so every value of at least 2^(E+7) -- all within a factor of 2^7
// of its block's largest -- is an integer multiple of 2^E and converts exactly; smaller ones move by at
// most 2^(E-1), 2^-15 of the block's largest. A block's products are then exact integers: vpmaddwd
// multiplies 16 x 16 bits and adds pairs into 32 bits, a lane holds at most 8 x 8 x 32768 < 2^24 (exact
// as a float32), and the blocks are summed in float32 scaled by their power of two, as the float32 FMAs
// sum columns -- with half their instructions, which spend most of theirs converting weights to floats.
// The weights are THUDM's nibbles: a 32-byte load holds 64 columns, 4 to a 16-bit lane j: bits 0-3
// column 4j + 1, 4-7 column 4j, 8-11 column 4j + 3, 12-15 column 4j + 2 (column 2c in the high nibble of
// byte c); two shifts each (one for the top nibble) sign-extend them into four vectors of 16 weights, and
// the activations are stored in that order.

constexpr int PLANE_COLUMN[4] = {1, 0, 3, 2};  // column 4j + PLANE_COLUMN[p] sits in bits 4p..4p+3 of lane j
constexpr int64_t BLOCK = 64;

struct Int16Rows {
    int16_t* q;     // [M, K], each 64-column block in the order of the weights' nibbles
    float* block;   // [M, K / 64]: the block's 2^E relative to the row's (0 for a block of zeros)
    double* scale;  // [M]: the row's 2^E (that of its largest magnitude)
};

void free_rows(Int16Rows& r) {
    free(r.q);
    free(r.block);
    free(r.scale);
}

// 2^(exponent - 15) for a largest magnitude amax > 0: amax = f * 2^exponent with f in [0.5, 1).
inline int block_exponent(float amax) {
    int exponent = 0;
    frexpf(amax, &exponent);
    return exponent - 15;
}

// r.q == nullptr without memory; *finite false where a row holds an inf or NaN (the caller then uses the
// float32 products, which carry them through).
Int16Rows int16_rows(const void* x, int dtype, int64_t M, int64_t K, bool* finite) {
    Int16Rows r;
    r.q = (int16_t*)aligned_alloc(32, (size_t)(M * K * 2 + 31) / 32 * 32);
    r.block = (float*)malloc(M * (K / BLOCK) * sizeof(float));
    r.scale = (double*)malloc(M * sizeof(double));
    *finite = true;
    if (!r.q || !r.block || !r.scale) {
        free_rows(r);
        r.q = nullptr;
        return r;
    }
    for (int64_t m = 0; m < M; ++m) {
        // Each block's largest magnitude (kept in r.block until it is replaced by the block's scale); the
        // row's largest is theirs.
        float* largest = r.block + m * (K / BLOCK);
        float amax = 0.0f;
        bool nan = false;  // fmaxf skips NaN, so a NaN is looked for on its own
        for (int64_t g = 0; g < K; g += BLOCK) {
            float bmax = 0.0f;
            for (int64_t k = g; k < g + BLOCK; ++k) {
                const float magnitude = fabsf(load_x(x, dtype, m * K + k));
                nan |= magnitude != magnitude;
                bmax = fmaxf(bmax, magnitude);
            }
            largest[g / BLOCK] = bmax;
            amax = fmaxf(amax, bmax);
        }
        if (nan || !isfinite(amax)) {
            *finite = false;
            return r;
        }
        const int row_exponent = amax > 0.0f ? block_exponent(amax) : 0;
        r.scale[m] = ldexp(1.0, row_exponent);
        for (int64_t g = 0; g < K; g += BLOCK) {
            const float bmax = largest[g / BLOCK];
            // A block below 2^-126 of the row's largest counts as zeros (its float32 scale would underflow).
            const int relative = bmax > 0.0f ? block_exponent(bmax) - row_exponent : -1000;
            r.block[m * (K / BLOCK) + g / BLOCK] = relative >= -126 ? ldexpf(1.0f, relative) : 0.0f;
            const double inverse = relative >= -126 ? ldexp(1.0, -(relative + row_exponent)) : 0.0;
            for (int i = 0; i < BLOCK; ++i) {
                const int64_t column = g + 4 * (i % 16) + PLANE_COLUMN[i / 16];
                r.q[m * K + g + i] = (int16_t)nearbyint((double)load_x(x, dtype, m * K + column) * inverse);
            }
        }
    }
    return r;
}

template <int MB, int NT>
inline void x16_tile(const int16_t* xq, const float* block, int64_t K, const int8_t* w, int64_t row_bytes,
                     float* sums) {
    __m256 acc[MB][NT];
    for (int m = 0; m < MB; ++m)
        for (int t = 0; t < NT; ++t) acc[m][t] = _mm256_setzero_ps();
    for (int64_t k = 0; k < K; k += BLOCK)
        for (int t = 0; t < NT; ++t) {
            const int8_t* p = w + t * row_bytes + k / 2;
            // The next tile's rows, which this thread reads next (as the float32 products do).
            if (k % 128 == 0) _mm_prefetch((const char*)(p + NT * row_bytes), _MM_HINT_T0);
            const __m256i v = _mm256_loadu_si256((const __m256i*)p);
            const __m256i w0 = _mm256_srai_epi16(_mm256_slli_epi16(v, 12), 12);
            const __m256i w1 = _mm256_srai_epi16(_mm256_slli_epi16(v, 8), 12);
            const __m256i w2 = _mm256_srai_epi16(_mm256_slli_epi16(v, 4), 12);
            const __m256i w3 = _mm256_srai_epi16(v, 12);
            for (int m = 0; m < MB; ++m) {
                const __m256i* xm = (const __m256i*)(xq + m * K + k);
                const __m256i s = _mm256_add_epi32(
                    _mm256_add_epi32(_mm256_madd_epi16(w0, _mm256_load_si256(xm)),
                                     _mm256_madd_epi16(w1, _mm256_load_si256(xm + 1))),
                    _mm256_add_epi32(_mm256_madd_epi16(w2, _mm256_load_si256(xm + 2)),
                                     _mm256_madd_epi16(w3, _mm256_load_si256(xm + 3))));
                acc[m][t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_broadcast_ss(block + m * (K / BLOCK) + k / BLOCK),
                                            acc[m][t]);
            }
        }
    for (int m = 0; m < MB; ++m)
        for (int t = 0; t < NT; ++t) sums[m * NT + t] = hsum(acc[m][t]);
}

// The products of 16-bit activations: the blocks' float32 sum times the row's 2^E.
struct Int16Products {
    using Sum = float;
    Int16Rows x;
    template <int MB, int NT>
    void tile(int64_t m0, int64_t K, const int8_t* w, int64_t row_bytes, Sum* sums) const {
        x16_tile<MB, NT>(x.q + m0 * K, x.block + m0 * (K / BLOCK), K, w, row_bytes, sums);
    }
    float value(int64_t m, Sum sum) const { return (float)((double)sum * x.scale[m]); }
};

// Returns 0, or -1 without memory for the converted activations.
int x16_matmul(const void* x, int dtype, int64_t M, int64_t K, const int8_t* w, const uint16_t* scale, int64_t N,
               void* y, int threads) {
    bool finite = true;
    Int16Rows xq = int16_rows(x, dtype, M, K, &finite);
    if (!xq.q) return -1;
    if (finite) all_tiles(Int16Products{xq}, M, K, w, K / 2, scale, N, y, dtype, threads);
    free_rows(xq);
    return finite ? 0 : matmul<INT4>(x, dtype, M, K, w, scale, N, y, threads);
}

bool valid(int dtype, int64_t M, int64_t K, int64_t N, int threads) {
    return dtype >= X_F32 && dtype <= X_F16 && K % K_MULTIPLE == 0 && M >= 1 && N >= 1 && threads >= 1;
}

}  // namespace

extern "C" {

int glm6b_avx2_available(void) { return 1; }

// x: [M, K] in x_dtype (0 float32, 1 bfloat16, 2 float16); w: THUDM's int4 [N, K / 2] or int8 [N, K]
// with scale float16 [N], or (kind 16) a bfloat16 [N, K] weight and no scale; y: [M, N] in x_dtype.
// K a multiple of 64. Returns 0, -1 for arguments it does not take, or -2 where its buffer could not be
// allocated.
int glm6b_avx2_matmul(int kind, int x_dtype, const void* x, int64_t M, int64_t K, const void* w, const void* scale,
                      int64_t N, void* y, int threads) {
    if (!valid(x_dtype, M, K, N, threads)) return -1;
    const int8_t* wb = (const int8_t*)w;
    const uint16_t* s = (const uint16_t*)scale;
    int status;
    if (kind == INT4) status = matmul<INT4>(x, x_dtype, M, K, wb, s, N, y, threads);
    else if (kind == INT8) status = matmul<INT8>(x, x_dtype, M, K, wb, s, N, y, threads);
    else if (kind == BF16) status = matmul<BF16>(x, x_dtype, M, K, wb, nullptr, N, y, threads);
    else return -1;
    return status == 0 ? 0 : -2;
}

// out: float32 [N, K] = q * scale of THUDM's int4 / int8 rows at w / scale. K a multiple of 64.
int glm6b_avx2_dequantize(int bits, const void* w, const void* scale, int64_t N, int64_t K, float* out, int threads) {
    if (K % K_MULTIPLE || N < 0 || threads < 1) return -1;
    if (bits == INT4) dequantize<INT4>((const int8_t*)w, (const uint16_t*)scale, N, K, out, threads);
    else if (bits == INT8) dequantize<INT8>((const int8_t*)w, (const uint16_t*)scale, N, K, out, threads);
    else return -1;
    return 0;
}

// As glm6b_avx2_matmul for int4 / int8 weights, with x quantized to int8 per row first.
int glm6b_avx2_matmul_q8(int bits, int x_dtype, const void* x, int64_t M, int64_t K, const void* w,
                         const void* scale, int64_t N, void* y, int threads) {
    if (!valid(x_dtype, M, K, N, threads)) return -1;
    int status;
    if (bits == INT4) status = q8_matmul<INT4>(x, x_dtype, M, K, (const int8_t*)w, (const uint16_t*)scale, N, y, threads);
    else if (bits == INT8) status = q8_matmul<INT8>(x, x_dtype, M, K, (const int8_t*)w, (const uint16_t*)scale, N, y, threads);
    else return -1;
    return status == 0 ? 0 : -2;
}

// As glm6b_avx2_matmul for int4 weights and bfloat16 / float16 x (x_dtype 1, 2), with x converted to
// 16-bit integers per row (see above): integer products.
int glm6b_avx2_matmul_x16(int x_dtype, const void* x, int64_t M, int64_t K, const void* w, const void* scale,
                          int64_t N, void* y, int threads) {
    if (!valid(x_dtype, M, K, N, threads) || x_dtype == X_F32) return -1;
    const int status = x16_matmul(x, x_dtype, M, K, (const int8_t*)w, (const uint16_t*)scale, N, y, threads);
    return status == 0 ? 0 : -2;
}

}  // extern "C"

#else  // no AVX2 + FMA + F16C: PyTorch's own ops are used instead

extern "C" {
int glm6b_avx2_available(void) { return 0; }
int glm6b_avx2_matmul(int, int, const void*, int64_t, int64_t, const void*, const void*, int64_t, void*, int) { return -1; }
int glm6b_avx2_dequantize(int, const void*, const void*, int64_t, int64_t, float*, int) { return -1; }
int glm6b_avx2_matmul_q8(int, int, const void*, int64_t, int64_t, const void*, const void*, int64_t, void*, int) { return -1; }
int glm6b_avx2_matmul_x16(int, const void*, int64_t, int64_t, const void*, const void*, int64_t, void*, int) { return -1; }
}

#endif

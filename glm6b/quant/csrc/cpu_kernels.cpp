// CPU kernels for THUDM's weight-only int4 / int8 layers with bfloat16 activations (AVX512-BF16).
//
// They read THUDM's bytes as they are: int8 [N, K], or int4 packed two per byte ([N, K / 2], byte c =
// column 2c in the high nibble, column 2c + 1 in the low one, both two's complement), with one float16
// scale per output row. glm6b/quant/cpu_kernels.py compiles this file for the CPU it runs on and calls
// it through ctypes; without AVX512-BF16 it builds nothing but glm6b_cpu_kernels_available() == 0.
//
// glm6b_matmul: y[M, N] = x[M, K] @ (q * scale)^T, for a few rows (decoding), for an int4 prompt without
// AMX, and with AMX for many rows (a prefill, see amx_group_many). Each block of weight rows is unpacked
// into bfloat16 registers once for four input rows (int8: eight) and multiplied with them (vdpbf16ps,
// float32 sums), so eight rows cost far less than eight times one row: PyTorch's CPU int4 op unpacks per
// row. One row of int4 (a decode step) has a kernel of its own that unpacks with bit operations instead
// of table lookups (int4_one_row).
// The row scale is applied to the float32 sum, and y rounded to bfloat16 once.
// The same dot products on a bfloat16 weight (bits 16) read it at about 1.3-1.9x the bandwidth of
// PyTorch's F.linear for one to four rows (benchmarks/quantize.py, kernels table): decoding in bfloat16.
// One row of it has a kernel of its own, which reads the weight in memory order (bf16_one_row).
// glm6b_dequantize: rows [N, K] of bfloat16(q * scale), for a prompt's prefill without AMX (int8; int4
// from 256 rows): the bfloat16 GEMM then does the multiply.

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512BF16__)
#include <immintrin.h>
#include <omp.h>
#include <sys/syscall.h>
#include <unistd.h>

namespace {

constexpr int64_t CHUNK = 64;  // weights per row handled per step (two vectors of 32 bfloat16)

inline float f16_to_f32(uint16_t h) { return _cvtsh_ss(h); }

inline uint16_t f32_to_bf16(float f) {  // round to nearest even, as vcvtneps2bf16 (no NaN inputs here)
    uint32_t bits;
    memcpy(&bits, &f, 4);
    bits += 0x7FFF + ((bits >> 16) & 1);
    return (uint16_t)(bits >> 16);
}

// The 16 int4 values as bfloat16 bit patterns, indexed by the raw nibble (two's complement).
inline __m512i int4_to_bf16_table() {
    alignas(64) uint16_t table[32] = {0};
    for (int n = 0; n < 16; ++n) {
        float value = (float)(n < 8 ? n : n - 16);
        table[n] = f32_to_bf16(value);
    }
    return _mm512_load_si512(table);
}

// One chunk of 64 weights of a row as two bfloat16 vectors, in the order the activations are laid out
// in (see permute_activations): for int4 the even columns, then the odd ones; for int8 the natural order.
template <int BITS>
inline void load_weights(const int8_t* row, int64_t chunk, __m512i table, __m512i& first, __m512i& second) {
    if constexpr (BITS == 16) {  // bfloat16 weights: nothing to unpack
        first = _mm512_loadu_si512(row + chunk * 128);
        second = _mm512_loadu_si512(row + chunk * 128 + 64);
    } else if constexpr (BITS == 4) {
        __m512i bytes = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i*)(row + chunk * 32)));
        first = _mm512_permutexvar_epi16(_mm512_srli_epi16(bytes, 4), table);  // high nibbles: columns 2c
        second = _mm512_permutexvar_epi16(_mm512_and_si512(bytes, _mm512_set1_epi16(0x0F)), table);  // 2c + 1
    } else {
        const int8_t* p = row + chunk * 64;
        __m512 a = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p)));
        __m512 b = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(p + 16))));
        __m512 c = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(p + 32))));
        __m512 d = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(p + 48))));
        first = (__m512i)_mm512_cvtne2ps_pbh(b, a);  // columns 0..31 in order (the second argument is low)
        second = (__m512i)_mm512_cvtne2ps_pbh(d, c);
    }
}

// y[m, n0 + t] for MB input rows and NT weight rows: every weight chunk is unpacked once for all MB rows.
template <int BITS, int MB, int NT>
void tile(const uint16_t* xp, int64_t K, const int8_t* w, int64_t row_bytes, const uint16_t* scale,
          uint16_t* y, int64_t N, __m512i table) {
    __m512 acc[MB][NT];
    for (int m = 0; m < MB; ++m)
        for (int t = 0; t < NT; ++t) acc[m][t] = _mm512_setzero_ps();
    const int64_t chunks = K / CHUNK;
    constexpr int64_t chunk_bytes = BITS * CHUNK / 8;
    for (int64_t c = 0; c < chunks; ++c) {
        __m512i first[NT], second[NT];
        for (int t = 0; t < NT; ++t) {
            // The same place in the next tile's rows: the hardware prefetchers follow one stream per row
            // poorly when rows are short (2 KiB), so a decode step read memory at half its bandwidth.
            const char* ahead = (const char*)(w + (NT + t) * row_bytes + c * chunk_bytes);
            if (BITS != 4 || c % 2 == 0) _mm_prefetch(ahead, _MM_HINT_T0);
            if (BITS == 16) _mm_prefetch(ahead + 64, _MM_HINT_T0);
            load_weights<BITS>(w + t * row_bytes, c, table, first[t], second[t]);
        }
        for (int m = 0; m < MB; ++m) {
            const uint16_t* x = xp + m * K + c * CHUNK;
            __m512bh x0 = (__m512bh)_mm512_loadu_si512(x);
            __m512bh x1 = (__m512bh)_mm512_loadu_si512(x + 32);
            for (int t = 0; t < NT; ++t) {
                acc[m][t] = _mm512_dpbf16_ps(acc[m][t], (__m512bh)first[t], x0);
                acc[m][t] = _mm512_dpbf16_ps(acc[m][t], (__m512bh)second[t], x1);
            }
        }
    }
    for (int m = 0; m < MB; ++m)
        for (int t = 0; t < NT; ++t)
            y[m * N + t] = f32_to_bf16(_mm512_reduce_add_ps(acc[m][t]) * (BITS == 16 ? 1.0f : f16_to_f32(scale[t])));
}

// tile<BITS, rows, NT> for 1 <= rows <= MB (rows is only known at run time).
template <int BITS, int NT, int MB>
inline void tile_rows(int64_t rows, const uint16_t* x, int64_t K, const int8_t* w, int64_t row_bytes,
                      const uint16_t* scale, uint16_t* y, int64_t N, __m512i table) {
    if constexpr (MB > 1) {
        if (rows < MB) return tile_rows<BITS, NT, MB - 1>(rows, x, K, w, row_bytes, scale, y, N, table);
    }
    tile<BITS, MB, NT>(x, K, w, row_bytes, scale, y, N, table);
}

// All input rows, in blocks of up to MB, against NT weight rows starting at n.
template <int BITS, int NT, int MB>
void rows_tile(const uint16_t* xp, int64_t M, int64_t K, const int8_t* w, int64_t row_bytes,
               const uint16_t* scale, uint16_t* y, int64_t N, int64_t n, __m512i table) {
    const int8_t* wn = w + n * row_bytes;
    const uint16_t* s = BITS == 16 ? nullptr : scale + n;
    for (int64_t m0 = 0; m0 < M; m0 += MB)
        tile_rows<BITS, NT, MB>(M - m0 < MB ? M - m0 : MB, xp + m0 * K, K, wn, row_bytes, s, y + m0 * N + n, N, table);
}

// For int4 the activations of each 64-column chunk are reordered to [even columns, odd columns], the
// order load_weights<4> unpacks the weights in (vdpbf16ps multiplies pairs of neighbouring elements).
void permute_activations(const uint16_t* x, int64_t M, int64_t K, uint16_t* xp) {
    alignas(64) uint16_t even[32], odd[32];
    for (int i = 0; i < 32; ++i) { even[i] = (uint16_t)(2 * i); odd[i] = (uint16_t)(2 * i + 1); }
    const __m512i even_index = _mm512_load_si512(even), odd_index = _mm512_load_si512(odd);
    for (int64_t i = 0; i < M * K; i += CHUNK) {
        __m512i a = _mm512_loadu_si512(x + i), b = _mm512_loadu_si512(x + i + 32);
        _mm512_storeu_si512(xp + i, _mm512_permutex2var_epi16(a, even_index, b));
        _mm512_storeu_si512(xp + i + 32, _mm512_permutex2var_epi16(a, odd_index, b));
    }
}


// ------------------------------------------------------------------------------------ one input row
// A decode step multiplies one row by every weight once, so it is bound by how fast the weights stream
// from memory, and on AMD Zen 4 the table lookups of load_weights (vpermw) and the zero extension cost
// about as much core time as the memory wait. For int4, one 64-byte line of a weight row (128 weights)
// becomes four bfloat16 vectors with shifts and bit operations alone: the bfloat16 pattern 0x4300 | m is
// the number 128 + m for m < 128, and a two's complement nibble n with its sign bit flipped (n ^ 8) is
// its value + 8, so (n ^ 8) | 0x4300 is exactly 136 + q. The offsets (136 times the activations) are taken
// off per line: each line's sum starts from minus its offsets, so the float32 sums never grow beyond a
// line's products. The weight rows are walked in memory order where the activations stay in the level-1
// cache (K <= ONE_ROW_MAX_K: one row at a time, so the hardware prefetchers see one stream); for longer rows 8
// rows side by side share each load of the activations. Against the tiles of rows_tile, the 28 layers'
// int4 linears of a glm_6b decode step took 0.75-0.85x the time on a Zen 4 (2 threads). int8 stays on
// rows_tile: split into two nibbles it needs twice the dot products and was slower.

constexpr int64_t LINE = 64;  // bytes of a weight row per step: 128 int4 weights
// The longest rows the one-row kernels walk one at a time: their activations (8 KiB of bfloat16) stay in
// the level-1 cache beside the weight stream. Longer rows go 8 side by side, sharing each activation load.
constexpr int64_t ONE_ROW_MAX_K = 4096;

// The four bfloat16 vectors (136 + q) of one int4 weight line. Word j of the line holds, from its low
// bits up, columns 4j + 1, 4j, 4j + 3, 4j + 2 (byte c: column 2c high, 2c + 1 low); prepare_row lays the
// activations out in the same order.
inline void line_weights(__m512i line, __m512i& a, __m512i& b, __m512i& c, __m512i& d) {
    const __m512i nibble = _mm512_set1_epi16(0x000F), plus136 = _mm512_set1_epi16(0x4308);  // (n ^ 8) | 0x4300
    constexpr int AND_XOR = 0x6A;                                                              // (A & B) ^ C
    a = _mm512_ternarylogic_epi32(line, nibble, plus136, AND_XOR);
    b = _mm512_ternarylogic_epi32(_mm512_srli_epi16(line, 4), nibble, plus136, AND_XOR);
    c = _mm512_ternarylogic_epi32(_mm512_srli_epi16(line, 8), nibble, plus136, AND_XOR);
    d = _mm512_xor_si512(_mm512_srli_epi16(line, 12), plus136);
}

// The activation row for row_tile: per weight line, 4 x 32 bfloat16 in line_weights' order (columns past
// K are zeros), and 16 floats: minus the offsets the line's four products add to each float32 lane.
void prepare_row(const uint16_t* x, int64_t K, int64_t lines, uint16_t* xs, float* offsets) {
    const __m512bh k136 = (__m512bh)_mm512_set1_epi16(0x4308);
    for (int64_t l = 0; l < lines; ++l) {
        auto at = [&](int64_t k) -> uint16_t { return l * 128 + k < K ? x[l * 128 + k] : 0; };
        uint16_t* d = xs + l * 128;
        for (int j = 0; j < 32; ++j) {
            d[j] = at(4 * j + 1);
            d[32 + j] = at(4 * j);
            d[64 + j] = at(4 * j + 3);
            d[96 + j] = at(4 * j + 2);
        }
        __m512 sum = _mm512_setzero_ps();
        for (int v = 0; v < 4; ++v) sum = _mm512_dpbf16_ps(sum, k136, (__m512bh)_mm512_load_si512(d + 32 * v));
        _mm512_store_ps(offsets + l * 16, _mm512_sub_ps(_mm512_setzero_ps(), sum));
    }
}

// The NT sums of weight line l (the first 32 bytes of it where HALF: an int4 row's last 64 columns,
// K % 128 == 64; the rest would be the next row's, or past the weight's end).
template <int NT, bool HALF = false>
inline void add_line(const uint16_t* xs, const float* offsets, int64_t l, const int8_t* w, int64_t row_bytes,
                     __m512* acc) {
    const uint16_t* xl = xs + l * 128;
    const __m512bh x0 = (__m512bh)_mm512_load_si512(xl), x1 = (__m512bh)_mm512_load_si512(xl + 32),
                   x2 = (__m512bh)_mm512_load_si512(xl + 64), x3 = (__m512bh)_mm512_load_si512(xl + 96);
    const __m512 start = _mm512_load_ps(offsets + l * 16);
    for (int t = 0; t < NT; ++t) {
        const int8_t* p = w + t * row_bytes + l * LINE;
        // A masked load only where it is needed: on every line it made the loop 10-20 % slower on a Zen 4.
        const __m512i line = HALF ? _mm512_maskz_loadu_epi8(~0ULL >> 32, p) : _mm512_loadu_si512(p);
        __m512i a, b, c, d;
        line_weights(line, a, b, c, d);
        __m512 sum = _mm512_dpbf16_ps(start, (__m512bh)a, x0);
        sum = _mm512_dpbf16_ps(sum, (__m512bh)b, x1);
        sum = _mm512_dpbf16_ps(sum, (__m512bh)c, x2);
        sum = _mm512_dpbf16_ps(sum, (__m512bh)d, x3);
        acc[t] = _mm512_add_ps(acc[t], sum);
    }
}

// y[t] for NT weight rows from w: each line's four products start from minus its offsets.
template <int NT>
void row_tile(const uint16_t* xs, const float* offsets, int64_t row_bytes, const int8_t* w, const uint16_t* scale,
              uint16_t* y) {
    __m512 acc[NT];
    for (int t = 0; t < NT; ++t) acc[t] = _mm512_setzero_ps();
    const int64_t full_lines = row_bytes / LINE;
    for (int64_t l = 0; l < full_lines; ++l) add_line<NT>(xs, offsets, l, w, row_bytes, acc);
    if (row_bytes % LINE) add_line<NT, true>(xs, offsets, full_lines, w, row_bytes, acc);
    for (int t = 0; t < NT; ++t) y[t] = f32_to_bf16(_mm512_reduce_add_ps(acc[t]) * f16_to_f32(scale[t]));
}

// y[N] = x[K] @ (q * scale)^T for one row of an int4 weight. Returns -1 without memory for the activations.
int int4_one_row(const uint16_t* x, int64_t K, const int8_t* w, const uint16_t* scale, int64_t N, uint16_t* y,
                 int threads) {
    const int64_t row_bytes = K / 2;
    const int64_t lines = (row_bytes + LINE - 1) / LINE;
    uint16_t* xs = (uint16_t*)aligned_alloc(64, (size_t)lines * (128 * 2 + 16 * 4));
    if (!xs) return -1;
    float* offsets = (float*)(xs + lines * 128);
    prepare_row(x, K, lines, xs, offsets);
    const int64_t nt = K <= ONE_ROW_MAX_K ? 1 : 8;
    const int64_t tiles = N / nt;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t i = 0; i < tiles; ++i) {
        const int8_t* wi = w + i * nt * row_bytes;
        if (nt == 1) row_tile<1>(xs, offsets, row_bytes, wi, scale + i, y + i);
        else row_tile<8>(xs, offsets, row_bytes, wi, scale + i * 8, y + i * 8);
    }
    for (int64_t n = tiles * nt; n < N; ++n) row_tile<1>(xs, offsets, row_bytes, w + n * row_bytes, scale + n, y + n);
    free(xs);
    return 0;
}

// NT rows of a bfloat16 weight's products with one input row, walked in memory order: no unpacking, so
// nothing but the read matters. Two sums per row, so that consecutive products do not wait for each other.
template <int NT>
inline void bf16_rows(const uint16_t* x, int64_t K, const uint16_t* w, uint16_t* y) {
    __m512 acc[NT][2];
    for (int t = 0; t < NT; ++t) acc[t][0] = acc[t][1] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += CHUNK) {
        const __m512bh x0 = (__m512bh)_mm512_loadu_si512(x + k), x1 = (__m512bh)_mm512_loadu_si512(x + k + 32);
        for (int t = 0; t < NT; ++t) {
            const uint16_t* row = w + t * K + k;
            acc[t][0] = _mm512_dpbf16_ps(acc[t][0], (__m512bh)_mm512_loadu_si512(row), x0);
            acc[t][1] = _mm512_dpbf16_ps(acc[t][1], (__m512bh)_mm512_loadu_si512(row + 32), x1);
        }
    }
    for (int t = 0; t < NT; ++t) y[t] = f32_to_bf16(_mm512_reduce_add_ps(_mm512_add_ps(acc[t][0], acc[t][1])));
}

// y[N] = x[K] @ w^T for one row and a bfloat16 weight (decoding a bfloat16 model, the bfloat16 lm_head of
// int4 / int8). Each thread walks its weight rows in memory order with no software prefetches: one row at
// a time where the activations stay in the level-1 cache (K <= ONE_ROW_MAX_K: one stream for the
// hardware prefetchers), 8 rows side by side for longer rows, as int4_one_row does. Against the four-row tiles of
// rows_tile, with their software prefetches, on a Zen 4 (2 threads, paired interleaved calls): 1.2-1.47x
// as fast on glm_6b's 4096-column linears, 1.21-1.51x on the lm_head, 1.07-1.14x on the 16384-column
// dense_4h_to_h (docs/cpu-kernels.md).
void bf16_one_row(const uint16_t* x, int64_t K, const uint16_t* w, int64_t N, uint16_t* y, int threads) {
    const int64_t nt = K <= ONE_ROW_MAX_K ? 1 : 8;
    const int64_t tiles = N / nt;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t i = 0; i < tiles; ++i) {
        if (nt == 1) bf16_rows<1>(x, K, w + i * K, y + i);
        else bf16_rows<8>(x, K, w + i * 8 * K, y + i * 8);
    }
    for (int64_t n = tiles * nt; n < N; ++n) bf16_rows<1>(x, K, w + n * K, y + n);
}

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
// ----------------------------------------------------------------------------------------- AMX
// Intel AMX: one TDPBF16PS multiplies a 16 x 32 bfloat16 tile by a 32 x 16 one (8192 products). The
// weights are the left operand, 16 rows x 32 columns unpacked into a 1 KiB buffer in their own order;
// the activations, transposed into pairs of columns ("VNNI" order) once per call, the right one.
// Tiles: 0-3 sums [16 weight rows x up to 16 input rows], 4-5 weights, 6-7 activations.
// amx_group: up to 16 input rows, four blocks of 16 weight rows share each activation tile, each block
// unpacked just before it is used (more rows: 16 at a time). From AMX_MANY_MIN_ROWS rows: amx_group_many.

struct TileConfig {
    uint8_t palette_id;
    uint8_t start_row;
    uint8_t reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
};

bool amx_ready() {  // Linux hands out the tile state only on request, once per process
    static int ready = -1;
    if (ready < 0) {
        const long ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18;
        ready = syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 ? 1 : 0;
    }
    return ready == 1;
}

// The weights of a 16-row block for 64 columns from chunk c, as two 16 x 32 bfloat16 tiles (left
// operands) at first / second (1 KiB each). For int4, as in load_weights: the even columns, then the odd
// ones; for int8 the first 32 columns, then the last 32. to_vnni lays the activations out to match.
template <int BITS>
inline void unpack_block(const int8_t* w, int64_t row_bytes, int64_t c, __m512i table, uint16_t* first,
                         uint16_t* second) {
    constexpr int64_t chunk_bytes = BITS == 4 ? 32 : 64;
    for (int n = 0; n < 16; ++n) {
        __m512i a, b;
        // A group walks 64 rows side by side: fetch each row a few chunks ahead (past its end: the next row's
        // start, which the next group reads; a prefetch never faults).
        if (BITS == 8 || c % 2 == 0) _mm_prefetch((const char*)(w + n * row_bytes + (c + 4) * chunk_bytes), _MM_HINT_T0);
        load_weights<BITS>(w + n * row_bytes, c, table, a, b);
        _mm512_store_si512(first + n * 32, a);
        _mm512_store_si512(second + n * 32, b);
    }
}

// The column of chunk c that element (line r, half j) of tile t (0: first, 1: second) multiplies.
template <int BITS>
inline int64_t tile_column(int64_t c, int t, int r, int j) {
    const int64_t k = 2 * r + j;  // element of the tile's 32-column row
    return BITS == 4 ? c * CHUNK + 2 * k + t : c * CHUNK + 32 * t + k;
}

// Activation rows [m0, m0 + rows) as right operands: for chunk c and tile t, 16 lines of `lines` pairs
// (lines >= rows; the pairs of rows past `rows` are zeros).
template <int BITS>
void to_vnni(const uint16_t* x, int64_t K, int64_t m0, int64_t rows, int64_t lines, uint16_t* dst) {
    const int64_t chunks = K / CHUNK;
    for (int64_t c = 0; c < chunks; ++c)
        for (int t = 0; t < 2; ++t)
            for (int r = 0; r < 16; ++r)
                for (int64_t m = 0; m < lines; ++m)
                    for (int j = 0; j < 2; ++j)
                        dst[(((c * 2 + t) * 16 + r) * lines + m) * 2 + j] =
                            m < rows ? x[(m0 + m) * K + tile_column<BITS>(c, t, r, j)] : 0;
}

inline void store_sums(const float* sums, int64_t rows, const uint16_t* scale, uint16_t* y, int64_t N) {
    // sums: [16 weight rows][16 floats per line, `rows` used]; y: [rows][N] starting at this block.
    // Input row m is column m of the sums: gathered, scaled per weight row, rounded and stored as 16 values.
    const __m512 s = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)scale));
    const __m512i lines = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                             _mm512_set1_epi32(16));
    for (int64_t m = 0; m < rows; ++m) {
        const __m512 column = _mm512_i32gather_ps(lines, sums + m, 4);
        _mm256_storeu_si256((__m256i*)(y + m * N), (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(column, s)));
    }
}

void configure_tiles(int64_t rows) {
    TileConfig cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette_id = 1;
    for (int t = 0; t < 8; ++t) {
        cfg.rows[t] = 16;
        cfg.colsb[t] = (uint16_t)(t == 4 || t == 5 ? 64 : rows * 4);  // weights: 32 bfloat16 a row
    }
    _tile_loadconfig(&cfg);
}

// The weights are unpacked one block (16 rows) ahead of the tile loads that read them: a tile load
// waits until the stores it reads have left the core, so the unpacking of the next block fills that wait.
#define UNPACK(C, I, BUF) unpack_block<BITS>(w + 16 * (I) * row_bytes, row_bytes, C, table, BUF, (BUF) + 512)
// Tile I += the weights in BUF times the activation tiles 6 and 7 (tile numbers must be literal text).
#define MULTIPLY(I, BUF)                 \
    do {                                 \
        _tile_loadd(4, BUF, 64);         \
        _tile_loadd(5, (BUF) + 512, 64); \
        _tile_dpbf16ps(I, 4, 6);         \
        _tile_dpbf16ps(I, 5, 7);         \
    } while (0)

// 64 weight rows against up to 16 input rows (tiles 0-3 hold the sums of the four 16-row blocks).
template <int BITS>
void amx_group(const int8_t* w, int64_t row_bytes, int64_t K, const uint16_t* xb, int64_t rows,
               const uint16_t* scale, uint16_t* y, int64_t N, __m512i table, uint16_t* buffers, float* sums) {
    const int64_t chunks = K / CHUNK;
    uint16_t* even = buffers;
    uint16_t* odd = buffers + 1024;
    _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
    UNPACK(0, 0, even);
    for (int64_t c = 0; c < chunks; ++c) {
        _tile_loadd(6, xb + (c * 2) * 16 * rows * 2, rows * 4);
        _tile_loadd(7, xb + (c * 2 + 1) * 16 * rows * 2, rows * 4);
        UNPACK(c, 1, odd);
        MULTIPLY(0, even);
        UNPACK(c, 2, even);
        MULTIPLY(1, odd);
        UNPACK(c, 3, odd);
        MULTIPLY(2, even);
        if (c + 1 < chunks) UNPACK(c + 1, 0, even);
        MULTIPLY(3, odd);
    }
    _tile_stored(0, sums, 64); store_sums(sums, rows, scale, y, N);
    _tile_stored(1, sums, 64); store_sums(sums, rows, scale + 16, y + 16, N);
    _tile_stored(2, sums, 64); store_sums(sums, rows, scale + 32, y + 32, N);
    _tile_stored(3, sums, 64); store_sums(sums, rows, scale + 48, y + 48, N);
}

// Many input rows (a prefill): unpacking a group's weights again for every 16 input rows would cost
// more than the products, so a slice of K_SLICE columns of the group's (up to 256) weight rows is unpacked
// once into `unpacked` (512 KiB: it stays in L2) and multiplied with every input block from there. The input
// is laid out in blocks of 16 rows, padded with zero rows to a multiple of 32, and taken two blocks at a
// time against two weight blocks (tiles 0-3: the four sums), so each loaded tile feeds two products
// and no product waits on the one before it. Between slices the float sums wait in `partial`
// ([input block][weight block][16 x 16]).
constexpr int64_t K_SLICE = 1024;
constexpr int64_t AMX_MANY_MIN_ROWS = 49;  // below, amx_group on blocks of 16 rows was faster (benchmarks/quantize.py)
constexpr int64_t MANY_BLOCKS = 16;  // weight rows unpacked together: 16 blocks of 16 (256 rows x K_SLICE: 512 KiB)

template <int BITS>
void amx_group_many(const int8_t* w, int64_t row_bytes, int64_t K, int64_t blocks, const uint16_t* vnni, int64_t M,
                    const uint16_t* scale, uint16_t* y, int64_t N, __m512i table, uint16_t* unpacked,
                    float* partial) {
    const int64_t chunks = K / CHUNK;
    const int64_t padded = (M + 31) / 32 * 32;
    for (int64_t c0 = 0; c0 < chunks; c0 += K_SLICE / CHUNK) {
        const int64_t c1 = c0 + K_SLICE / CHUNK < chunks ? c0 + K_SLICE / CHUNK : chunks;
        for (int64_t c = c0; c < c1; ++c)
            for (int64_t b = 0; b < blocks; ++b) {
                uint16_t* dst = unpacked + ((c - c0) * blocks + b) * 1024;
                unpack_block<BITS>(w + 16 * b * row_bytes, row_bytes, c, table, dst, dst + 512);
            }
        for (int64_t m0 = 0; m0 < padded; m0 += 32) {
            const uint16_t* xa = vnni + m0 * K;
            const uint16_t* xb = vnni + (m0 + 16) * K;
            for (int64_t b = 0; b < blocks; b += 2) {
                float* s00 = partial + (m0 / 16 * blocks + b) * 256;  // input block m0, weight block b
                float* s01 = s00 + blocks * 256;                      // input block m0 + 16
                float* s10 = s00 + 256;                               // weight block b + 1
                float* s11 = s01 + 256;
                if (c0 == 0) {
                    _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
                } else {
                    _tile_loadd(0, s00, 64); _tile_loadd(1, s01, 64); _tile_loadd(2, s10, 64); _tile_loadd(3, s11, 64);
                }
                for (int64_t c = c0; c < c1; ++c) {
                    const uint16_t* block = unpacked + ((c - c0) * blocks + b) * 1024;
                    for (int t = 0; t < 2; ++t) {
                        _tile_loadd(4, block + t * 512, 64);
                        _tile_loadd(5, block + 1024 + t * 512, 64);
                        _tile_loadd(6, xa + (c * 2 + t) * 512, 64);
                        _tile_loadd(7, xb + (c * 2 + t) * 512, 64);
                        _tile_dpbf16ps(0, 4, 6);
                        _tile_dpbf16ps(1, 4, 7);
                        _tile_dpbf16ps(2, 5, 6);
                        _tile_dpbf16ps(3, 5, 7);
                    }
                }
                _tile_stored(0, s00, 64); _tile_stored(1, s01, 64); _tile_stored(2, s10, 64); _tile_stored(3, s11, 64);
            }
        }
    }
    for (int64_t m0 = 0; m0 < M; m0 += 16) {
        const int64_t rows = M - m0 < 16 ? M - m0 : 16;
        for (int64_t b = 0; b < blocks; ++b)
            store_sums(partial + (m0 / 16 * blocks + b) * 256, rows, scale + 16 * b, y + m0 * N + 16 * b, N);
    }
}

#undef UNPACK
#undef MULTIPLY

// The weight rows in groups of 64 (amx_group) or 256 (amx_group_many), split between the threads. Returns
// the number of weight rows done (a multiple of 64; the caller does the rest), or -1 without memory for
// its buffers.
template <int BITS>
int64_t amx_matmul(const uint16_t* x, int64_t M, int64_t K, const int8_t* w, const uint16_t* scale, int64_t N,
                   uint16_t* y, int threads) {
    const int64_t row_bytes = BITS == 4 ? K / 2 : K;
    const int64_t groups = N / 64;
    if (groups == 0) return 0;
    // Few rows: blocks of up to 16 (amx_group, the last block has the rest). More (amx_group_many): blocks
    // of 16, padded with zero rows to a multiple of 32.
    const bool many = M >= AMX_MANY_MIN_ROWS;
    const int64_t padded = many ? (M + 31) / 32 * 32 : M;
    // The activations in tile order, and for amx_group_many each thread's unpacked slice and partial sums.
    const size_t unpacked_bytes = K_SLICE / CHUNK * MANY_BLOCKS * 1024 * 2;
    const size_t partial_bytes = (size_t)padded / 16 * MANY_BLOCKS * 256 * 4;
    uint16_t* vnni = (uint16_t*)aligned_alloc(64, (size_t)(padded * K * 2 + 63) / 64 * 64);
    char* scratch = many ? (char*)aligned_alloc(64, threads * (unpacked_bytes + partial_bytes)) : nullptr;
    if (!vnni || (many && !scratch)) {
        free(vnni);
        free(scratch);
        return -1;
    }
    for (int64_t m0 = 0; m0 < padded; m0 += 16) {
        const int64_t rows = M - m0 < 0 ? 0 : (M - m0 < 16 ? M - m0 : 16);
        to_vnni<BITS>(x, K, m0, rows, many ? 16 : rows, vnni + m0 * K);
    }
    const __m512i table = int4_to_bf16_table();
#pragma omp parallel num_threads(threads)
    {
        alignas(64) uint16_t buffers[2048];
        alignas(64) float sums[256];
        char* own = many ? scratch + omp_get_thread_num() * (unpacked_bytes + partial_bytes) : nullptr;
        uint16_t* unpacked = (uint16_t*)own;
        float* partial = many ? (float*)(own + unpacked_bytes) : nullptr;
        int64_t configured = 0;  // the input rows the tiles are configured for
        if (many) {
            configure_tiles(16);
            configured = 16;
            // Weight rows MANY_BLOCKS * 16 at a time (the last group: the rest of the multiple of 64).
            const int64_t per_group = MANY_BLOCKS / 4;
#pragma omp for schedule(static)
            for (int64_t g = 0; g < groups; g += per_group) {
                const int64_t blocks = 4 * (groups - g < per_group ? groups - g : per_group);
                amx_group_many<BITS>(w + g * 64 * row_bytes, row_bytes, K, blocks, vnni, M, scale + g * 64,
                                     y + g * 64, N, table, unpacked, partial);
            }
        } else {
#pragma omp for schedule(static)
            for (int64_t g = 0; g < groups; ++g) {
                for (int64_t m0 = 0; m0 < M; m0 += 16) {
                    const int64_t rows = M - m0 < 16 ? M - m0 : 16;
                    if (rows != configured) { configure_tiles(rows); configured = rows; }
                    amx_group<BITS>(w + g * 64 * row_bytes, row_bytes, K, vnni + m0 * K, rows, scale + g * 64,
                                    y + m0 * N + g * 64, N, table, buffers, sums);
                }
            }
        }
        if (configured) _tile_release();
    }
    free(vnni);
    free(scratch);
    return groups * 64;
}
#endif  // AMX

// Returns 0, or -1 without memory for the activations' buffers.
template <int BITS>
int matmul(const uint16_t* x, int64_t M, int64_t K, const int8_t* w, const uint16_t* scale, int64_t N,
           uint16_t* y, int threads, bool use_amx) {
    const int64_t row_bytes = K * BITS / 8;
    if (BITS == 4 && M == 1 && !use_amx) return int4_one_row(x, K, w, scale, N, y, threads);
    if (BITS == 16 && M == 1) {
        bf16_one_row(x, K, (const uint16_t*)w, N, y, threads);
        return 0;
    }
    int64_t first_row = 0;  // rows before this one are done by AMX
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
    if constexpr (BITS != 16) {
        if (use_amx && amx_ready()) first_row = amx_matmul<BITS>(x, M, K, w, scale, N, y, threads);
        if (first_row < 0) return -1;
        if (first_row == N) return 0;
    }
#endif
    const uint16_t* xp = x;
    uint16_t* permuted = nullptr;
    if (BITS == 4) {
        permuted = (uint16_t*)aligned_alloc(64, (size_t)(M * K * 2 + 63) / 64 * 64);
        if (!permuted) return -1;
        permute_activations(x, M, K, permuted);
        xp = permuted;
    }
    const __m512i table = int4_to_bf16_table();
    // Four weight rows per tile against up to four input rows at a time, so the sums stay in registers. For
    // more rows int4 and bfloat16 go on four at a time (the tile's weights, read again from the level-1 /
    // level-2 cache and unpacked again, cost less than the products: int4 with 8-100 rows runs at the
    // bfloat16 GEMM's rate), int8 takes two weight rows against up to eight input rows (an int8 line costs
    // more to unpack than the products it saves: taken four rows at a time it was 5-10 % slower).
    const int64_t nt = M <= 4 || BITS != 8 ? 4 : 2;
    const int64_t tiles = (N - first_row) / nt;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t i = 0; i < tiles; ++i) {
        if (nt == 4) rows_tile<BITS, 4, 4>(xp, M, K, w, row_bytes, scale, y, N, first_row + i * 4, table);
        else rows_tile<BITS, 2, 8>(xp, M, K, w, row_bytes, scale, y, N, first_row + i * 2, table);
    }
    for (int64_t n = first_row + tiles * nt; n < N; ++n) rows_tile<BITS, 1, 8>(xp, M, K, w, row_bytes, scale, y, N, n, table);
    free(permuted);
    return 0;
}

template <int BITS>
void dequantize(const int8_t* w, const uint16_t* scale, int64_t N, int64_t K, uint16_t* out, int threads) {
    const int64_t row_bytes = BITS == 4 ? K / 2 : K;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t n = 0; n < N; ++n) {
        const int8_t* row = w + n * row_bytes;
        uint16_t* dst = out + n * K;
        const __m512 s = _mm512_set1_ps(f16_to_f32(scale[n]));
        if constexpr (BITS == 4) {
            for (int64_t b = 0; b < row_bytes; b += 16) {  // 16 bytes: 32 values
                __m512i v = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(row + b)));
                __m512 high = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_srai_epi32(v, 4)), s);  // columns 2c
                __m512 low = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(v, 28), 28)), s);
                __m512i h = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(high));
                __m512i l = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(low));
                _mm512_storeu_si512(dst + 2 * b, _mm512_or_si512(h, _mm512_slli_epi32(l, 16)));
            }
        } else {
            for (int64_t k = 0; k < K; k += 32) {
                __m512 a = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(row + k))));
                __m512 c = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(row + k + 16))));
                _mm512_storeu_si512(dst + k, (__m512i)_mm512_cvtne2ps_pbh(_mm512_mul_ps(c, s), _mm512_mul_ps(a, s)));
            }
        }
    }
}

}  // namespace

extern "C" {

int glm6b_cpu_kernels_available(void) { return 1; }

// 1 where the AMX path is compiled in and the OS grants the tile state.
int glm6b_cpu_kernels_amx(void) {
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
    return amx_ready() ? 1 : 0;
#else
    return 0;
#endif
}

// x: bfloat16 [M, K]; w: THUDM's int4 [N, K / 2] or int8 [N, K] with scale: float16 [N], or (bits 16) a
// bfloat16 [N, K] weight and no scale; y: bfloat16 [M, N]. K must be a multiple of 64. Returns 0, -1 for
// arguments it does not take, or -2 where its buffers could not be allocated.
int glm6b_matmul(int bits, const void* x, int64_t M, int64_t K, const void* w, const void* scale, int64_t N,
                 void* y, int threads, int use_amx) {
    if (K % CHUNK || M < 1 || N < 1 || threads < 1) return -1;
    int status;
    if (bits == 16) status = matmul<16>((const uint16_t*)x, M, K, (const int8_t*)w, nullptr, N, (uint16_t*)y, threads, false);
    else if (bits == 4) status = matmul<4>((const uint16_t*)x, M, K, (const int8_t*)w, (const uint16_t*)scale, N, (uint16_t*)y, threads, use_amx);
    else if (bits == 8) status = matmul<8>((const uint16_t*)x, M, K, (const int8_t*)w, (const uint16_t*)scale, N, (uint16_t*)y, threads, use_amx);
    else return -1;
    return status == 0 ? 0 : -2;
}

// out: bfloat16 [N, K] = bfloat16(q * scale) of the N rows at w / scale. K must be a multiple of 64.
int glm6b_dequantize(int bits, const void* w, const void* scale, int64_t N, int64_t K, void* out, int threads) {
    if (K % CHUNK || N < 0 || threads < 1) return -1;
    if (bits == 4) dequantize<4>((const int8_t*)w, (const uint16_t*)scale, N, K, (uint16_t*)out, threads);
    else if (bits == 8) dequantize<8>((const int8_t*)w, (const uint16_t*)scale, N, K, (uint16_t*)out, threads);
    else return -1;
    return 0;
}

}  // extern "C"

#else  // no AVX512-BF16: PyTorch's own ops are used instead

extern "C" {
int glm6b_cpu_kernels_available(void) { return 0; }
int glm6b_cpu_kernels_amx(void) { return 0; }
int glm6b_matmul(int, const void*, int64_t, int64_t, const void*, const void*, int64_t, void*, int, int) { return -1; }
int glm6b_dequantize(int, const void*, const void*, int64_t, int64_t, void*, int) { return -1; }
}

#endif

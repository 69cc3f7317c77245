/* Decode quantized weights to float32: the inner loop of QLoRA's dequantize.
 *
 * lora_fx_dequant4 (nf4, int4): out[2i], out[2i+1] = (table16[first nibble of packed[i]] - zero[b]) * scale[b], b the block of the
 * value (block_size values, block_size / 2 bytes); zero == NULL means 0. high_first: the first value
 * of a byte is its high nibble (nf4), else its low nibble (int4, as ONNX stores it).
 *
 * lora_fx_dequant8 (int8, one scale per row): out[r, c] = (float)q[r, c] * scale[r].
 *
 * Built by lora_fx/kernels/dequant.py with the machine's C compiler (-O3 -march=native). With
 * AVX-512 the 16-entry table sits in one register and _mm512_permutexvar_ps looks up 16 codes per
 * instruction (and int8 widens 16 values per instruction). With AVX2 (most CPUs without AVX-512) the
 * table is two 8-entry registers: _mm256_permutevar8x32_ps looks 8 codes up in each half and bit 3 of
 * the code picks the half. Without either, scalar loops compute the same values. The arithmetic is
 * the same as the torch fallback's (a subtract, then a multiply), so all give bit-identical weights.
 */
#include <stddef.h>
#include <stdint.h>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#if !defined(__AVX512F__) && defined(__AVX2__)
/* table[code] for 8 codes (0..15) held in two 8-entry halves. */
static inline __m256 lookup16(__m256i code, __m256 low8, __m256 high8) {
    const __m256 from_low = _mm256_permutevar8x32_ps(low8, code), from_high = _mm256_permutevar8x32_ps(high8, code);
    /* blendv reads each lane's sign bit: shifting by 28 puts bit 3 of the code there. */
    return _mm256_blendv_ps(from_low, from_high, _mm256_castsi256_ps(_mm256_slli_epi32(code, 28)));
}
#endif

typedef struct {
    const uint8_t *packed;
    const float *table16, *scale, *zero;
    float *out;
    int64_t first_block, end_block, block_size;
    int high_first;
} job_t;

static void run_blocks(const job_t *j) {
    const int64_t half = j->block_size / 2;
#ifdef __AVX512F__
    if (half % 16 == 0) {
        const __m512 table = _mm512_loadu_ps(j->table16);
        const __m512i first_half = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
        const __m512i second_half = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
        const __m512i low_mask = _mm512_set1_epi32(15);
        for (int64_t blk = j->first_block; blk < j->end_block; ++blk) {
            const __m512 s = _mm512_set1_ps(j->scale[blk]);
            const __m512 z = _mm512_set1_ps(j->zero ? j->zero[blk] : 0.0f);
            const uint8_t *p = j->packed + blk * half;
            float *o = j->out + blk * j->block_size;
            for (int64_t i = 0; i < half; i += 16) {
                __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(p + i)));
                __m512i hi = _mm512_srli_epi32(bytes, 4), lo = _mm512_and_si512(bytes, low_mask);
                __m512 a = _mm512_permutexvar_ps(j->high_first ? hi : lo, table);
                __m512 b = _mm512_permutexvar_ps(j->high_first ? lo : hi, table);
                __m512 v0 = _mm512_permutex2var_ps(a, first_half, b), v1 = _mm512_permutex2var_ps(a, second_half, b);
                if (j->zero) {
                    v0 = _mm512_sub_ps(v0, z);
                    v1 = _mm512_sub_ps(v1, z);
                }
                _mm512_storeu_ps(o + 2 * i, _mm512_mul_ps(v0, s));
                _mm512_storeu_ps(o + 2 * i + 16, _mm512_mul_ps(v1, s));
            }
        }
        return;
    }
#elif defined(__AVX2__)
    if (half % 8 == 0) {
        const __m256 low8 = _mm256_loadu_ps(j->table16), high8 = _mm256_loadu_ps(j->table16 + 8);
        const __m256i low_mask = _mm256_set1_epi32(15);
        for (int64_t blk = j->first_block; blk < j->end_block; ++blk) {
            const __m256 s = _mm256_set1_ps(j->scale[blk]);
            const __m256 z = _mm256_set1_ps(j->zero ? j->zero[blk] : 0.0f);
            const uint8_t *p = j->packed + blk * half;
            float *o = j->out + blk * j->block_size;
            for (int64_t i = 0; i < half; i += 8) {
                __m256i bytes = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(p + i)));
                __m256i hi = _mm256_srli_epi32(bytes, 4), lo = _mm256_and_si256(bytes, low_mask);
                __m256 a = lookup16(j->high_first ? hi : lo, low8, high8);  /* first value of each byte */
                __m256 b = lookup16(j->high_first ? lo : hi, low8, high8);  /* second value */
                /* interleave to a0 b0 a1 b1 ...: unpack works within 128-bit lanes, permute2f128 joins them */
                __m256 ab_lo = _mm256_unpacklo_ps(a, b), ab_hi = _mm256_unpackhi_ps(a, b);
                __m256 v0 = _mm256_permute2f128_ps(ab_lo, ab_hi, 0x20), v1 = _mm256_permute2f128_ps(ab_lo, ab_hi, 0x31);
                if (j->zero) {
                    v0 = _mm256_sub_ps(v0, z);
                    v1 = _mm256_sub_ps(v1, z);
                }
                _mm256_storeu_ps(o + 2 * i, _mm256_mul_ps(v0, s));
                _mm256_storeu_ps(o + 2 * i + 8, _mm256_mul_ps(v1, s));
            }
        }
        return;
    }
#endif
    for (int64_t blk = j->first_block; blk < j->end_block; ++blk) {
        const float s = j->scale[blk];
        const uint8_t *p = j->packed + blk * half;
        float *o = j->out + blk * j->block_size;
        for (int64_t i = 0; i < half; ++i) {
            const int hi = p[i] >> 4, lo = p[i] & 15;
            float a = j->table16[j->high_first ? hi : lo], b = j->table16[j->high_first ? lo : hi];
            if (j->zero) {
                a -= j->zero[blk];
                b -= j->zero[blk];
            }
            o[2 * i] = a * s;
            o[2 * i + 1] = b * s;
        }
    }
}

/* n_blocks whole blocks, split over n_threads OpenMP threads. Built with -fopenmp, the library needs
 * libgomp.so.1, which the loader finds already loaded by torch: the kernel runs on torch's own OpenMP
 * threads (already awake after the previous matmul) rather than on threads of its own that would
 * compete with torch's spinning ones for the cores. */
int lora_fx_dequant4(const uint8_t *packed, int64_t n_blocks, int64_t block_size, const float *table16,
                     const float *scale, const float *zero, int high_first, float *out, int n_threads) {
    /* Below about 64 Ki values per thread, a thread costs more to wake than it saves. */
    const int64_t min_blocks = (65536 + block_size - 1) / block_size;
    int64_t useful = n_blocks / min_blocks;
    if (n_threads > useful) n_threads = useful > 1 ? (int)useful : 1;
#pragma omp parallel for schedule(static) num_threads(n_threads) if (n_threads > 1)
    for (int t = 0; t < n_threads; ++t) {
        job_t job = {packed, table16, scale, zero, out, n_blocks * t / n_threads, n_blocks * (t + 1) / n_threads,
                     block_size, high_first};
        run_blocks(&job);
    }
    return 0;
}

static void run_rows8(const int8_t *q, int64_t r0, int64_t r1, int64_t cols, const float *scale, float *out) {
    for (int64_t r = r0; r < r1; ++r) {
        const int8_t *src = q + r * cols;
        float *dst = out + r * cols;
        int64_t c = 0;
#ifdef __AVX512F__
        const __m512 s = _mm512_set1_ps(scale[r]);
        for (; c + 16 <= cols; c += 16) {
            __m512 v = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(src + c))));
            _mm512_storeu_ps(dst + c, _mm512_mul_ps(v, s));
        }
#elif defined(__AVX2__)
        const __m256 s = _mm256_set1_ps(scale[r]);
        for (; c + 8 <= cols; c += 8) {
            __m256 v = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(src + c))));
            _mm256_storeu_ps(dst + c, _mm256_mul_ps(v, s));
        }
#endif
        for (; c < cols; ++c) dst[c] = (float)src[c] * scale[r];
    }
}

/* rows x cols int8 values, one scale per row, split by rows over n_threads OpenMP threads. */
int lora_fx_dequant8(const int8_t *q, int64_t rows, int64_t cols, const float *scale, float *out, int n_threads) {
    const int64_t min_rows = cols > 0 ? (65536 + cols - 1) / cols : rows;
    int64_t useful = min_rows > 0 ? rows / min_rows : 1;
    if (n_threads > useful) n_threads = useful > 1 ? (int)useful : 1;
    if (n_threads < 1) n_threads = 1;
#pragma omp parallel for schedule(static) num_threads(n_threads) if (n_threads > 1)
    for (int t = 0; t < n_threads; ++t) run_rows8(q, rows * t / n_threads, rows * (t + 1) / n_threads, cols, scale, out);
    return 0;
}

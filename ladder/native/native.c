/* The small operators of a CPU decode step, fused: RMSNorm, rotary embedding + KV-cache write +
 * attention for one new token per row, and SwiGLU's silu(gate) * up.
 *
 * Why: a SmolLM2 decode step is 30 layers of four weight products and ~60 small torch operators
 * per layer; each small operator costs 1-8 us of dispatch on these cores, ~4 ms a token, as much
 * as a third of a TP=2 rank's step. Here each is one call (ladder/native.py, ctypes) that costs
 * ~1 us plus its arithmetic.
 *
 * The arithmetic is the model's (ladder/model.py), rounding where it rounds: in bfloat16, every
 * torch operator rounds its result to bfloat16, so these kernels round at the same points; only
 * the order of the additions inside a reduction (the norm's sum of squares, a dot product, the
 * softmax sum) may differ. Compiled with -ffp-contract=off so that a * b + c is not fused where
 * torch does two roundings.
 *
 * dtype codes: 0 float32, 1 bfloat16 (stored as uint16). `nt` is the number of OpenMP threads
 * a call may use (torch's intra-op thread count, passed in: OpenMP's own default is per calling
 * thread and would ignore torch.set_num_threads in a serving thread).
 */

#include <fcntl.h>
#include <limits.h>
#include <linux/futex.h>
#include <math.h>
#include <omp.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

typedef uint16_t bf16;

static inline float bf2f(bf16 v) {
    union { uint32_t u; float f; } c;
    c.u = (uint32_t)v << 16;
    return c.f;
}

static inline bf16 f2bf(float f) { /* round to nearest even, as torch does */
    union { uint32_t u; float f; } c;
    c.f = f;
    if ((c.u & 0x7fffffffu) > 0x7f800000u) return (bf16)((c.u >> 16) | 0x40); /* NaN */
    return (bf16)((c.u + 0x7fffu + ((c.u >> 16) & 1u)) >> 16);
}

/* x[i] as float, for either dtype */
static inline float ld(int dt, const void *p, long i) {
    return dt ? bf2f(((const bf16 *)p)[i]) : ((const float *)p)[i];
}

/* the value torch would hold after rounding a float result to the tensor's dtype */
static inline float rnd(int dt, float v) { return dt ? bf2f(f2bf(v)) : v; }

static inline void st(int dt, void *p, long i, float v) {
    if (dt) ((bf16 *)p)[i] = f2bf(v);
    else ((float *)p)[i] = v;
}

int ladder_native_version(void) { return 6; } /* 2: paged KV; 3: prompt chunks, windows; 4: Q8/Q4;
                                               5: whole decode modules; 6: a step's layers */

/* y[m] = w * rms_norm(x[m]) for M rows of D: as RMSNorm.forward, normalised in float32, rounded
 * to the dtype, then multiplied by the weight (one more rounding). */
void ladder_rmsnorm(int dt, const void *x, const void *w, void *y, long M, long D, float eps) {
    for (long m = 0; m < M; m++) {
        long o = m * D;
        float ss = 0.f;
#pragma omp simd reduction(+ : ss)
        for (long i = 0; i < D; i++) {
            float v = ld(dt, x, o + i);
            ss += v * v;
        }
        float r = 1.f / sqrtf(ss / (float)D + eps);
        for (long i = 0; i < D; i++)
            st(dt, y, o + i, ld(dt, w, i) * rnd(dt, ld(dt, x, o + i) * r));
    }
}

/* out[m, i] = silu(gate[m, i]) * up[m, i]; gu [M, 2F] holds the gate columns, then the up ones.
 * silu(g) = g / (1 + exp(-g)), rounded to the dtype before the product (two torch operators). */
#ifdef __AVX512F__
#include <immintrin.h>
__m512 _ZGVeN16v_expf(__m512 x); /* glibc's libmvec: expf on 16 lanes */

static inline __m512 bf16x16_load(const bf16 *p, __mmask16 k) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(
        _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(k, p)), 16));
}

static inline __m512 bf16_round(__m512 v) { /* to the nearest bfloat16, ties to even */
    __m512i u = _mm512_castps_si512(v);
    __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    u = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), odd));
    return _mm512_castsi512_ps(_mm512_and_si512(u, _mm512_set1_epi32((int)0xffff0000u)));
}

static void silu_mul_row(int dt, const void *gu, void *out, long g0, long u0, long o, long F) {
    const __m512 one = _mm512_set1_ps(1.f);
    for (long i = 0; i < F; i += 16) {
        __mmask16 k = F - i >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (F - i)) - 1);
        __m512 g, u;
        if (dt) {
            g = bf16x16_load((const bf16 *)gu + g0 + i, k);
            u = bf16x16_load((const bf16 *)gu + u0 + i, k);
        } else {
            g = _mm512_maskz_loadu_ps(k, (const float *)gu + g0 + i);
            u = _mm512_maskz_loadu_ps(k, (const float *)gu + u0 + i);
        }
        __m512 e = _ZGVeN16v_expf(_mm512_sub_ps(_mm512_setzero_ps(), g));
        __m512 silu = _mm512_div_ps(g, _mm512_add_ps(one, e));
        if (dt) {
            __m512 y = bf16_round(_mm512_mul_ps(bf16_round(silu), u));
            _mm256_mask_storeu_epi16((bf16 *)out + o + i, k,
                                     _mm512_cvtepi32_epi16(_mm512_srli_epi32(
                                         _mm512_castps_si512(y), 16)));
        } else {
            _mm512_mask_storeu_ps((float *)out + o + i, k, _mm512_mul_ps(silu, u));
        }
    }
}

/* sc[p] = exp(sc[p] - mx) for p < n; returns their sum */
static float softmax_exp(float *sc, long n, float mx) {
    __m512 acc = _mm512_setzero_ps(), m = _mm512_set1_ps(mx);
    for (long p = 0; p < n; p += 16) {
        __mmask16 k = n - p >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n - p)) - 1);
        __m512 e = _ZGVeN16v_expf(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, sc + p), m));
        _mm512_mask_storeu_ps(sc + p, k, e);
        acc = _mm512_add_ps(acc, _mm512_maskz_mov_ps(k, e));
    }
    return _mm512_reduce_add_ps(acc);
}
#else
static void silu_mul_row(int dt, const void *gu, void *out, long g0, long u0, long o, long F) {
    for (long i = 0; i < F; i++) {
        float g = ld(dt, gu, g0 + i);
        st(dt, out, o + i, rnd(dt, g / (1.f + expf(-g))) * ld(dt, gu, u0 + i));
    }
}

static float softmax_exp(float *sc, long n, float mx) {
    float sum = 0.f;
    for (long p = 0; p < n; p++) {
        sc[p] = expf(sc[p] - mx);
        sum += sc[p];
    }
    return sum;
}
#endif

void ladder_silu_mul(int dt, const void *gu, void *out, long M, long F, int nt) {
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1 && M * F >= 32768)
    for (long m = 0; m < M; m++) silu_mul_row(dt, gu, out, m * 2 * F, m * 2 * F + F, m * F, F);
}

/* Rotary embedding of one head (HF's rotate-half layout) into float: x*cos + rotate_half(x)*sin,
 * each product and the sum rounded to the dtype as apply_rope's three operators do. */
static inline void rope(int dt, const void *x, long xo, const void *cs, const void *sn, long co,
                        long E, float *r) {
    long h = E / 2;
    for (long i = 0; i < E; i++) {
        float rot = i < h ? -ld(dt, x, xo + i + h) : ld(dt, x, xo + i - h);
        r[i] = rnd(dt, rnd(dt, ld(dt, x, xo + i) * ld(dt, cs, co + i)) +
                           rnd(dt, rot * ld(dt, sn, co + i)));
    }
}

/* Row r of qkv [rows, (H + 2K) E]: its K keys, rotated (cos, sin row r), and its K values into
 * the cache at position p of the blocks `table` lists. */
static void write_kv(int dt, const void *qkv, long r, long H, long K, long E, const void *cs,
                     const void *sn, void *ck, void *cv, long block, const int64_t *table,
                     long p) {
    long qw = (H + 2 * K) * E, per_block = K * block * E, blk = table[p / block];
    size_t el = dt ? 2 : 4;
    float kr[E];
    for (long j = 0; j < K; j++) {
        long at = blk * per_block + (j * block + p % block) * E;
        rope(dt, qkv, r * qw + (H + j) * E, cs, sn, r * E, E, kr);
        for (long i = 0; i < E; i++) st(dt, ck, at + i, kr[i]);
        memcpy((char *)cv + at * el, (const char *)qkv + (r * qw + (H + K + j) * E) * el,
               E * el);
    }
}

/* The positions at.. that lie in one cache block of the table `tb` (at most up to `last`): how
 * many, and in *base the offset of the first one's row of KV head j ([blocks, K, block, E]) */
static inline long cached_run(const int64_t *tb, long at, long last, long block, long per_block,
                              long j, long E, long *base) {
    long off = at % block;
    *base = tb[at / block] * per_block + (j * block + off) * E;
    return last + 1 - at < block - off ? last + 1 - at : block - off;
}

#ifdef __AVX512F__
static int decode_head_avx512(int dt, const float *q, const void *ck, const void *cv,
                              const int64_t *tb, long per_block, long j, long block, long E,
                              long first, long last, float scale, float *sc, void *out, long o);
#endif

/* One decode step of a layer's attention for B rows of one new token each.
 *
 * qkv   [B, (H + 2K) * E]   this rank's projections: H query heads, K key heads, K value heads
 * cos, sin [B, E]           the rows' rotary tables (ladder.model.Transformer.rope)
 * ck, cv                    this layer's paged cache, [blocks, K, block, E]
 * tables [B, width], pos [B] row b writes its key and value at position pos[b], that is at
 *                           pos[b] % block of block tables[b, pos[b] / block], and attends to
 *                           its positions 0..pos[b], block by block
 * window                    a row sees only its last `window` positions (0: all); the blocks
 *                           before them are not read (the table may name any block there)
 * out   [B, H * E]          per row, the heads side by side (as y.transpose(1, 2).reshape)
 * kv_map [H]                the KV head each query head reads: h / (H / K) for grouped-query
 *                           attention, any map for the 'even' head split (ladder.tp)
 * scratch                   `stride` floats (>= max pos + 1) for each of the nt threads (scores)
 *
 * The scores are (q . k) * scale in float32, the softmax and the weighted sum of values in
 * float32, the result rounded to the dtype once, as _decode_attention computes them. */
void ladder_attn_decode(int dt, const void *qkv, void *out, long B, long H, long K, long E,
                        const void *cs, const void *sn, void *ck, void *cv, long block,
                        const int64_t *tables, long width, const int64_t *pos, long window,
                        const int64_t *kv_map, float scale, float *scratch, long stride, int nt) {
    long qw = (H + 2 * K) * E, per_block = K * block * E;
    for (long b = 0; b < B; b++) /* the new keys (rotated) and values into the cache */
        write_kv(dt, qkv, b, H, K, E, cs, sn, ck, cv, block, tables + b * width, pos[b]);
    long work = 0;
    for (long b = 0; b < B; b++) work += (window > 0 && pos[b] >= window ? window : pos[b] + 1) * H;
    /* threads from ~4 positions of 16 heads on: even a short context's heads pay for the fork
     * (SmolLM2, 9 heads at 50 / 100 positions: 13.6 -> 8.4 / 21.9 -> 12.3 us a layer) */
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1 && work * E > 4096)
    for (long bh = 0; bh < B * H; bh++) {
        long b = bh / H, h = bh % H, j = kv_map[h], last = pos[b];
        long first = window > 0 && last - window + 1 > 0 ? last - window + 1 : 0;
        const int64_t *tb = tables + b * width;
        int t = omp_get_thread_num();
        float *sc = scratch + t * stride; /* sc[p - first] */
        float q[E], acc[E];
        rope(dt, qkv, b * qw + h * E, cs, sn, b * E, E, q);
#ifdef __AVX512F__
        if (decode_head_avx512(dt, q, ck, cv, tb, per_block, j, block, E, first, last, scale, sc,
                               out, b * H * E + h * E))
            continue;
#endif
        float mx = -INFINITY;
        for (long at = first, m = 0; at <= last; at += m) { /* block by block */
            long base;
            m = cached_run(tb, at, last, block, per_block, j, E, &base);
            for (long p = 0; p < m; p++) {
                long kp = base + p * E;
                float s = 0.f;
                if (dt) {
                    const bf16 *k = (const bf16 *)ck + kp;
#pragma omp simd reduction(+ : s)
                    for (long i = 0; i < E; i++) s += q[i] * bf2f(k[i]);
                } else {
                    const float *k = (const float *)ck + kp;
#pragma omp simd reduction(+ : s)
                    for (long i = 0; i < E; i++) s += q[i] * k[i];
                }
                s *= scale;
                sc[at - first + p] = s;
                if (s > mx) mx = s;
            }
        }
        float sum = softmax_exp(sc, last + 1 - first, mx);
        for (long i = 0; i < E; i++) acc[i] = 0.f;
        for (long at = first, m = 0; at <= last; at += m) {
            long base;
            m = cached_run(tb, at, last, block, per_block, j, E, &base);
            for (long p = 0; p < m; p++) {
                float a = sc[at - first + p] / sum;
                long vp = base + p * E;
                if (dt) {
                    const bf16 *v = (const bf16 *)cv + vp;
#pragma omp simd
                    for (long i = 0; i < E; i++) acc[i] += a * bf2f(v[i]);
                } else {
                    const float *v = (const float *)cv + vp;
#pragma omp simd
                    for (long i = 0; i < E; i++) acc[i] += a * v[i];
                }
            }
        }
        for (long i = 0; i < E; i++) st(dt, out, b * H * E + h * E + i, acc[i]);
    }
}

/* A prompt chunk's attention: T new tokens of one sequence, at positions start..start+T-1.
 *
 * qkv [T, (H + 2K) * E], cos, sin [T, E], ck, cv, block, kv_map, scale: as ladder_attn_decode;
 * table [width]             the sequence's blocks
 * window                    a query sees only the last `window` positions up to its own (0: all)
 * out [T, H * E]            per token, the heads side by side
 * scratch                   `stride` floats for each of the nt threads, stride >=
 *                           ladder_attn_chunk_stride(H, E, start + T)
 *
 * The chunk's keys and values are written first, so each token sees the chunk's earlier tokens
 * as cached positions: causal attention within the chunk and over everything before it. A task
 * is one KV head and up to CHUNK_TILE tokens: the queries of every query head that reads it
 * (M of them), scored together so that each key and value is read once a task, not once a
 * query. With AVX-512 (and E a multiple of 16) the queries lie across the vector lanes: a key's
 * element broadcast against 16 queries' at once, 8 keys in registers; the softmax across the
 * lanes; the values 4 queries by 64 elements in registers. The softmax and the weighted sum in
 * float32 as in the decode kernel (the products fused: this is not torch's order of additions
 * either way), the result rounded to the dtype once. */
#define CHUNK_TILE 32

/* the scratch floats a thread of ladder_attn_chunk needs for n = start + T positions: a task's
 * M <= H * CHUNK_TILE queries, their results and the vector path's scores (chunk_avx512) */
long ladder_attn_chunk_stride(long H, long E, long n) {
    return (H * CHUNK_TILE + 16) * (3 * E + n + 1);
}

typedef struct {
    int dt;
    const void *ck, *cv;
    long per_block, block, j, E, window;
    const int64_t *table;
    float scale;
} chunk_kv;

/* the offset of position p of KV head j in the layer's cache */
static inline long kv_at(const chunk_kv *c, long p) {
    return c->table[p / c->block] * c->per_block + (c->j * c->block + p % c->block) * c->E;
}

/* M queries q [M, E] at positions qpos [M] over cached positions lo..hi-1: y [M, E] (float);
 * sc: scratch of M * (hi - lo) floats */
static void chunk_plain(const chunk_kv *c, const float *q, const long *qpos, long M, long lo,
                        long hi, float *y, float *sc) {
    long E = c->E;
    for (long m = 0; m < M; m++) {
        long pos = qpos[m], first = lo;
        if (c->window > 0 && pos - c->window + 1 > first) first = pos - c->window + 1;
        long n = pos + 1 - first;
        float *row = sc + m * (hi - lo), mx = -INFINITY;
        for (long p = 0; p < n; p++) {
            long kp = kv_at(c, first + p);
            float s = 0.f;
            for (long e = 0; e < E; e++) s += q[m * E + e] * ld(c->dt, c->ck, kp + e);
            row[p] = s * c->scale;
            if (row[p] > mx) mx = row[p];
        }
        float inv = 1.f / softmax_exp(row, n, mx), *a = y + m * E;
        for (long e = 0; e < E; e++) a[e] = 0.f;
        for (long p = 0; p < n; p++) {
            long vp = kv_at(c, first + p);
            for (long e = 0; e < E; e++) a[e] += row[p] * ld(c->dt, c->cv, vp + e);
        }
        for (long e = 0; e < E; e++) a[e] *= inv;
    }
}

#ifdef __AVX512F__
static inline __m512 kv_load16(int dt, const void *base, long at, __mmask16 k) {
    return dt ? bf16x16_load((const bf16 *)base + at, k)
              : _mm512_maskz_loadu_ps(k, (const float *)base + at);
}

/* One head of a decode step over its positions first..last with the query q [E] (rotated) in
 * registers, NV = E / 16 vectors: each position's score one vector dot product, reduced once
 * (the scalar loop's horizontal sum was half the kernel's time), and the weighted sum of values
 * accumulated in registers, not through memory. */
static inline __attribute__((always_inline)) void decode_head_nv(
        int dt, const float *q, const void *ck, const void *cv, const int64_t *tb,
        long per_block, long j, long block, long first, long last, float scale, float *sc,
        void *out, long o, const int NV) {
    const long E = 16 * NV;
    __m512 qv[8], acc[8];
    for (int c = 0; c < NV; c++) {
        qv[c] = _mm512_loadu_ps(q + 16 * c);
        acc[c] = _mm512_setzero_ps();
    }
    float mx = -INFINITY;
    for (long at = first, m = 0; at <= last; at += m) { /* block by block */
        long base;
        m = cached_run(tb, at, last, block, per_block, j, E, &base);
        for (long p = 0; p < m; p++) {
            long kp = base + p * E;
            __m512 d = _mm512_mul_ps(qv[0], kv_load16(dt, ck, kp, 0xffff));
            for (int c = 1; c < NV; c++)
                d = _mm512_fmadd_ps(qv[c], kv_load16(dt, ck, kp + 16 * c, 0xffff), d);
            float s = _mm512_reduce_add_ps(d) * scale;
            sc[at - first + p] = s;
            if (s > mx) mx = s;
        }
    }
    float sum = softmax_exp(sc, last + 1 - first, mx);
    for (long at = first, m = 0; at <= last; at += m) {
        long base;
        m = cached_run(tb, at, last, block, per_block, j, E, &base);
        for (long p = 0; p < m; p++) {
            __m512 a = _mm512_set1_ps(sc[at - first + p] / sum);
            for (int c = 0; c < NV; c++)
                acc[c] = _mm512_fmadd_ps(a, kv_load16(dt, cv, base + p * E + 16 * c, 0xffff),
                                         acc[c]);
        }
    }
    for (int c = 0; c < NV; c++) {
        float v[16];
        _mm512_storeu_ps(v, acc[c]);
        for (int i = 0; i < 16; i++) st(dt, out, o + 16 * c + i, v[i]);
    }
}

/* decode_head_nv for head sizes 16, 32, 64, 96 and 128; 0 (nothing done) for others */
static int decode_head_avx512(int dt, const float *q, const void *ck, const void *cv,
                              const int64_t *tb, long per_block, long j, long block, long E,
                              long first, long last, float scale, float *sc, void *out, long o) {
    switch (E) {
#define HEAD_CASE(NV)                                                                          \
    case 16 * NV:                                                                              \
        decode_head_nv(dt, q, ck, cv, tb, per_block, j, block, first, last, scale, sc, out, o, \
                       NV);                                                                    \
        return 1;
    HEAD_CASE(1) HEAD_CASE(2) HEAD_CASE(4) HEAD_CASE(6) HEAD_CASE(8)
#undef HEAD_CASE
    default: return 0;
    }
}

/* as chunk_plain, for E % 16 == 0; scratch: (M + 15) * (E + hi - lo + 1) floats */
static void chunk_avx512(const chunk_kv *c, const float *q, const long *qpos, long M, long lo,
                         long hi, float *y, float *scratch) {
    long E = c->E, Mp = (M + 15) / 16 * 16, n = hi - lo;
    float *qt = scratch, *sc = qt + E * Mp, *inv = sc + n * Mp; /* qt [E, Mp], sc [n, Mp] */
    for (long e = 0; e < E; e++)
        for (long m = 0; m < Mp; m++) qt[e * Mp + m] = m < M ? q[m * E + e] : 0.f;
    const __m512 scale = _mm512_set1_ps(c->scale);
    for (long g = 0; g < Mp; g += 16) {
        /* scores: 8 keys by 16 queries in registers */
        for (long p = lo; p < hi; p += 8) {
            __m512 acc[8];
            long kp[8];
            for (int u = 0; u < 8; u++) {
                acc[u] = _mm512_setzero_ps();
                kp[u] = kv_at(c, p + u < hi ? p + u : hi - 1);
            }
            for (long e = 0; e < E; e++) {
                __m512 qv = _mm512_loadu_ps(qt + e * Mp + g);
#pragma GCC unroll 8
                for (int u = 0; u < 8; u++)
                    acc[u] = _mm512_fmadd_ps(_mm512_set1_ps(ld(c->dt, c->ck, kp[u] + e)), qv,
                                             acc[u]);
            }
            for (int u = 0; u < 8 && p + u < hi; u++)
                _mm512_storeu_ps(sc + (p + u - lo) * Mp + g, _mm512_mul_ps(acc[u], scale));
        }
        /* softmax across the lanes: each query over its positions (first..pos) */
        int32_t pv[16];
        for (int l = 0; l < 16; l++) pv[l] = (int32_t)(g + l < M ? qpos[g + l] : qpos[M - 1]);
        __m512i posv = _mm512_loadu_si512(pv);
        __m512i firstv = c->window > 0 ? _mm512_sub_epi32(posv, _mm512_set1_epi32(
                                             (int32_t)c->window - 1))
                                       : _mm512_set1_epi32((int32_t)lo);
        __m512 mx = _mm512_set1_ps(-INFINITY), sum = _mm512_setzero_ps();
        for (long p = lo; p < hi; p++) {
            __m512i pp = _mm512_set1_epi32((int32_t)p);
            __mmask16 ok = _mm512_cmple_epi32_mask(pp, posv) & _mm512_cmpge_epi32_mask(pp, firstv);
            mx = _mm512_mask_max_ps(mx, ok, mx, _mm512_loadu_ps(sc + (p - lo) * Mp + g));
        }
        for (long p = lo; p < hi; p++) {
            __m512i pp = _mm512_set1_epi32((int32_t)p);
            __mmask16 ok = _mm512_cmple_epi32_mask(pp, posv) & _mm512_cmpge_epi32_mask(pp, firstv);
            float *at = sc + (p - lo) * Mp + g;
            __m512 ex = _mm512_maskz_mov_ps(ok, _ZGVeN16v_expf(_mm512_sub_ps(
                                                    _mm512_loadu_ps(at), mx)));
            _mm512_storeu_ps(at, ex);
            sum = _mm512_add_ps(sum, ex);
        }
        _mm512_storeu_ps(inv + g, _mm512_div_ps(_mm512_set1_ps(1.f), sum));
    }
    /* values: 4 queries by 64 elements in registers */
    for (long m = 0; m < M; m += 4) {
        for (long e0 = 0; e0 < E; e0 += 64) {
            __mmask16 kc[4];
            for (int v = 0; v < 4; v++) kc[v] = e0 + 16 * v < E ? (__mmask16)0xffff : 0;
            __m512 acc[4][4];
            for (int r = 0; r < 4; r++)
                for (int v = 0; v < 4; v++) acc[r][v] = _mm512_setzero_ps();
            for (long p = lo; p < hi; p++) {
                long vp = kv_at(c, p) + e0;
                __m512 vr[4];
                for (int v = 0; v < 4; v++) vr[v] = kv_load16(c->dt, c->cv, vp + 16 * v, kc[v]);
                const float *w = sc + (p - lo) * Mp + m;
#pragma GCC unroll 4
                for (int r = 0; r < 4; r++) {
                    __m512 wr = _mm512_set1_ps(w[r]);
                    for (int v = 0; v < 4; v++) acc[r][v] = _mm512_fmadd_ps(wr, vr[v], acc[r][v]);
                }
            }
            for (int r = 0; r < 4 && m + r < M; r++) {
                __m512 iv = _mm512_set1_ps(inv[m + r]);
                for (int v = 0; v < 4; v++)
                    _mm512_mask_storeu_ps(y + (m + r) * E + e0 + 16 * v, kc[v],
                                          _mm512_mul_ps(acc[r][v], iv));
            }
        }
    }
}
#endif

void ladder_attn_chunk(int dt, const void *qkv, void *out, long T, long H, long K, long E,
                       const void *cs, const void *sn, void *ck, void *cv, long block,
                       const int64_t *table, long start, long window, const int64_t *kv_map,
                       float scale, float *scratch, long stride, int nt) {
    long qw = (H + 2 * K) * E, per_block = K * block * E, n_all = start + T;
    for (long i = 0; i < T; i++) /* the new keys (rotated) and values into the cache */
        write_kv(dt, qkv, i, H, K, E, cs, sn, ck, cv, block, table, start + i);
    long tiles = (T + CHUNK_TILE - 1) / CHUNK_TILE;
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1 && K * tiles > 1 && \
                                                             T * n_all * E > 65536)
    for (long task = 0; task < K * tiles; task++) {
        long j = task % K, i0 = (task / K) * CHUNK_TILE;
        long nq = T - i0 < CHUNK_TILE ? T - i0 : CHUNK_TILE, hi = start + i0 + nq;
        long heads[H], G = 0;
        for (long h = 0; h < H; h++)
            if (kv_map[h] == j) heads[G++] = h;
        if (!G) continue;
        long M = G * nq; /* query m: head heads[m / nq], token i0 + m % nq */
        long lo = 0, qpos[M]; /* the task's first position any of its queries sees */
        if (window > 0 && start + i0 - window + 1 > 0) lo = start + i0 - window + 1;
        float *q = scratch + omp_get_thread_num() * stride, *y = q + M * E, *rest = y + M * E;
        for (long m = 0; m < M; m++) {
            long i = i0 + m % nq;
            qpos[m] = start + i;
            rope(dt, qkv, i * qw + heads[m / nq] * E, cs, sn, i * E, E, q + m * E);
        }
        chunk_kv c = {dt, ck, cv, per_block, block, j, E, window, table, scale};
#ifdef __AVX512F__
        if (E % 16 == 0) chunk_avx512(&c, q, qpos, M, lo, hi, y, rest);
        else
#endif
            chunk_plain(&c, q, qpos, M, lo, hi, y, rest);
        for (long m = 0; m < M; m++) {
            long i = i0 + m % nq, h = heads[m / nq];
            for (long e = 0; e < E; e++) st(dt, out, i * H * E + h * E + e, y[m * E + e]);
        }
    }
}

/* ---- float32 weight products in a blocked layout (AVX-512) ------------------------------------
 *
 * y [M, out] = x [M, in] @ W.T for a weight stored as Wb [ceil(out / 16)][in][16]: block b holds
 * output columns 16b..16b+15, and for each input i their 16 weights side by side, so that one
 * 64-byte load feeds one fused multiply-add per row of x (x[r, i] broadcast). A tile computes R
 * rows (up to 8) by NB blocks (16 * NB columns) in registers over the whole input, reading each
 * weight once per tile; below 5 rows a tile takes 4 blocks (independent chains for one row),
 * from 5 rows on 2 (also for the rows left at the end of a chunk). The blocks are shared among
 * the OpenMP threads (torch's pool and thread count); rows come in chunks of 128 so that a
 * chunk of x stays in L2 across the blocks.
 *
 * Against oneDNN's packed float32 product (ladder.kernels), one thread, SmolLM2's shapes: 0.72-0.91
 * of its time at 1 row, 0.75-1.08 at 16 rows; two threads 0.80-1.05 and 0.67-1.07. The gain at
 * one row is mostly oneDNN's fixed ~10 us per call, 121 calls a token. */

#ifdef __AVX512F__
#include <immintrin.h>
#define INLINE static inline __attribute__((always_inline))

INLINE void gemm_tile(const float *x, long ldx, const float *wb, long in, float *y, long ldy,
                      const int R, const int NB, __mmask16 last) {
    __m512 acc[8][4];
    for (int r = 0; r < R; r++)
        for (int b = 0; b < NB; b++) acc[r][b] = _mm512_setzero_ps();
    for (long i = 0; i < in; i++) {
        __m512 w[4];
        for (int b = 0; b < NB; b++) w[b] = _mm512_loadu_ps(wb + b * in * 16 + i * 16);
        for (int r = 0; r < R; r++) {
            __m512 xv = _mm512_set1_ps(x[r * ldx + i]);
            for (int b = 0; b < NB; b++) acc[r][b] = _mm512_fmadd_ps(w[b], xv, acc[r][b]);
        }
    }
    for (int r = 0; r < R; r++)
        for (int b = 0; b < NB; b++)
            _mm512_mask_storeu_ps(y + r * ldy + b * 16, b == NB - 1 ? last : (__mmask16)0xffff,
                                  acc[r][b]);
}

/* A tile kernel's dispatcher: R (1-8) and NB (4, 2 or 1) become compile-time constants, so that
 * each combination keeps its accumulators in registers. */
#define TILE_CASE(K, R, NB) case R: K(x, ldx, wb, in, y, ldy, R, NB, last); break;
#define TILE_DISPATCH(NAME, K, T)                                                              \
    static void NAME(const void *xv, long ldx, const void *wv, long in, void *yv, long ldy,    \
                     int R, int NB, __mmask16 last) {                                          \
        const T *x = xv, *wb = wv;                                                             \
        T *y = yv;                                                                             \
        if (NB == 4 && R <= 4) {                                                               \
            switch (R) { TILE_CASE(K, 1, 4) TILE_CASE(K, 2, 4) TILE_CASE(K, 3, 4)              \
                         default: K(x, ldx, wb, in, y, ldy, 4, 4, last); }                     \
        } else if (NB == 2) {                                                                  \
            switch (R) { TILE_CASE(K, 1, 2) TILE_CASE(K, 2, 2) TILE_CASE(K, 3, 2)              \
                         TILE_CASE(K, 4, 2) TILE_CASE(K, 5, 2) TILE_CASE(K, 6, 2)              \
                         TILE_CASE(K, 7, 2) default: K(x, ldx, wb, in, y, ldy, 8, 2, last); }  \
        } else {                                                                               \
            switch (R) { TILE_CASE(K, 1, 1) TILE_CASE(K, 2, 1) TILE_CASE(K, 3, 1)              \
                         TILE_CASE(K, 4, 1) TILE_CASE(K, 5, 1) TILE_CASE(K, 6, 1)              \
                         TILE_CASE(K, 7, 1) default: K(x, ldx, wb, in, y, ldy, 8, 1, last); }  \
        }                                                                                      \
    }

TILE_DISPATCH(tile_nb, gemm_tile, float)

static __mmask16 cols_mask(long out, long block) {
    long v = out - block * 16;
    return v >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << v) - 1);
}

/* A tile kernel over one dtype: R rows of x by NB blocks of weights into y. */
typedef void (*tile_fn)(const void *x, long ldx, const void *wb, long in, void *y, long ldy,
                        int R, int NB, __mmask16 last);

/* The loops shared by both dtypes: row chunks of 128, weight blocks in groups of NB over the
 * threads, tiles of up to 8 rows. `el` is the element size, `block` a weight block's elements. */
static void gemm_drive(tile_fn tile, const char *x, const char *wb, char *y, long M, long out,
                       long in, long el, long block, int nt) {
    long nb = (out + 15) / 16;
    int NB = M >= 5 ? 2 : 4;
    long groups = (nb + NB - 1) / NB;
    for (long m0 = 0; m0 < M; m0 += 128) {
        long mc = M - m0 < 128 ? M - m0 : 128;
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1 && nb * 16 * in >= 65536)
        for (long g = 0; g < groups; g++) {
            long b0 = g * NB, n = nb - b0 < NB ? nb - b0 : NB;
            for (long r0 = 0; r0 < mc; r0 += 8) {
                int R = mc - r0 < 8 ? (int)(mc - r0) : 8;
                const char *xp = x + (m0 + r0) * in * el;
                char *yp = y + ((m0 + r0) * out + b0 * 16) * el;
                if (n == NB) /* fewer than 5 rows only when M is: then NB is 4 */
                    tile(xp, in, wb + b0 * block * el, in, yp, out, R, NB,
                         cols_mask(out, b0 + NB - 1));
                else
                    for (long b = 0; b < n; b++)
                        tile(xp, in, wb + (b0 + b) * block * el, in, yp + b * 16 * el, out, R, 1,
                             cols_mask(out, b0 + b));
            }
        }
    }
}

void ladder_gemm_f32(const float *x, const float *wb, float *y, long M, long out, long in,
                     int nt) {
    gemm_drive(tile_nb, (const char *)x, (const char *)wb, (char *)y, M, out, in, 4, in * 16,
               nt);
}

/* ---- bfloat16 weight products (AVX512-BF16) ---------------------------------------------------
 *
 * The same tiles over Wb [ceil(out / 16)][ceil(in / 2)][16][2]: for each pair of inputs, the 16
 * outputs' two weights side by side, so one 64-byte load and a broadcast pair of x feed one
 * vdpbf16ps (32 products, summed in float32). The result is rounded to bfloat16 once, as
 * oneDNN's bfloat16 product does; only the order of the float32 additions differs. */
#ifdef __AVX512BF16__
INLINE void bgemm_tile(const bf16 *x, long ldx, const bf16 *wb, long in, bf16 *y, long ldy,
                       const int R, const int NB, __mmask16 last) {
    long pairs = (in + 1) / 2, full = in / 2;
    __m512 acc[8][4];
    for (int r = 0; r < R; r++)
        for (int b = 0; b < NB; b++) acc[r][b] = _mm512_setzero_ps();
    for (long p = 0; p < pairs; p++) {
        __m512i w[4];
        for (int b = 0; b < NB; b++)
            w[b] = _mm512_loadu_si512((const void *)(wb + (b * pairs + p) * 32));
        for (int r = 0; r < R; r++) {
            uint32_t two;
            if (p < full) memcpy(&two, x + r * ldx + 2 * p, 4);
            else two = x[r * ldx + 2 * p]; /* odd input count: the pad input is 0 */
            __m512bh xv = (__m512bh)_mm512_set1_epi32((int)two);
            for (int b = 0; b < NB; b++)
                acc[r][b] = _mm512_dpbf16_ps(acc[r][b], (__m512bh)w[b], xv);
        }
    }
    for (int r = 0; r < R; r++)
        for (int b = 0; b < NB; b++)
            _mm256_mask_storeu_epi16(y + r * ldy + b * 16, b == NB - 1 ? last : (__mmask16)0xffff,
                                     (__m256i)_mm512_cvtneps_pbh(acc[r][b]));
}

TILE_DISPATCH(btile_nb, bgemm_tile, bf16)

void ladder_gemm_bf16(const bf16 *x, const bf16 *wb, bf16 *y, long M, long out, long in,
                      int nt) {
    gemm_drive(btile_nb, (const char *)x, (const char *)wb, (char *)y, M, out, in, 2,
               (in + 1) / 2 * 32, nt);
}
#define BF16_GEMM 2
#else
#define BF16_GEMM 0
#endif

int ladder_native_features(void) { return 1 | BF16_GEMM; } /* bits: gemm_f32, gemm_bf16 */
#else
int ladder_native_features(void) { return 0; }
#endif

/* ---- quantized weight products: Q8_0, Q4_0, Q4_1 kept quantized (AVX512-VNNI) ---------------
 *
 * GGUF's block formats hold 32 inputs of one output column as small integers and a scale:
 * Q8_0 w = d q (q in -127..127), Q4_0 w = d (u - 8), Q4_1 w = d u + m (u in 0..15). All three are
 * w = d u + m with u unsigned (Q8_0: u = q + 128, m = -128 d; Q4_0: m = -8 d), so one product
 * serves them, as llama.cpp's does: each row of x is quantized to int8 per block of 32
 * (x ~ dx xq, dx = max |x| / 127), and a block's share of y is
 *
 *     dx (d dot(u, xq) + m sum(xq))
 *
 * with dot(u, xq) exact in int32 (vpdpbusd: unsigned bytes times signed bytes, four a lane).
 * The weights are laid out for it, Wq [ceil(out / 16)][in / 32][S]: for 16 output columns and
 * one block of 32 inputs, their integers (u8: 8 groups of 64 bytes, byte 4c + t of group g is
 * column c's input 4g + t; u4: 4 groups, byte 4c + t of group k holds column c's inputs 8k + t in
 * its low and 8k + 4 + t in its high nibble), then the 16 columns' d and m as float16: S = 576
 * bytes (u8) or 320 (u4), 1.125 and 0.625 bytes a weight. A weight is never widened in memory:
 * one 64-byte load feeds 64 (u8) or 128 (u4) products of every row of the tile.
 *
 * `bits` is 8 or 4; x [M, in] float32 (in a multiple of 32), y [M, out] float32. `xq` is the
 * caller's scratch of ladder_qgemm_scratch(M, in) bytes for the quantized rows. */

long ladder_qgemm_scratch(long M, long in) { return M * in + 2 * M * (in / 32) * 4 + 64; }

/* The scratch's parts: xq [M, in] int8, then (aligned to 64) dx and dx sum(xq) [M, in / 32] */
typedef struct { int8_t *xq; float *dx, *sx; } qrows;

static qrows qrows_in(void *scratch, long M, long in) {
    qrows q = {.xq = scratch};
    q.dx = (float *)(((uintptr_t)(q.xq + M * in) + 63) & ~(uintptr_t)63);
    q.sx = q.dx + M * (in / 32);
    return q;
}

static float h2f(uint16_t h) { /* float16 -> float32 (the scales; normal, subnormal, zero) */
    uint32_t s = (uint32_t)(h >> 15) << 31, e = (h >> 10) & 31, f = h & 1023;
    union { uint32_t u; float f; } c;
    if (e == 0) { c.f = (float)f * (1.0f / 16777216.0f); c.u |= s; return c.f; }
    c.u = s | (e == 31 ? 0x7f800000u | (f << 13) : ((e + 112) << 23) | (f << 13));
    return c.f;
}

/* x rows -> int8 per block of 32 (to nearest, ties to even), with each block's dx and
 * dx * sum(xq); rows shared among the threads where there are many */
static void quantize_rows(const float *x, long M, long in, int8_t *xq, float *dx, float *sx,
                          int nt) {
    long nblk = in / 32;
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1 && M * in >= 16384)
    for (long r = 0; r < M; r++)
        for (long j = 0; j < nblk; j++) {
            const float *v = x + r * in + j * 32;
            int8_t *q = xq + r * in + j * 32;
            int sum = 0;
            float d;
#ifdef __AVX512F__
            __m512 a = _mm512_loadu_ps(v), b = _mm512_loadu_ps(v + 16);
            d = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b))) / 127.0f;
            __m512 id = _mm512_set1_ps(d != 0.0f ? 1.0f / d : 0.0f);
            __m512i qa = _mm512_cvtps_epi32(_mm512_mul_ps(a, id));
            __m512i qb = _mm512_cvtps_epi32(_mm512_mul_ps(b, id));
            _mm_storeu_si128((__m128i *)q, _mm512_cvtepi32_epi8(qa));
            _mm_storeu_si128((__m128i *)(q + 16), _mm512_cvtepi32_epi8(qb));
            sum = _mm512_reduce_add_epi32(_mm512_add_epi32(qa, qb));
#else
            float amax = 0.0f;
            for (int i = 0; i < 32; i++) amax = fmaxf(amax, fabsf(v[i]));
            d = amax / 127.0f;
            float id = d != 0.0f ? 1.0f / d : 0.0f;
            for (int i = 0; i < 32; i++) {
                int qi = (int)nearbyintf(v[i] * id);
                q[i] = (int8_t)qi;
                sum += qi;
            }
#endif
            dx[r * nblk + j] = d;
            sx[r * nblk + j] = d * (float)sum;
        }
}

/* The plain-C product (any CPU; also the reference of the vector one): the same int32 dots,
 * the same float terms, added in the same order. */
static void qgemm_plain(const int8_t *xq, const float *dx, const float *sx, const uint8_t *wq,
                        float *y, long M, long out, long in, int bits, long b0, long b1) {
    long nblk = in / 32, S = bits == 8 ? 576 : 320, data = S - 64;
    for (long r = 0; r < M; r++)
        for (long b = b0; b < b1; b++)
            for (int c = 0; c < 16 && b * 16 + c < out; c++) {
                float acc = 0.0f;
                for (long j = 0; j < nblk; j++) {
                    const uint8_t *blk = wq + (b * nblk + j) * S;
                    const int8_t *xv = xq + r * in + j * 32;
                    int dot = 0;
                    for (int i = 0; i < 32; i++) {
                        int u;
                        if (bits == 8) u = blk[(i / 4) * 64 + 4 * c + i % 4];
                        else {
                            uint8_t two = blk[(i / 8) * 64 + 4 * c + i % 4];
                            u = i % 8 < 4 ? two & 15 : two >> 4;
                        }
                        dot += u * xv[i];
                    }
                    const uint16_t *sc = (const uint16_t *)(blk + data);
                    float t = (float)dot * dx[r * nblk + j];
                    acc = acc + t * h2f(sc[c]);
                    acc = acc + h2f(sc[16 + c]) * sx[r * nblk + j];
                }
                y[r * out + b * 16 + c] = acc;
            }
}

#if defined(__AVX512F__) && defined(__AVX512VNNI__)
/* R rows by NB column blocks: the integers of a block of 32 inputs are loaded (and, for u4,
 * split into nibbles) once and fed to every row; each row's int32 dot becomes float once a
 * block, scaled by dx, then d, plus m dx sum(xq). */
INLINE void qtile(const int8_t *xq, const float *dx, const float *sx, const uint8_t *wq,
                  float *y, long out, long in, const int bits, const int R, const int NB,
                  long b0) {
    long nblk = in / 32, S = bits == 8 ? 576 : 320, data = S - 64;
    const __m512i low4 = _mm512_set1_epi8(15);
    __m512 acc[4][4];
    for (int r = 0; r < R; r++)
        for (int b = 0; b < NB; b++) acc[r][b] = _mm512_setzero_ps();
    for (long j = 0; j < nblk; j++) {
        __m512i dot[4][4], two[4][4]; /* two chains a tile place: half the dependent latency */
        for (int r = 0; r < R; r++)
            for (int b = 0; b < NB; b++) dot[r][b] = two[r][b] = _mm512_setzero_si512();
        for (int g = 0; g < (bits == 8 ? 8 : 4); g++) {
            for (int b = 0; b < NB; b++) {
                __m512i w = _mm512_loadu_si512(wq + ((b0 + b) * nblk + j) * S + g * 64);
                if (bits == 8) {
                    for (int r = 0; r < R; r++) {
                        int32_t four;
                        memcpy(&four, xq + r * in + j * 32 + 4 * g, 4);
                        if (g % 2)
                            two[r][b] = _mm512_dpbusd_epi32(two[r][b], w, _mm512_set1_epi32(four));
                        else
                            dot[r][b] = _mm512_dpbusd_epi32(dot[r][b], w, _mm512_set1_epi32(four));
                    }
                } else {
                    __m512i lo = _mm512_and_si512(w, low4);
                    __m512i hi = _mm512_and_si512(_mm512_srli_epi16(w, 4), low4);
                    for (int r = 0; r < R; r++) {
                        int32_t a, c;
                        memcpy(&a, xq + r * in + j * 32 + 8 * g, 4);
                        memcpy(&c, xq + r * in + j * 32 + 8 * g + 4, 4);
                        dot[r][b] = _mm512_dpbusd_epi32(dot[r][b], lo, _mm512_set1_epi32(a));
                        two[r][b] = _mm512_dpbusd_epi32(two[r][b], hi, _mm512_set1_epi32(c));
                    }
                }
            }
        }
        for (int r = 0; r < R; r++)
            for (int b = 0; b < NB; b++) dot[r][b] = _mm512_add_epi32(dot[r][b], two[r][b]);
        for (int b = 0; b < NB; b++) {
            const uint8_t *sc = wq + ((b0 + b) * nblk + j) * S + data;
            __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)sc));
            __m512 m = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(sc + 32)));
            for (int r = 0; r < R; r++) {
                __m512 t = _mm512_mul_ps(_mm512_cvtepi32_ps(dot[r][b]),
                                         _mm512_set1_ps(dx[r * nblk + j]));
                acc[r][b] = _mm512_fmadd_ps(t, d, acc[r][b]);
                acc[r][b] = _mm512_fmadd_ps(m, _mm512_set1_ps(sx[r * nblk + j]), acc[r][b]);
            }
        }
    }
    for (int r = 0; r < R; r++)
        for (int b = 0; b < NB; b++)
            _mm512_mask_storeu_ps(y + r * out + (b0 + b) * 16, cols_mask(out, b0 + b), acc[r][b]);
}

#define QTILE_ROWS(BITS, NB)                                                                  \
    switch (R) {                                                                              \
    case 1: qtile(xq, dx, sx, wq, y, out, in, BITS, 1, NB, b0); break;                        \
    case 2: qtile(xq, dx, sx, wq, y, out, in, BITS, 2, NB, b0); break;                        \
    case 3: qtile(xq, dx, sx, wq, y, out, in, BITS, 3, NB, b0); break;                        \
    default: qtile(xq, dx, sx, wq, y, out, in, BITS, 4, NB, b0); }

/* R rows (1-4) by NB blocks (1 below 16 rows, else 2; 1 for a block left over) */
static void qtile_any(const int8_t *xq, const float *dx, const float *sx, const uint8_t *wq,
                      float *y, long out, long in, int bits, int R, int NB, long b0) {
    if (bits == 8) {
        if (NB == 2) { QTILE_ROWS(8, 2) } else { QTILE_ROWS(8, 1) }
    } else {
        if (NB == 2) { QTILE_ROWS(4, 2) } else { QTILE_ROWS(4, 1) }
    }
}
#define QGEMM_VNNI 1
#else
#define QGEMM_VNNI 0
#endif

int ladder_qgemm_vnni(void) { return QGEMM_VNNI; }

void ladder_qgemm(const float *x, const uint8_t *wq, float *y, long M, long out, long in,
                  int bits, void *scratch, int nt) {
    long nblk = in / 32, nb = (out + 15) / 16;
    qrows q = qrows_in(scratch, M, in);
    int8_t *xq = q.xq;
    float *dx = q.dx, *sx = q.sx;
    quantize_rows(x, M, in, xq, dx, sx, nt);
#if QGEMM_VNNI
    /* one block a tile below 16 rows: each thread then streams its blocks' bytes in one run
     * (the layout is [block][in / 32][S]), which this memory system prefers to four interleaved
     * streams; SmolLM2's q4_1 layers, 2 threads, same run: 1.22x (1 row), 1.33x (4), 1.05x (8)
     * faster than tiles of 4 or 2 blocks; from 16 rows on, 2 blocks share each row's loads */
    int NB = M < 16 ? 1 : 2;
    long groups = (nb + NB - 1) / NB;
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1 && nb * 16 * in >= 65536)
    for (long g = 0; g < groups; g++) {
        long b0 = g * NB, n = nb - b0 < NB ? nb - b0 : NB;
        for (long r0 = 0; r0 < M; r0 += 4) {
            int R = M - r0 < 4 ? (int)(M - r0) : 4;
            const int8_t *xr = xq + r0 * in;
            const float *dr = dx + r0 * nblk, *sr = sx + r0 * nblk;
            if (n == NB) qtile_any(xr, dr, sr, wq, y + r0 * out, out, in, bits, R, NB, b0);
            else
                for (long b = b0; b < b0 + n; b++)
                    qtile_any(xr, dr, sr, wq, y + r0 * out, out, in, bits, R, 1, b);
        }
    }
#else
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1 && nb * 16 * in >= 65536)
    for (long b = 0; b < nb; b++) qgemm_plain(xq, dx, sx, wq, y, M, out, in, bits, b, b + 1);
#endif
}

/* The plain-C product on any CPU (tests compare the vector one with it). */
void ladder_qgemm_reference(const float *x, const uint8_t *wq, float *y, long M, long out,
                            long in, int bits, void *scratch) {
    qrows q = qrows_in(scratch, M, in);
    quantize_rows(x, M, in, q.xq, q.dx, q.sx, 1);
    qgemm_plain(q.xq, q.dx, q.sx, wq, y, M, out, in, bits, 0, (out + 15) / 16);
}

/* ---- a decode step's module in one call ------------------------------------------------------
 *
 * A layer's attention (norm, q/k/v product, rotary + cache write + attention, o product) and its
 * MLP (norm, gate/up product, silu(gate) * up, down product) each as one call, for steps of one
 * new token a row: the same kernels as the separate calls above, in the same order, so the same
 * results to the bit; what goes is the ~40 us of Python and ctypes a module spent between them
 * (ladder/native/layouts.py, NativeBlock). The module's weights and shapes are described once
 * (ladder_module), the step's rows, cache and scratch once a step (ladder_step). */

typedef struct {
    int kind;          /* 0: float32 blocked, 1: bfloat16 blocked, 8 / 4: quantized (bits) */
    long out, in;
    const void *w;
    const void *bias;  /* [out] in the activation dtype, added after the product; or NULL */
} ladder_linear;

typedef struct {
    int dt;            /* the activations' dtype code */
    long dim;
    const void *norm;  /* [dim], the activations' dtype */
    float eps;
    ladder_linear first, second; /* attention: wqkv, wo; MLP: w13 (gate rows, then up), w2 */
    long H, K, E;      /* attention: this rank's query and KV heads, the head dim */
    const int64_t *kv_map;
    float scale;
    long window, layer;
} ladder_module;

typedef struct {
    long B;                      /* rows, one new token each */
    const void *cos, *sin;       /* [B, E] */
    char *k, *v;                 /* the cache's keys and values, all layers */
    long layer_bytes, block;     /* one layer's bytes of each; positions a block */
    const int64_t *tables;       /* [B, width] */
    long width;
    const int64_t *pos;          /* [B] */
    float *scores;               /* `stride` floats for each of the nt threads */
    long stride;
    char *work;                  /* ladder_module_work(module, B) bytes */
    int nt;
} ladder_step;

static long align64(long n) { return (n + 63) & ~63L; }

/* The work bytes a module needs for B rows: its normed input, the first product's output, the
 * second's input, and the quantized products' scratch. */
long ladder_module_work(const ladder_module *m, long B) {
    long el = m->dt ? 2 : 4;
    long q1 = m->first.kind >= 4 ? ladder_qgemm_scratch(B, m->first.in) : 0;
    long q2 = m->second.kind >= 4 ? ladder_qgemm_scratch(B, m->second.in) : 0;
    return align64(B * m->dim * el) + align64(B * m->first.out * el) +
           align64(B * m->second.in * el) + align64(q1 > q2 ? q1 : q2);
}

static void linear(const ladder_linear *l, int dt, const void *x, void *y, long M, void *qs,
                   int nt) {
    switch (l->kind) {
#ifdef __AVX512F__
    case 0: ladder_gemm_f32(x, l->w, y, M, l->out, l->in, nt); break;
#endif
#if BF16_GEMM
    case 1: ladder_gemm_bf16(x, l->w, y, M, l->out, l->in, nt); break;
#endif
    default: ladder_qgemm(x, l->w, y, M, l->out, l->in, l->kind, qs, nt);
    }
    if (l->bias) /* as y.add_(bias): the sum rounded to the dtype */
        for (long r = 0; r < M; r++)
            for (long o = 0; o < l->out; o++)
                st(dt, y, r * l->out + o, ld(dt, y, r * l->out + o) + ld(dt, l->bias, o));
}

/* The work's parts: normed input, first product's output, second product's input, scratch */
static void work_parts(const ladder_module *m, const ladder_step *s, char **p) {
    long el = m->dt ? 2 : 4, B = s->B;
    p[0] = s->work;
    p[1] = p[0] + align64(B * m->dim * el);
    p[2] = p[1] + align64(B * m->first.out * el);
    p[3] = p[2] + align64(B * m->second.in * el);
}

/* y [B, dim] = this rank's partial output of the module for x [B, dim] (the residual stream):
 * norm, first product, attention (rotation, cache write, attention) or silu(gate) * up, second
 * product */
static void run_module(const ladder_module *m, const ladder_step *s, const void *x, void *y,
                       int attention) {
    char *p[4];
    work_parts(m, s, p);
    long B = s->B;
    ladder_rmsnorm(m->dt, x, m->norm, p[0], B, m->dim, m->eps);
    linear(&m->first, m->dt, p[0], p[1], B, p[3], s->nt);
    if (attention)
        ladder_attn_decode(m->dt, p[1], p[2], B, m->H, m->K, m->E, s->cos, s->sin,
                           s->k + m->layer * s->layer_bytes, s->v + m->layer * s->layer_bytes,
                           s->block, s->tables, s->width, s->pos, m->window, m->kv_map,
                           m->scale, s->scores, s->stride, s->nt);
    else
        ladder_silu_mul(m->dt, p[1], p[2], B, m->second.in, s->nt);
    linear(&m->second, m->dt, p[2], y, B, p[3], s->nt);
}

void ladder_attn_module(const ladder_module *m, const ladder_step *s, const void *x, void *y) {
    run_module(m, s, x, y, 1);
}

void ladder_mlp_module(const ladder_module *m, const ladder_step *s, const void *x, void *y) {
    run_module(m, s, x, y, 0);
}

/* h[i] += y[i] for B rows of D: as torch's h + y (the sum rounded to the dtype) */
static void residual_add(int dt, void *h, const void *y, long n) {
    if (dt) {
        for (long i = 0; i < n; i++) st(1, h, i, ld(1, h, i) + ld(1, y, i));
    } else {
        float *a = h;
        const float *b = y;
        for (long i = 0; i < n; i++) a[i] += b[i];
    }
}

/* The all-reduces of a decode step's layers through ladder.links.shm's segment: the same
 * protocol as ShmComm (read its docstring), so a step may mix them. A reduce copies this rank's
 * partial into its buffer of the next slot and publishes the sequence; a wait waits for every
 * rank to publish it, sums the buffers in rank order (half precision of more than two ranks in
 * float32, rounded once) into the output, and says it is done. Waits poll with sched_yield for
 * 20 ms, then sleep in futex_wait (2 ms naps); every 50 ms they check that the peer lives (its
 * pid word's process, not a zombie) and that `timeout_s` has not passed, else the step stops
 * with -1 and `failed_*` say why. No Python runs meanwhile (a signal is handled once the call
 * returns). */
typedef struct {
    volatile int64_t *w;         /* the control words */
    char *ring;                  /* n_slots x world buffers of slot_bytes */
    long world, rank, n_slots, slot_bytes;
    long pub[8], done[8], sleep[8], pid[8]; /* each rank's words' indices in w */
    int64_t seq, done_seq, min_done; /* ShmComm's counters, in and out */
    double timeout_s;
    double wait_s[2];            /* out: seconds waited for module / ladder reduces */
    long waits[2];
    double exposed_s;            /* out: seconds waiting for a slot to be free */
    long failed_peer, failed_why, failed_pid; /* out: the peer given up on; 1 died, 2 timeout */
} ladder_shm;

/* whether process `pid` runs (a zombie, killed but not reaped, does not) */
static int pid_alive(long pid) {
    char path[64], buf[512];
    snprintf(path, sizeof path, "/proc/%ld/stat", pid);
    int fd = open(path, O_RDONLY);
    if (fd < 0) return 0;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0) return 0;
    buf[n] = 0;
    char *p = strrchr(buf, ')'); /* the name may hold anything; the state follows its ')' */
    if (!p || !p[1] || !p[2]) return 1;
    return p[2] != 'Z' && p[2] != 'X';
}

static double now_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static int shm_block(ladder_shm *c, long idx, int64_t target, long peer) {
    volatile int64_t *w = c->w;
    int64_t seen;
    if (__atomic_load_n(&w[idx], __ATOMIC_ACQUIRE) >= target) return 0;
    double t0 = now_s(), check = t0 + 0.05;
    while ((seen = __atomic_load_n(&w[idx], __ATOMIC_ACQUIRE)) < target) {
        double t = now_s();
        if (t >= check) {
            long pid = (long)__atomic_load_n(&w[c->pid[peer]], __ATOMIC_ACQUIRE);
            int why = pid && !pid_alive(pid) ? 1 : t - t0 > c->timeout_s ? 2 : 0;
            if (why) {
                c->failed_peer = peer, c->failed_why = why, c->failed_pid = pid;
                return -1;
            }
            check = t + 0.05;
        }
        if (t - t0 < 0.02) {
            sched_yield();
        } else {
            struct timespec nap = {0, 2000000};
            __atomic_store_n(&w[c->sleep[c->rank]], 1, __ATOMIC_SEQ_CST);
            if (__atomic_load_n(&w[idx], __ATOMIC_SEQ_CST) == seen)
                syscall(SYS_futex, (void *)&w[idx], FUTEX_WAIT, (int)(seen & 0xFFFFFFFF), &nap,
                        NULL, 0);
            __atomic_store_n(&w[c->sleep[c->rank]], 0, __ATOMIC_SEQ_CST);
        }
    }
    return 0;
}

static void shm_store(ladder_shm *c, long idx, int64_t v) {
    __atomic_store_n(&c->w[idx], v, __ATOMIC_SEQ_CST);
    for (long r = 0; r < c->world; r++)
        if (r != c->rank && __atomic_load_n(&c->w[c->sleep[r]], __ATOMIC_SEQ_CST)) {
            syscall(SYS_futex, (void *)&c->w[idx], FUTEX_WAKE, 1 << 30, NULL, NULL, 0);
            return;
        }
}

static char *shm_buf(ladder_shm *c, int64_t seq, long r) {
    return c->ring + ((seq % c->n_slots) * c->world + r) * c->slot_bytes;
}

/* publish y (bytes) as the next sequence, once its slot is free everywhere; returns it */
static int64_t shm_publish(ladder_shm *c, const void *y, long bytes) {
    int64_t seq = ++c->seq, need = seq - c->n_slots;
    if (need > c->min_done) {
        double t0 = now_s();
        int64_t low = c->done_seq;
        for (long r = 0; r < c->world; r++) {
            if (r == c->rank) continue;
            if (shm_block(c, c->done[r], need, r)) return -1;
            int64_t d = __atomic_load_n(&c->w[c->done[r]], __ATOMIC_ACQUIRE);
            if (d < low) low = d;
        }
        c->min_done = low;
        c->exposed_s += now_s() - t0;
    }
    memcpy(shm_buf(c, seq, c->rank), y, bytes);
    shm_store(c, c->pub[c->rank], seq);
    return seq;
}

/* wait for sequence `seq` everywhere and sum it into y [n] (dtype dt) */
static int shm_wait(ladder_shm *c, int64_t seq, int dt, void *y, long n, int kind) {
    double t0 = now_s();
    for (long r = 0; r < c->world; r++)
        if (r != c->rank && shm_block(c, c->pub[r], seq, r)) return -1;
    if (dt == 0 || c->world == 2) {
        const void *v0 = shm_buf(c, seq, 0);
        for (long i = 0; i < n; i++) {
            float a = ld(dt, v0, i);
            for (long r = 1; r < c->world; r++)
                a = rnd(dt, a + ld(dt, shm_buf(c, seq, r), i));
            st(dt, y, i, a);
        }
    } else { /* half precision, more than two ranks: float32, rounded once */
        for (long i = 0; i < n; i++) {
            float a = ld(dt, shm_buf(c, seq, 0), i);
            for (long r = 1; r < c->world; r++) a += ld(dt, shm_buf(c, seq, r), i);
            st(dt, y, i, a);
        }
    }
    c->done_seq = seq;
    shm_store(c, c->done[c->rank], seq);
    c->wait_s[kind] += now_s() - t0;
    c->waits[kind]++;
    return 0;
}

/* One reduce at a time from Python (ladder.links.shm.ShmComm.run_native's fn), as the layers'
 * loop issues them: `ladder plan --calibrate` times the link this way (bench.plan_links).
 * publish returns the sequence or -1; wait (kind 0: module, 1: ladder) 0 or -1. */
int64_t ladder_shm_publish(ladder_shm *c, const void *y, long bytes) {
    return shm_publish(c, y, bytes);
}

int ladder_shm_wait(ladder_shm *c, int64_t seq, int dt, void *y, long n, int kind) {
    return shm_wait(c, seq, dt, y, n, kind);
}

/* The stream takes a module's output: its all-reduce (sequence seq, of the kind given) waited
 * for when there is a group, then added. 0, or -1 when the wait gave up. */
static int join_stream(ladder_shm *comm, int64_t seq, int kind, int dt, void *h, void *y,
                       long size) {
    if (comm && shm_wait(comm, seq, dt, y, size, kind)) return -1;
    residual_add(dt, h, y, size);
    return 0;
}

/* A decode step's layers, one call: h [B, dim] (the embedded tokens) becomes the stream after
 * the last module, before the final norm. mods: the n modules in the model's order (each
 * layer's attention, then its MLP); flags[i]: LADDER_READS_BEHIND (module i reads the stream
 * without the output still pending from before it), LADDER_DEFERS (module i's output joins the
 * stream after the next module's: its reduce overlaps that module). The schedule of
 * Transformer.hidden, the same additions in the same order, so the same bits. `comm`: the
 * group's segment, or NULL (TP=1 or desync: nothing is reduced). ya, yb: two [B, dim] buffers
 * (a module's output and the one pending). Returns 0, or -1 when a wait gave up. */
enum { LADDER_READS_BEHIND = 1, LADDER_DEFERS = 2 };

int ladder_decode_layers(const ladder_module *const *mods, const unsigned char *flags, long n,
                         const ladder_step *s, void *h, void *ya, void *yb, ladder_shm *comm) {
    if (n <= 0) return 0;
    long size = s->B * mods[0]->dim;
    int dt = mods[0]->dt;
    long bytes = size * (dt ? 2 : 4);
    void *cur = ya, *pend = yb;
    int64_t pend_seq = 0; /* the pending output's sequence (0: none pending) */
    int pending = 0;
    for (long i = 0; i < n; i++) {
        const ladder_module *m = mods[i];
        if (!(flags[i] & LADDER_READS_BEHIND) && pending) {
            if (join_stream(comm, pend_seq, 1, dt, h, pend, size)) return -1;
            pending = 0;
        }
        run_module(m, s, h, cur, m->H > 0);
        int64_t seq = 0;
        if (comm && (seq = shm_publish(comm, cur, bytes)) < 0) return -1;
        if (flags[i] & LADDER_DEFERS) {
            if (pending && join_stream(comm, pend_seq, 1, dt, h, pend, size)) return -1;
            void *t = pend; pend = cur; cur = t;
            pend_seq = seq;
            pending = 1;
        } else if (join_stream(comm, seq, 0, dt, h, cur, size)) {
            return -1;
        }
    }
    return pending ? join_stream(comm, pend_seq, 1, dt, h, pend, size) : 0;
}

/* The numpy backend's optional fast path: KV storage codecs and fused RoPE.
 *
 * Plain C99, no Python headers; _native.py compiles it on first use and calls
 * it through ctypes (which releases the GIL). Formats: 0 float32, 1 IEEE
 * half bits, 2 bfloat16 bits. Every kernel walks (planes, rows, cols) with
 * the strides of the planes and rows given in elements and cols contiguous,
 * so the backend writes its (n_kv, positions, d) layout straight from an
 * (n, n_kv, d) chunk. With AVX2, F16C and FMA (-march=native on a CPU that
 * has them) eight values go at a time; elsewhere the scalar code below does
 * the same, bit for bit:
 *   float16 encode: round to nearest even, overflow to inf, NaN as NumPy's
 *                   astype (sign and the payload's top bits kept, never inf);
 *   bfloat16 encode: round to nearest even, every NaN to 0x7FC0;
 *   decodes: exact.
 * RoPE is the same float32 arithmetic as _kernels.rotate, each product
 * rounded (build with -ffp-contract=off), so both give the same bits.
 * The products of decode attention (few query rows against a block of keys
 * or values) read the storage directly and convert it in registers. ggml's
 * q8_0 and q4_0 blocks (values and half scales in separate arrays) have their
 * own codecs and products at the end.
 * lc_fill writes one append (K rotated, and V) on several cores at once, with a
 * team of worker threads kept warm between calls (see "the team" below).
 */

#define _POSIX_C_SOURCE 200809L
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#if defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
#include <immintrin.h>
#define LC_SIMD 1
#else
#define LC_SIMD 0
#endif

enum { LC_F32 = 0, LC_F16 = 1, LC_BF16 = 2 };

int lc_simd(void) { return LC_SIMD; }

/* --- scalar codecs ------------------------------------------------------------ */

static uint32_t bits_of(float x) { uint32_t u; memcpy(&u, &x, 4); return u; }
static float float_of(uint32_t u) { float x; memcpy(&x, &u, 4); return x; }

static uint16_t f16_from_float(float x)
{
    uint32_t f = bits_of(x), sign = (f >> 16) & 0x8000u, a = f & 0x7FFFFFFFu;
    if (a > 0x7F800000u) {                      /* NaN: keep the payload's top bits */
        uint32_t h = 0x7C00u | ((a & 0x7FFFFFu) >> 13);
        return (uint16_t)(sign | (h == 0x7C00u ? 0x7C01u : h));
    }
    if (a >= 0x477FF000u)                       /* >= 65520 (and inf) rounds to inf */
        return (uint16_t)(sign | 0x7C00u);
    if (a >= 0x38800000u)                       /* normal half: drop 13 bits, RNE */
        return (uint16_t)(sign | ((a + 0xFFFu + ((a >> 13) & 1u) - 0x38000000u) >> 13));
    /* subnormal half or zero: value / 2**-24 = m / 2**shift, rounded to even */
    uint32_t e = a >> 23, m = (a & 0x7FFFFFu) | (e ? 0x800000u : 0u);
    uint32_t shift = e ? 126u - e : 125u;
    if (shift > 24u)
        return (uint16_t)sign;
    uint32_t q = m >> shift, rest = m & ((1u << shift) - 1u), half = 1u << (shift - 1u);
    q += rest > half || (rest == half && (q & 1u));
    return (uint16_t)(sign | q);
}

static float f16_to_float(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1Fu, m = h & 0x3FFu;
    if (e == 0x1Fu)
        return float_of(sign | 0x7F800000u | (m << 13));
    if (e)
        return float_of(sign | ((e + 112u) << 23) | (m << 13));
    float x = (float)m * 5.9604644775390625e-8f;   /* m * 2**-24, exact */
    return sign ? -x : x;
}

static uint16_t bf16_from_float(float x)
{
    uint32_t f = bits_of(x);
    if ((f & 0x7FFFFFFFu) > 0x7F800000u)
        return 0x7FC0u;
    return (uint16_t)((f + 0x7FFFu + ((f >> 16) & 1u)) >> 16);
}

static float bf16_to_float(uint16_t b) { return float_of((uint32_t)b << 16); }

/* --- one contiguous run of n values --------------------------------------------- */

#if LC_SIMD
#define LC_INLINE static inline __attribute__((always_inline))

LC_INLINE __m128i bf16_8(__m256 x)                 /* 8 bfloat16 of x, as bf16_from_float */
{
    __m256i u = _mm256_castps_si256(x);
    __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7FFF)), lsb), 16);
    r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q)));
    return _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
}

/* 8 values stored as fmt. Only for results of arithmetic: their NaNs are quiet,
 * which F16C converts as NumPy does. */
LC_INLINE void store8(int fmt, char *out, __m256 x, int nt)
{
    if (fmt == LC_F16 || fmt == LC_BF16) {
        __m128i h = fmt == LC_F16 ? _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT) : bf16_8(x);
        if (nt)
            _mm_stream_si128((__m128i *)out, h);
        else
            _mm_storeu_si128((__m128i *)out, h);
    } else if (nt) {
        _mm_stream_ps((float *)out, _mm256_castps256_ps128(x));
        _mm_stream_ps((float *)out + 4, _mm256_extractf128_ps(x, 1));
    } else
        _mm256_storeu_ps((float *)out, x);
}
#endif

/* Writes of at least this many bytes into storage go around the cache (non-temporal
 * stores): the cache is far larger than the last-level cache and is not read back soon, so
 * fetching each line before overwriting it would only add a read to every write. */
#define LC_STREAM_BYTES (64 * 1024)

/* Whether a (planes, rows, cols) destination of item size `size` may be streamed: every row
 * starts on a 16-byte boundary and holds whole groups of 8 values, and it is large enough. */
static int streamable(const void *dst, ptrdiff_t ps, ptrdiff_t rs, ptrdiff_t planes, ptrdiff_t rows,
                      ptrdiff_t cols, size_t size)
{
#if LC_SIMD
    size_t row = (size_t)cols * size;
    return ((uintptr_t)dst % 16 == 0) && cols % 8 == 0 && ((size_t)ps * size) % 16 == 0
           && ((size_t)rs * size) % 16 == 0 && (size_t)planes * (size_t)rows * row >= LC_STREAM_BYTES;
#else
    (void)dst; (void)ps; (void)rs; (void)planes; (void)rows; (void)cols; (void)size;
    return 0;
#endif
}

/* nt: dst is 16-byte aligned and n a multiple of 8 (see streamable); stores bypass the cache. */
static void encode_run(int fmt, const float *src, void *dst, ptrdiff_t n, int nt)
{
    (void)nt;                                           /* streaming needs the SIMD stores */
    ptrdiff_t i = 0;
    uint16_t *out = (uint16_t *)dst;
#if LC_SIMD
    if (nt && fmt == LC_F32) {
        for (; i + 8 <= n; i += 8)
            store8(LC_F32, (char *)dst + 4 * i, _mm256_loadu_ps(src + i), 1);
        return;
    }
    if (nt && fmt == LC_BF16) {
        for (; i + 8 <= n; i += 8)
            store8(LC_BF16, (char *)(out + i), _mm256_loadu_ps(src + i), 1);
        return;
    }
#endif
    if (fmt == LC_F32) {
        memcpy(dst, src, (size_t)n * sizeof(float));
        return;
    }
#if LC_SIMD
    if (nt && fmt == LC_F16) {                          /* NaN groups as below, stored normally */
        for (; i + 8 <= n; i += 8) {
            __m256 x = _mm256_loadu_ps(src + i);
            if (_mm256_movemask_ps(_mm256_cmp_ps(x, x, _CMP_UNORD_Q)))
                for (int k = 0; k < 8; k++) out[i + k] = f16_from_float(src[i + k]);
            else
                store8(LC_F16, (char *)(out + i), x, 1);
        }
        return;
    }
    if (fmt == LC_F16) {
        for (; i + 16 <= n; i += 16) {
            __m256 x0 = _mm256_loadu_ps(src + i), x1 = _mm256_loadu_ps(src + i + 8);
            __m256 nan = _mm256_or_ps(_mm256_cmp_ps(x0, x0, _CMP_UNORD_Q), _mm256_cmp_ps(x1, x1, _CMP_UNORD_Q));
            if (_mm256_movemask_ps(nan)) {              /* F16C quiets NaNs: NumPy's bits instead */
                for (int k = 0; k < 16; k++) out[i + k] = f16_from_float(src[i + k]);
                continue;
            }
            __m128i lo = _mm256_cvtps_ph(x0, _MM_FROUND_TO_NEAREST_INT), hi = _mm256_cvtps_ph(x1, _MM_FROUND_TO_NEAREST_INT);
            _mm256_storeu_si256((__m256i *)(out + i), _mm256_inserti128_si256(_mm256_castsi128_si256(lo), hi, 1));
        }
    } else {
        for (; i + 8 <= n; i += 8)
            _mm_storeu_si128((__m128i *)(out + i), bf16_8(_mm256_loadu_ps(src + i)));
    }
#endif
    if (fmt == LC_F16)
        for (; i < n; i++) out[i] = f16_from_float(src[i]);
    else
        for (; i < n; i++) out[i] = bf16_from_float(src[i]);
}

static void decode_run(int fmt, const void *src, float *dst, ptrdiff_t n)
{
    ptrdiff_t i = 0;
    const uint16_t *in = (const uint16_t *)src;
    if (fmt == LC_F32) {
        memcpy(dst, src, (size_t)n * sizeof(float));
        return;
    }
#if LC_SIMD
    if (fmt == LC_F16)
        for (; i + 8 <= n; i += 8)
            _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(in + i))));
    else
        for (; i + 8 <= n; i += 8) {
            __m256i u = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(in + i)));
            _mm256_storeu_si256((__m256i *)(dst + i), _mm256_slli_epi32(u, 16));
        }
#endif
    if (fmt == LC_F16)
        for (; i < n; i++) dst[i] = f16_to_float(in[i]);
    else
        for (; i < n; i++) dst[i] = bf16_to_float(in[i]);
}

static size_t item_size(int fmt) { return fmt == LC_F32 ? 4 : 2; }

/* --- strided (planes, rows, cols) ------------------------------------------------ */

void lc_encode(int fmt, const float *src, ptrdiff_t src_ps, ptrdiff_t src_rs,
               void *dst, ptrdiff_t dst_ps, ptrdiff_t dst_rs,
               ptrdiff_t planes, ptrdiff_t rows, ptrdiff_t cols)
{
    char *out = (char *)dst;
    size_t size = item_size(fmt);
    int nt = streamable(dst, dst_ps, dst_rs, planes, rows, cols, size);
    if (src_rs == cols && dst_rs == cols) {         /* each plane is one run */
        cols *= rows;
        rows = 1;
    }
    for (ptrdiff_t p = 0; p < planes; p++)
        for (ptrdiff_t r = 0; r < rows; r++)
            encode_run(fmt, src + p * src_ps + r * src_rs, out + (size_t)(p * dst_ps + r * dst_rs) * size, cols, nt);
#if LC_SIMD
    if (nt)
        _mm_sfence();
#endif
}

void lc_decode(int fmt, const void *src, ptrdiff_t src_ps, ptrdiff_t src_rs,
               float *dst, ptrdiff_t dst_ps, ptrdiff_t dst_rs,
               ptrdiff_t planes, ptrdiff_t rows, ptrdiff_t cols)
{
    const char *in = (const char *)src;
    size_t size = item_size(fmt);
    if (src_rs == cols && dst_rs == cols) {
        cols *= rows;
        rows = 1;
    }
    for (ptrdiff_t p = 0; p < planes; p++)
        for (ptrdiff_t r = 0; r < rows; r++)
            decode_run(fmt, in + (size_t)(p * src_ps + r * src_rs) * size, dst + p * dst_ps + r * dst_rs, cols);
}

/* RoPE of x (planes, rows, cols) with table row r for row r, then encoded into dst.
 * neox rotates x[j] with x[j + half], gptj x[2j] with x[2j + 1]; columns from
 * 2 * half on pass through. Returns -1 when the row buffer cannot be had. */
#if LC_SIMD
/* One row, half % 8 == 0: rotated in registers, each product rounded as in the scalar code. */
LC_INLINE void rope_row_simd(int fmt, const float *a, const float *c, const float *s, ptrdiff_t half, int gptj,
                             char *out, ptrdiff_t cols, int nt)
{
    ptrdiff_t size = (ptrdiff_t)item_size(fmt);
    if (!gptj)
        for (ptrdiff_t j = 0; j < half; j += 8) {
            __m256 x0 = _mm256_loadu_ps(a + j), x1 = _mm256_loadu_ps(a + j + half);
            __m256 cj = _mm256_loadu_ps(c + j), sj = _mm256_loadu_ps(s + j);
            store8(fmt, out + j * size, _mm256_sub_ps(_mm256_mul_ps(x0, cj), _mm256_mul_ps(x1, sj)), nt);
            store8(fmt, out + (j + half) * size, _mm256_add_ps(_mm256_mul_ps(x1, cj), _mm256_mul_ps(x0, sj)), nt);
        }
    else {
        const __m256i pairs = _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3);
        for (ptrdiff_t j = 0; j < 2 * half; j += 8) {   /* 4 pairs: even - odd*s, odd + even*s */
            __m256 x = _mm256_loadu_ps(a + j), swapped = _mm256_permute_ps(x, 0xB1);
            __m256 cc = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(_mm_loadu_ps(c + j / 2)), pairs);
            __m256 ss = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(_mm_loadu_ps(s + j / 2)), pairs);
            store8(fmt, out + j * size, _mm256_addsub_ps(_mm256_mul_ps(x, cc), _mm256_mul_ps(swapped, ss)), nt);
        }
    }
    encode_run(fmt, a + 2 * half, out + 2 * half * size, cols - 2 * half, nt && (2 * half) % 8 == 0);
}

static void rope_simd(int fmt, const float *x, ptrdiff_t x_ps, ptrdiff_t x_rs,
                      const float *cos, const float *sin, ptrdiff_t table_rs, ptrdiff_t half, int gptj,
                      char *out, ptrdiff_t dst_ps, ptrdiff_t dst_rs, ptrdiff_t planes, ptrdiff_t rows, ptrdiff_t cols)
{
    ptrdiff_t size = (ptrdiff_t)item_size(fmt);
    int nt = streamable(out, dst_ps, dst_rs, planes, rows, cols, (size_t)size);
    for (ptrdiff_t r = 0; r < rows; r++)
        for (ptrdiff_t p = 0; p < planes; p++) {
            const float *a = x + p * x_ps + r * x_rs, *c = cos + r * table_rs, *s = sin + r * table_rs;
            char *o = out + (p * dst_ps + r * dst_rs) * size;
            if (nt) {
                if (fmt == LC_F16)
                    rope_row_simd(LC_F16, a, c, s, half, gptj, o, cols, 1);
                else if (fmt == LC_BF16)
                    rope_row_simd(LC_BF16, a, c, s, half, gptj, o, cols, 1);
                else
                    rope_row_simd(LC_F32, a, c, s, half, gptj, o, cols, 1);
            } else if (fmt == LC_F16)
                rope_row_simd(LC_F16, a, c, s, half, gptj, o, cols, 0);
            else if (fmt == LC_BF16)
                rope_row_simd(LC_BF16, a, c, s, half, gptj, o, cols, 0);
            else
                rope_row_simd(LC_F32, a, c, s, half, gptj, o, cols, 0);
        }
    if (nt)
        _mm_sfence();
}
#endif

int lc_rope_encode(int fmt, const float *x, ptrdiff_t x_ps, ptrdiff_t x_rs,
                   const float *cos, const float *sin, ptrdiff_t table_rs, ptrdiff_t half, int gptj,
                   void *dst, ptrdiff_t dst_ps, ptrdiff_t dst_rs,
                   ptrdiff_t planes, ptrdiff_t rows, ptrdiff_t cols)
{
    char *out = (char *)dst;
    size_t size = item_size(fmt);
#if LC_SIMD
    if (half % 8 == 0) {
        rope_simd(fmt, x, x_ps, x_rs, cos, sin, table_rs, half, gptj, out, dst_ps, dst_rs, planes, rows, cols);
        return 0;
    }
#endif
    float *t = (float *)malloc((size_t)cols * sizeof(float));
    if (t == NULL)
        return -1;
    for (ptrdiff_t r = 0; r < rows; r++)
        for (ptrdiff_t p = 0; p < planes; p++) {
            const float *a = x + p * x_ps + r * x_rs, *c = cos + r * table_rs, *s = sin + r * table_rs;
            if (gptj)
                for (ptrdiff_t j = 0; j < half; j++) {
                    t[2 * j] = a[2 * j] * c[j] - a[2 * j + 1] * s[j];
                    t[2 * j + 1] = a[2 * j + 1] * c[j] + a[2 * j] * s[j];
                }
            else
                for (ptrdiff_t j = 0; j < half; j++) {
                    t[j] = a[j] * c[j] - a[j + half] * s[j];
                    t[j + half] = a[j + half] * c[j] + a[j] * s[j];
                }
            memcpy(t + 2 * half, a + 2 * half, (size_t)(cols - 2 * half) * sizeof(float));
            encode_run(fmt, t, out + (size_t)(p * dst_ps + r * dst_rs) * size, cols, 0);
        }
    free(t);
    return 0;
}

/* --- the team: one append on every core ---------------------------------------------- */

/* A prefill appends one layer at a time, about 0.2 ms of work per layer for a 512-position
 * chunk of a small model. Handing half of it to a thread that sleeps costs a wake-up each
 * time (tens of microseconds in a VM, measured here as no gain over one core), so the
 * workers poll for the next job for LC_SPIN_NS after each one before they sleep: from one
 * layer's append to the next they are awake, and an idle team costs nothing. One caller
 * uses the team at a time; another caller meanwhile does its whole job itself. After a
 * fork the child has no workers; pthread_atfork resets the team there, and the next call
 * starts new ones. Workers block every signal, so that signals reach the caller's thread. */

#define LC_TEAM_MAX 64
#define LC_SPIN_NS 300000L

typedef void (*lc_part_fn)(const void *job, int part, int parts);

static struct {
    pthread_mutex_t use;                 /* held by the caller of the current job */
    pthread_mutex_t sleep;               /* with wake: where idle workers wait */
    pthread_cond_t wake;
    unsigned long generation;            /* bumped for each job (__atomic) */
    int remaining;                       /* workers still on the current job (__atomic) */
    int size;                            /* workers started */
    int forks_registered;
    lc_part_fn fn;
    const void *job;
    int parts;
    unsigned long born[LC_TEAM_MAX + 1];  /* the generation when worker i was started */
} team = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, 0, 0, 0, 0, NULL, NULL, 0, {0}};

static long now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (long)t.tv_sec * 1000000000L + t.tv_nsec;
}

static void relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

static void *team_worker(void *arg)
{
    int index = (int)(intptr_t)arg;
    unsigned long seen = team.born[index];          /* a job posted before it ran is its first */
    for (;;) {
        long deadline = now_ns() + LC_SPIN_NS;
        unsigned long polls = 0;
        while (__atomic_load_n(&team.generation, __ATOMIC_ACQUIRE) == seen) {
            if (++polls % 256 == 0 && now_ns() > deadline) {
                pthread_mutex_lock(&team.sleep);
                while (__atomic_load_n(&team.generation, __ATOMIC_ACQUIRE) == seen)
                    pthread_cond_wait(&team.wake, &team.sleep);
                pthread_mutex_unlock(&team.sleep);
            } else
                relax();
        }
        seen = __atomic_load_n(&team.generation, __ATOMIC_ACQUIRE);
        if (index < team.parts)
            team.fn(team.job, index, team.parts);
        /* Every worker answers every job, those without a part too: none can then read the
         * next job's fields as if they were the one it woke for. */
        __atomic_sub_fetch(&team.remaining, 1, __ATOMIC_RELEASE);
    }
    return NULL;
}

static void team_after_fork(void)
{
    pthread_mutex_init(&team.use, NULL);
    pthread_mutex_init(&team.sleep, NULL);
    pthread_cond_init(&team.wake, NULL);
    team.size = 0;
    team.remaining = 0;
}

/* Start workers until there are want (team.use held); returns how many there are. */
static int team_grow(int want)
{
    if (!team.forks_registered && pthread_atfork(NULL, NULL, team_after_fork) == 0)
        team.forks_registered = 1;
    if (!team.forks_registered)
        return 0;                        /* a fork would leave a child waiting on no one */
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    while (team.size < want && team.size < LC_TEAM_MAX) {
        pthread_attr_t attr;
        pthread_t thread;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        team.born[team.size + 1] = team.generation;
        int failed = pthread_create(&thread, &attr, team_worker, (void *)(intptr_t)(team.size + 1));
        pthread_attr_destroy(&attr);
        if (failed)
            break;
        team.size++;
    }
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    return team.size;
}

/* The job cut into parts: part 0 here, the others on the team's workers when the team is
 * free and can be had (fewer parts when fewer workers could be started); otherwise the job
 * is one part, done here. */
static void team_run(lc_part_fn fn, const void *job, int parts)
{
    if (parts > 1 && pthread_mutex_trylock(&team.use) == 0) {
        int workers = team_grow(parts - 1);
        if (workers >= 1) {
            if (parts > workers + 1)
                parts = workers + 1;
            team.fn = fn;
            team.job = job;
            team.parts = parts;
            __atomic_store_n(&team.remaining, workers, __ATOMIC_RELAXED);
            pthread_mutex_lock(&team.sleep);
            __atomic_add_fetch(&team.generation, 1, __ATOMIC_RELEASE);
            pthread_cond_broadcast(&team.wake);
            pthread_mutex_unlock(&team.sleep);
            fn(job, 0, parts);
            for (unsigned long polls = 0; __atomic_load_n(&team.remaining, __ATOMIC_ACQUIRE) > 0; polls++)
                if (polls < 4096)
                    relax();
                else                         /* a worker was descheduled: let it run */
                    sched_yield();
            pthread_mutex_unlock(&team.use);
            return;
        }
        pthread_mutex_unlock(&team.use);
    }
    fn(job, 0, 1);
}

/* One append: K (rotated) and V, each (planes, rows, cols) with the same strides, into
 * their storage (also sharing strides). Parts split the rows (positions). */
typedef struct {
    int fmt, gptj;
    const float *k, *v, *cos, *sin;
    ptrdiff_t x_ps, x_rs, table_rs, half;
    char *dk, *dv;
    ptrdiff_t dst_ps, dst_rs, planes, rows, cols;
    int status;                          /* any part's failure (__atomic) */
} fill_job;

static void fill_part(const void *arg, int part, int parts)
{
    const fill_job *j = (const fill_job *)arg;
    ptrdiff_t r0 = j->rows * part / parts, r1 = j->rows * (part + 1) / parts;
    size_t size = item_size(j->fmt);
    if (r1 <= r0)
        return;
    if (lc_rope_encode(j->fmt, j->k + r0 * j->x_rs, j->x_ps, j->x_rs, j->cos + r0 * j->table_rs,
                       j->sin + r0 * j->table_rs, j->table_rs, j->half, j->gptj,
                       j->dk + (size_t)(r0 * j->dst_rs) * size, j->dst_ps, j->dst_rs, j->planes, r1 - r0, j->cols))
        __atomic_store_n((int *)&j->status, -1, __ATOMIC_RELAXED);
    /* V position by position (planes and rows swapped): its input is read in order, as K's is. */
    lc_encode(j->fmt, j->v + r0 * j->x_rs, j->x_rs, j->x_ps, j->dv + (size_t)(r0 * j->dst_rs) * size,
              j->dst_rs, j->dst_ps, r1 - r0, j->planes, j->cols);
}

int lc_fill(int fmt, const float *k, const float *v, ptrdiff_t x_ps, ptrdiff_t x_rs,
            const float *cos, const float *sin, ptrdiff_t table_rs, ptrdiff_t half, int gptj,
            void *dk, void *dv, ptrdiff_t dst_ps, ptrdiff_t dst_rs,
            ptrdiff_t planes, ptrdiff_t rows, ptrdiff_t cols, int threads)
{
    fill_job job = {fmt, gptj, k, v, cos, sin, x_ps, x_rs, table_rs, half, (char *)dk, (char *)dv,
                    dst_ps, dst_rs, planes, rows, cols, 0};
    int parts = threads < 1 ? 1 : (ptrdiff_t)threads > rows ? (int)rows : threads;
    team_run(fill_part, &job, parts);
    return job.status;
}

/* --- products of attention against stored blocks ------------------------------------ */

/* Decode attention multiplies a few float32 rows (queries, or softmax weights)
 * with a block of stored keys (values) of each KV head. The AVX2 kernels walk the
 * stored rows in memory order, each once, and convert them in registers: a walk
 * that takes a column slice of several rows at a time jumps 2-4 rows ahead in every
 * step, and the hardware prefetcher then streams at half the rate (measured here:
 * float32 scores 8.9 against 20.6 GB/s, weighted sums 10-11 against 17.8 GB/s, on
 * 64 MiB blocks, one core). The generic code goes through a float32 row buffer. */

#if LC_SIMD
LC_INLINE __m256 load8(int fmt, const char *p)
{
    __m128i h = _mm_loadu_si128((const __m128i *)p);
    if (fmt == LC_F16)
        return _mm256_cvtph_ps(h);
    if (fmt == LC_BF16)
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    return _mm256_loadu_ps((const float *)p);
}

LC_INLINE float hsum(__m256 a)
{
    __m128 x = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    x = _mm_add_ps(x, _mm_movehl_ps(x, x));
    return _mm_cvtss_f32(_mm_add_ss(x, _mm_movehdup_ps(x)));
}

/* Scores of query rows q0 and q1 against the stored row k; two chains per row hide
 * the FMA latency. */
LC_INLINE void dot_1x2(int fmt, const float *q0, const float *q1, const char *k, ptrdiff_t cols,
                       float *out0, float *out1)
{
    ptrdiff_t size = (ptrdiff_t)item_size(fmt), c = 0;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, b0 = a0, b1 = a0;
    for (; c + 16 <= cols; c += 16) {
        __m256 y = load8(fmt, k + c * size), z = load8(fmt, k + (c + 8) * size);
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q0 + c), y, a0);
        b0 = _mm256_fmadd_ps(_mm256_loadu_ps(q0 + c + 8), z, b0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(q1 + c), y, a1);
        b1 = _mm256_fmadd_ps(_mm256_loadu_ps(q1 + c + 8), z, b1);
    }
    if (c < cols) {   /* cols % 16 == 8 */
        __m256 y = load8(fmt, k + c * size);
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q0 + c), y, a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(q1 + c), y, a1);
    }
    *out0 = hsum(_mm256_add_ps(a0, b0));
    *out1 = hsum(_mm256_add_ps(a1, b1));
}

/* out0, out1 [0, cols) += w00 r0 + w01 r1 and w10 r0 + w11 r1 for the stored rows r0 and r1
 * (r1 == r0 with zero weights w01, w11 for a lone last row). The sums stay in L1, read and written once per pair
 * of stored rows. */
LC_INLINE void accumulate_2x2(int fmt, float w00, float w01, float w10, float w11, const char *r0, const char *r1,
                              ptrdiff_t cols, float *out0, float *out1)
{
    ptrdiff_t size = (ptrdiff_t)item_size(fmt);
    __m256 x0 = _mm256_set1_ps(w00), y0 = _mm256_set1_ps(w01), x1 = _mm256_set1_ps(w10), y1 = _mm256_set1_ps(w11);
    for (ptrdiff_t c = 0; c < cols; c += 8) {
        __m256 a = load8(fmt, r0 + c * size), b = load8(fmt, r1 + c * size);
        _mm256_storeu_ps(out0 + c, _mm256_fmadd_ps(y0, b, _mm256_fmadd_ps(x0, a, _mm256_loadu_ps(out0 + c))));
        if (out1 != out0)
            _mm256_storeu_ps(out1 + c, _mm256_fmadd_ps(y1, b, _mm256_fmadd_ps(x1, a, _mm256_loadu_ps(out1 + c))));
    }
}

/* Scores of query rows q0 and q1 against the adjacent stored rows k and k + k_rs. */
LC_INLINE void dot_2x2(int fmt, const float *q0, const float *q1, const char *k, ptrdiff_t k_rs, ptrdiff_t cols,
                       float *out0, float *out1)
{
    ptrdiff_t size = (ptrdiff_t)item_size(fmt);
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, b0 = a0, b1 = a0;
    for (ptrdiff_t c = 0; c < cols; c += 8) {
        __m256 x0 = _mm256_loadu_ps(q0 + c), x1 = _mm256_loadu_ps(q1 + c);
        __m256 y = load8(fmt, k + c * size), z = load8(fmt, k + k_rs + c * size);
        a0 = _mm256_fmadd_ps(x0, y, a0);
        b0 = _mm256_fmadd_ps(x0, z, b0);
        a1 = _mm256_fmadd_ps(x1, y, a1);
        b1 = _mm256_fmadd_ps(x1, z, b1);
    }
    out0[0] = hsum(a0);
    out0[1] = hsum(b0);
    out1[0] = hsum(a1);
    out1[1] = hsum(b1);
}

/* The two products for one format; weight/query rows are taken in pairs, a lone last row twice. */
LC_INLINE void products_simd(int accumulate, int fmt, const float *a, ptrdiff_t a_ps, ptrdiff_t a_rs,
                             const char *b, ptrdiff_t b_ps, ptrdiff_t b_rs,
                             float *out, ptrdiff_t out_ps, ptrdiff_t out_rs,
                             ptrdiff_t planes, ptrdiff_t m, ptrdiff_t n, ptrdiff_t cols)
{
    ptrdiff_t size = (ptrdiff_t)item_size(fmt), k_rs = b_rs * size;
    for (ptrdiff_t p = 0; p < planes; p++) {
        const float *ap = a + p * a_ps;
        const char *bp = b + p * b_ps * size;
        float *op = out + p * out_ps;
        if (!accumulate) {
            ptrdiff_t j = 0;
            if (fmt != LC_F32)   /* short rows: two adjacent ones per step (still memory order) */
                for (; j + 2 <= n; j += 2)
                    for (ptrdiff_t i = 0; i < m; i += 2) {
                        ptrdiff_t i1 = i + 1 < m ? i + 1 : i;
                        dot_2x2(fmt, ap + i * a_rs, ap + i1 * a_rs, bp + j * k_rs, k_rs, cols,
                                op + i * out_rs + j, op + i1 * out_rs + j);
                    }
            for (; j < n; j++)
                for (ptrdiff_t i = 0; i < m; i += 2) {
                    ptrdiff_t i1 = i + 1 < m ? i + 1 : i;
                    dot_1x2(fmt, ap + i * a_rs, ap + i1 * a_rs, bp + j * k_rs, cols,
                            op + i * out_rs + j, op + i1 * out_rs + j);
                }
            continue;
        }
        for (ptrdiff_t j = 0; j < n; j += 2) {
            int pair = j + 1 < n;
            const char *r0 = bp + j * k_rs, *r1 = pair ? r0 + k_rs : r0;
            for (ptrdiff_t i = 0; i < m; i += 2) {
                ptrdiff_t i1 = i + 1 < m ? i + 1 : i;
                const float *w0 = ap + i * a_rs + j, *w1 = ap + i1 * a_rs + j;
                accumulate_2x2(fmt, w0[0], pair ? w0[1] : 0.0f, w1[0], pair ? w1[1] : 0.0f, r0, r1, cols,
                               op + i * out_rs, op + i1 * out_rs);
            }
        }
    }
}
#endif

/* The generic products' step: stored row j, decoded into t, against the m rows of a (one
 * plane): scores out[i, j] = a[i] . t, or sums out[i, :] += a[i, j] t. */
static void products_row(int accumulate, const float *a, ptrdiff_t a_rs, const float *t, ptrdiff_t j,
                         float *out, ptrdiff_t out_rs, ptrdiff_t m, ptrdiff_t cols)
{
    for (ptrdiff_t i = 0; i < m; i++) {
        const float *x = a + i * a_rs;
        float *o = out + i * out_rs, sum = 0.0f;
        if (accumulate)
            for (ptrdiff_t c = 0; c < cols; c++) o[c] += x[j] * t[c];
        else {
            for (ptrdiff_t c = 0; c < cols; c++) sum += x[c] * t[c];
            o[j] = sum;
        }
    }
}

/* out[p, i, j] = sum_c a[p, i, c] * b[p, j, c] (accumulate = 0: scores of queries a
 * (planes, m, cols) against stored keys b (planes, n, cols)), or
 * out[p, i, c] += sum_j a[p, i, j] * b[p, j, c] (accumulate = 1: softmax weights a
 * (planes, m, n) times stored values b (planes, n, cols)). */
int lc_products(int accumulate, int fmt, const float *a, ptrdiff_t a_ps, ptrdiff_t a_rs,
                const void *b, ptrdiff_t b_ps, ptrdiff_t b_rs,
                float *out, ptrdiff_t out_ps, ptrdiff_t out_rs,
                ptrdiff_t planes, ptrdiff_t m, ptrdiff_t n, ptrdiff_t cols)
{
#if LC_SIMD
    if (cols % 8 == 0) {
        const char *bytes = (const char *)b;
        if (fmt == LC_F16)
            products_simd(accumulate, LC_F16, a, a_ps, a_rs, bytes, b_ps, b_rs, out, out_ps, out_rs, planes, m, n, cols);
        else if (fmt == LC_BF16)
            products_simd(accumulate, LC_BF16, a, a_ps, a_rs, bytes, b_ps, b_rs, out, out_ps, out_rs, planes, m, n, cols);
        else
            products_simd(accumulate, LC_F32, a, a_ps, a_rs, bytes, b_ps, b_rs, out, out_ps, out_rs, planes, m, n, cols);
        return 0;
    }
#endif
    size_t size = item_size(fmt);
    float *t = (float *)malloc((size_t)cols * sizeof(float));
    if (t == NULL)
        return -1;
    for (ptrdiff_t p = 0; p < planes; p++)
        for (ptrdiff_t j = 0; j < n; j++) {
            decode_run(fmt, (const char *)b + (size_t)(p * b_ps + j * b_rs) * size, t, cols);
            products_row(accumulate, a + p * a_ps, a_rs, t, j, out + p * out_ps, out_rs, m, cols);
        }
    free(t);
    return 0;
}

/* --- q8_0 and q4_0: ggml's blocks of 32 values and a half scale ------------------------
 *
 * q8_0 stores a block as 32 int8 values, q4_0 as 16 bytes whose low nibbles are values 0-15
 * and high nibbles values 16-31, each value q - 8. The scales are a separate array of half
 * bits (the backend keeps values and scales apart, as its q8_0 always has). */

enum { LC_Q8 = 8, LC_Q4 = 4 };   /* bits per value: the C side of _native.QUANT */

/* Bytes of values per block of 32. */
static ptrdiff_t block_bytes(int fmt) { return fmt == LC_Q8 ? 32 : 16; }

/* A double scale to half with one rounding: the magnitude through float rounded to odd
 * (float keeps more than two bits beyond half's precision, so the final round to nearest
 * even is exact), as NumPy's float64 -> float16 cast rounds; the sign is kept, -0 included. */
static uint16_t f16_from_scale(double x)
{
    uint64_t w;
    memcpy(&w, &x, 8);
    uint16_t sign = (uint16_t)((w >> 48) & 0x8000u);
    w &= 0x7FFFFFFFFFFFFFFFull;
    memcpy(&x, &w, 8);
    float f = (float)x;
    uint32_t u = bits_of(f);
    if ((double)f > x)
        u -= 1u;                                  /* toward zero */
    if ((double)float_of(u) != x)
        u |= 1u;                                  /* inexact: odd */
    return (uint16_t)(sign | f16_from_float(float_of(u)));
}

/* d = amax/127 and q = round half away from zero of x/d with the unrounded d, in double,
 * as _kernels.q8_0_encode computes them (the same bits). */
static void q8_block(const float *x, int8_t *q, uint16_t *d)
{
    uint32_t amax = 0;                            /* |x| as bits: their order is the values' */
    for (int j = 0; j < 32; j++) {
        uint32_t a = bits_of(x[j]) & 0x7FFFFFFFu;
        amax = a > amax ? a : amax;
    }
    double scale = (double)float_of(amax) / 127.0;
    double inverse = 1.0 / (scale > 2.2250738585072014e-308 ? scale : 2.2250738585072014e-308);
    int32_t rounded[32];
    for (int j = 0; j < 32; j++) {
        double s = (double)x[j] * inverse;
        rounded[j] = (int32_t)(s + (s < 0.0 ? -0.5 : 0.5));  /* the cast truncates toward zero */
    }
    for (int j = 0; j < 32; j++)
        q[j] = (int8_t)rounded[j];
    *d = f16_from_scale(scale);
}

/* m = the first value of largest magnitude, d = m / -8 and q = min(15, trunc(x/d + 8.5))
 * with the unrounded d, in double, as _kernels.q4_0_encode computes them (the same bits).
 * With AVX2 four values at a time, min/max_pd keeping the portable code's comparisons. */
#if LC_SIMD
static void q4_block(const float *x, uint8_t *q, uint16_t *d)
{
    const __m256i magnitude = _mm256_set1_epi32(0x7FFFFFFF);
    __m256i a[4], top = _mm256_setzero_si256();
    for (int u = 0; u < 4; u++) {
        a[u] = _mm256_and_si256(_mm256_loadu_si256((const __m256i *)(x + 8 * u)), magnitude);
        top = _mm256_max_epu32(top, a[u]);
    }
    top = _mm256_max_epu32(top, _mm256_permute2x128_si256(top, top, 1));
    top = _mm256_max_epu32(top, _mm256_shuffle_epi32(top, 0x4E));
    top = _mm256_max_epu32(top, _mm256_shuffle_epi32(top, 0xB1));   /* every lane: the largest */
    uint32_t at = 0;
    for (int u = 0; u < 4; u++)
        at |= (uint32_t)_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(a[u], top))) << (8 * u);
    double scale = (double)x[__builtin_ctz(at)] / -8.0;   /* the first of largest magnitude */
    __m256d inverse = _mm256_set1_pd(scale != 0.0 ? 1.0 / scale : 0.0);
    __m128i r[8];
    for (int k = 0; k < 8; k++) {
        __m256d t = _mm256_add_pd(_mm256_mul_pd(_mm256_cvtps_pd(_mm_loadu_ps(x + 4 * k)), inverse), _mm256_set1_pd(8.5));
        t = _mm256_max_pd(_mm256_min_pd(t, _mm256_set1_pd(15.0)), _mm256_setzero_pd());
        r[k] = _mm256_cvttpd_epi32(t);
    }
    __m128i low = _mm_packus_epi16(_mm_packs_epi32(r[0], r[1]), _mm_packs_epi32(r[2], r[3]));   /* values 0-15 */
    __m128i high = _mm_packus_epi16(_mm_packs_epi32(r[4], r[5]), _mm_packs_epi32(r[6], r[7]));  /* 16-31 */
    _mm_storeu_si128((__m128i *)q, _mm_or_si128(low, _mm_slli_epi16(high, 4)));   /* bytes <= 15: no carry */
    *d = f16_from_scale(scale);
}
#else
static void q4_block(const float *x, uint8_t *q, uint16_t *d)
{
    uint32_t a[32], amax = 0;                     /* |x| as bits, as q8_block */
    for (int j = 0; j < 32; j++) {
        a[j] = bits_of(x[j]) & 0x7FFFFFFFu;
        amax = a[j] > amax ? a[j] : amax;
    }
    int first = 31;                               /* the first of that magnitude: a minimum, */
    for (int j = 0; j < 32; j++) {                /* with no branch to mispredict */
        int at = a[j] == amax ? j : 31;
        first = at < first ? at : first;
    }
    double scale = (double)x[first] / -8.0;
    double inverse = scale != 0.0 ? 1.0 / scale : 0.0;
    uint8_t v[32];
    for (int j = 0; j < 32; j++) {                /* branch-free, so that it vectorizes */
        double t = (double)x[j] * inverse + 8.5;
        t = t < 15.0 ? t : 15.0;
        t = t > 0.0 ? t : 0.0;
        v[j] = (uint8_t)(int32_t)t;               /* the cast truncates */
    }
    for (int j = 0; j < 16; j++)
        q[j] = (uint8_t)(v[j] | (v[j + 16] << 4));
    *d = f16_from_scale(scale);
}
#endif

#if LC_SIMD
/* The 32 values of block b of a stored row, times its scale, as four vectors. q4_0: the block's
 * 16 bytes split into low and high nibbles, less 8, as signed bytes. */
LC_INLINE void quant_load32(int fmt, const uint8_t *row, ptrdiff_t b, __m256 scale, __m256 y[4])
{
    __m128i part[4];
    if (fmt == LC_Q8)
        for (int u = 0; u < 4; u++)
            part[u] = _mm_loadl_epi64((const __m128i *)(row + 32 * b + 8 * u));
    else {
        __m128i v = _mm_loadu_si128((const __m128i *)(row + 16 * b)), mask = _mm_set1_epi8(0x0F);
        __m128i eight = _mm_set1_epi8(8);
        part[0] = _mm_sub_epi8(_mm_and_si128(v, mask), eight);                      /* values 0-15 */
        part[2] = _mm_sub_epi8(_mm_and_si128(_mm_srli_epi16(v, 4), mask), eight);  /* values 16-31 */
        part[1] = _mm_srli_si128(part[0], 8);
        part[3] = _mm_srli_si128(part[2], 8);
    }
    for (int u = 0; u < 4; u++)
        y[u] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(part[u])), scale);
}
#endif

/* src (planes, rows, cols) float32 -> values q (planes, rows, cols * bits / 8) and d (planes,
 * rows, cols/32) half bits; strides in elements of each array (q's are bytes). */
void lc_quant_encode(int fmt, const float *src, ptrdiff_t src_ps, ptrdiff_t src_rs,
                     uint8_t *q, ptrdiff_t q_ps, ptrdiff_t q_rs, uint16_t *d, ptrdiff_t d_ps, ptrdiff_t d_rs,
                     ptrdiff_t planes, ptrdiff_t rows, ptrdiff_t cols)
{
    ptrdiff_t size = block_bytes(fmt);
    for (ptrdiff_t p = 0; p < planes; p++)
        for (ptrdiff_t r = 0; r < rows; r++)
            for (ptrdiff_t b = 0; b < cols / 32; b++) {
                const float *x = src + p * src_ps + r * src_rs + 32 * b;
                uint8_t *o = q + p * q_ps + r * q_rs + size * b;
                uint16_t *s = d + p * d_ps + r * d_rs + b;
                if (fmt == LC_Q8)
                    q8_block(x, (int8_t *)o, s);
                else
                    q4_block(x, o, s);
            }
}

/* dst = value * d per block of 32, in float32: exact (at most 19 significant bits). */
void lc_quant_decode(int fmt, const uint8_t *q, ptrdiff_t q_ps, ptrdiff_t q_rs,
                     const uint16_t *d, ptrdiff_t d_ps, ptrdiff_t d_rs,
                     float *dst, ptrdiff_t dst_ps, ptrdiff_t dst_rs, ptrdiff_t planes, ptrdiff_t rows, ptrdiff_t cols)
{
    for (ptrdiff_t p = 0; p < planes; p++)
        for (ptrdiff_t r = 0; r < rows; r++) {
            const uint8_t *in = q + p * q_ps + r * q_rs;
            const uint16_t *scales = d + p * d_ps + r * d_rs;
            float *out = dst + p * dst_ps + r * dst_rs;
            for (ptrdiff_t b = 0; b < cols / 32; b++) {
                float scale = f16_to_float(scales[b]);
                float *o = out + 32 * b;
#if LC_SIMD
                __m256 y[4];
                quant_load32(fmt, in, b, _mm256_set1_ps(scale), y);
                for (int u = 0; u < 4; u++)
                    _mm256_storeu_ps(o + 8 * u, y[u]);
#else
                const uint8_t *v = in + block_bytes(fmt) * b;
                if (fmt == LC_Q8)
                    for (int j = 0; j < 32; j++) o[j] = (float)(int8_t)v[j] * scale;
                else
                    for (int j = 0; j < 16; j++) {
                        o[j] = (float)((int)(v[j] & 15u) - 8) * scale;
                        o[j + 16] = (float)((int)(v[j] >> 4) - 8) * scale;
                    }
#endif
            }
        }
}

/* --- q8_0 and q4_0 products: decode attention read straight from values and half scales --- */

/* As lc_products, for keys or values b stored as q8_0 or q4_0: values q (planes, n, cols *
 * bits / 8) and half-bit scales d (planes, n, cols/32), strides in elements of each. Each
 * stored value is value * d in float32 (exact, as lc_quant_decode gives it) before it is
 * multiplied, so the products are those of the decoded block. cols must be a multiple of 32. */
#if LC_SIMD
/* Stored rows j and j1 (adjacent, or j1 == j for a lone last row) against query rows, or
 * weight rows, i and i1: each stored value is converted once for both query rows, and in
 * the weighted sums each output row is read and written once per pair of stored rows. */
LC_INLINE void quant_products_simd(int accumulate, int fmt, const float *a, ptrdiff_t a_ps, ptrdiff_t a_rs,
                                   const uint8_t *q, ptrdiff_t q_ps, ptrdiff_t q_rs,
                                   const uint16_t *d, ptrdiff_t d_ps, ptrdiff_t d_rs,
                                   float *out, ptrdiff_t out_ps, ptrdiff_t out_rs,
                                   ptrdiff_t planes, ptrdiff_t m, ptrdiff_t n, ptrdiff_t cols)
{
    for (ptrdiff_t p = 0; p < planes; p++) {
        const float *ap = a + p * a_ps;
        float *op = out + p * out_ps;
        for (ptrdiff_t j = 0; j < n; j += 2) {   /* stored rows in memory order, the sums in L1 */
            ptrdiff_t j1 = j + 1 < n ? j + 1 : j;
            const uint8_t *k0 = q + p * q_ps + j * q_rs, *k1 = q + p * q_ps + j1 * q_rs;
            const uint16_t *s0 = d + p * d_ps + j * d_rs, *s1 = d + p * d_ps + j1 * d_rs;
            for (ptrdiff_t i = 0; i < m; i += 2) {
                ptrdiff_t i1 = i + 1 < m ? i + 1 : i;
                if (!accumulate) {
                    const float *x0 = ap + i * a_rs, *x1 = ap + i1 * a_rs;
                    __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00;
                    for (ptrdiff_t b = 0; b < cols / 32; b++) {
                        __m256 y0[4], y1[4];
                        quant_load32(fmt, k0, b, _mm256_set1_ps(f16_to_float(s0[b])), y0);
                        quant_load32(fmt, k1, b, _mm256_set1_ps(f16_to_float(s1[b])), y1);
                        for (int u = 0; u < 4; u++) {
                            __m256 z0 = _mm256_loadu_ps(x0 + 32 * b + 8 * u), z1 = _mm256_loadu_ps(x1 + 32 * b + 8 * u);
                            c00 = _mm256_fmadd_ps(z0, y0[u], c00);
                            c01 = _mm256_fmadd_ps(z0, y1[u], c01);
                            c10 = _mm256_fmadd_ps(z1, y0[u], c10);
                            c11 = _mm256_fmadd_ps(z1, y1[u], c11);
                        }
                    }
                    op[i * out_rs + j] = hsum(c00);
                    op[i1 * out_rs + j] = hsum(c10);
                    op[i * out_rs + j1] = hsum(c01);   /* j1 == j: the same sum again */
                    op[i1 * out_rs + j1] = hsum(c11);
                    continue;
                }
                const float *w0 = ap + i * a_rs, *w1 = ap + i1 * a_rs;
                __m256 x00 = _mm256_set1_ps(w0[j]), x10 = _mm256_set1_ps(w1[j]);
                __m256 x01 = _mm256_set1_ps(j1 != j ? w0[j1] : 0.0f), x11 = _mm256_set1_ps(j1 != j ? w1[j1] : 0.0f);
                float *o0 = op + i * out_rs, *o1 = op + i1 * out_rs;
                for (ptrdiff_t b = 0; b < cols / 32; b++) {
                    __m256 y0[4], y1[4];
                    quant_load32(fmt, k0, b, _mm256_set1_ps(f16_to_float(s0[b])), y0);
                    quant_load32(fmt, k1, b, _mm256_set1_ps(f16_to_float(s1[b])), y1);
                    for (int u = 0; u < 4; u++) {
                        float *e0 = o0 + 32 * b + 8 * u, *e1 = o1 + 32 * b + 8 * u;
                        _mm256_storeu_ps(e0, _mm256_fmadd_ps(x01, y1[u], _mm256_fmadd_ps(x00, y0[u], _mm256_loadu_ps(e0))));
                        if (o1 != o0)
                            _mm256_storeu_ps(e1, _mm256_fmadd_ps(x11, y1[u], _mm256_fmadd_ps(x10, y0[u], _mm256_loadu_ps(e1))));
                    }
                }
            }
        }
    }
}
#endif

int lc_quant_products(int accumulate, int fmt, const float *a, ptrdiff_t a_ps, ptrdiff_t a_rs,
                      const uint8_t *q, ptrdiff_t q_ps, ptrdiff_t q_rs, const uint16_t *d, ptrdiff_t d_ps, ptrdiff_t d_rs,
                      float *out, ptrdiff_t out_ps, ptrdiff_t out_rs,
                      ptrdiff_t planes, ptrdiff_t m, ptrdiff_t n, ptrdiff_t cols)
{
#if LC_SIMD
    if (fmt == LC_Q8)
        quant_products_simd(accumulate, LC_Q8, a, a_ps, a_rs, q, q_ps, q_rs, d, d_ps, d_rs, out, out_ps, out_rs,
                            planes, m, n, cols);
    else
        quant_products_simd(accumulate, LC_Q4, a, a_ps, a_rs, q, q_ps, q_rs, d, d_ps, d_rs, out, out_ps, out_rs,
                            planes, m, n, cols);
    return 0;
#else
    float *t = (float *)malloc((size_t)cols * sizeof(float));
    if (t == NULL)
        return -1;
    for (ptrdiff_t p = 0; p < planes; p++)
        for (ptrdiff_t j = 0; j < n; j++) {
            lc_quant_decode(fmt, q + p * q_ps + j * q_rs, 0, 0, d + p * d_ps + j * d_rs, 0, 0, t, 0, 0, 1, 1, cols);
            products_row(accumulate, a + p * a_ps, a_rs, t, j, out + p * out_ps, out_rs, m, cols);
        }
    free(t);
    return 0;
#endif
}

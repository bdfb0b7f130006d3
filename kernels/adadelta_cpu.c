/* The fused multi-tensor Adadelta update for CPU tensors: the Triton kernel's CPU counterpart.
 *
 * One call updates every tensor of a bucket. Each tensor is a row of an int64 table: the addresses
 * of p, g, square_avg and acc_delta, its element count, its hyperparameter row, and the address of
 * its float32 step count (or 0), which the call increments. The work, all elements of all tensors
 * end to end, is cut into one contiguous range per thread, so a thread may finish one tensor and
 * start the next, and a large tensor is shared by several threads. Every element is read once
 * (p, g, v, u) and written once (p, v, u); the arithmetic is float32 in registers:
 *
 *     g = clamp(g / grad_scale, -clip_value, clip_value) * coef * sign
 *     g = g + wd * p                                  (only when wd != 0, as torch)
 *     v = v * rho + (omr * g) * g                     (omr = 1 - rho)
 *     d = sqrt(u + eps) / sqrt(v + eps) * g
 *     u = u * rho + (omr * d) * d
 *     p = p - lr * d
 *
 * This is triton_adadelta/reference.py's order of operations. Build with -ffp-contract=off and
 * without -ffast-math: every operation is then rounded once as IEEE float32, the same arithmetic
 * as the Triton kernel (sqrt_rn, div_rn, no FMA). Identity steps (grad_scale 1, clip_value +inf,
 * coef 1, sign 1) are exact. bfloat16 is rounded to nearest even; NaN becomes the canonical NaN.
 * -fno-math-errno lets sqrtf vectorise; it changes no result.
 *
 * Variants: parameter dtype (f32, bf16, f16), gradient dtype (the parameter's, or f32), state
 * dtype (f32, bf16). f16 needs the compiler's _Float16; without it those variants are left out.
 */

#include <math.h>
#include <stdint.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

/* Columns of the hyperparameter table (float32, one row per param group): the one row schema of
 * triton_adadelta/hyper.py, which the Triton kernel reads too. H_SEED (stochastic rounding) is not read
 * here: this path does not round stochastically. GradScaler's scale is not a column but an argument. */
enum { H_LR, H_RHO, H_OMR, H_EPS, H_WD, H_SIGN, H_SEED, H_CLIP_VALUE, H_COLS };
/* Columns of the tensor table (int64). */
enum { T_P, T_G, T_V, T_U, T_NUMEL, T_ROW, T_STEP, T_COLS };

/* Below this many elements in all one thread does the work: waking a team costs more. */
#define SERIAL_BELOW 65536
/* Thread ranges start at multiples of this many elements (64 bytes of float32). */
#define RANGE_ALIGN 16

int adadelta_cpu_abi_version(void) { return 3; }

typedef uint16_t bf16;

static inline float load_f32(const float *x, int64_t i) { return x[i]; }
static inline void store_f32(float *x, int64_t i, float y) { x[i] = y; }

static inline float load_bf16(const bf16 *x, int64_t i) {
    uint32_t bits = (uint32_t)x[i] << 16;
    float y;
    memcpy(&y, &bits, sizeof y);
    return y;
}

static inline void store_bf16(bf16 *x, int64_t i, float y) {
    uint32_t bits;
    memcpy(&bits, &y, sizeof bits);
    /* Round to nearest even: add 0x7FFF plus the lowest kept bit, then drop the low half. */
    uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
    x[i] = (bits & 0x7FFFFFFFu) > 0x7F800000u ? (bf16)0x7FC0 : (bf16)rounded;
}

#ifdef __FLT16_MAX__
typedef _Float16 f16;
static inline float load_f16(const f16 *x, int64_t i) { return (float)x[i]; }
static inline void store_f16(f16 *x, int64_t i, float y) { x[i] = (f16)y; }
#endif

/* The update of elements [begin, end) of one tensor; WD selects the weight-decay loop at compile time. */
#define UPDATE_LOOP(PT, GT, ST, WD)                                                          \
    for (int64_t i = begin; i < end; ++i) {                                                  \
        float p = load_##PT(pp, i);                                                          \
        float g = load_##GT(gp, i) / grad_scale;                                             \
        /* comparisons with NaN are false: NaN passes through the clamp */                   \
        g = g < -clip_value ? -clip_value : (g > clip_value ? clip_value : g);               \
        g = g * coef * sign;                                                                 \
        if (WD) g = g + wd * p;                                                              \
        float v = load_##ST(vp, i) * rho + (omr * g) * g;                                    \
        float d = sqrtf(load_##ST(up, i) + eps) / sqrtf(v + eps) * g;                        \
        float u = load_##ST(up, i) * rho + (omr * d) * d;                                    \
        store_##ST(vp, i, v);                                                                \
        store_##ST(up, i, u);                                                                \
        store_##PT(pp, i, p - lr * d);                                                       \
    }

typedef void (*range_fn)(const int64_t *row, const float *h, float coef, float grad_scale, int64_t begin,
                         int64_t end);

#define VARIANT(NAME, PT, GT, ST)                                                            \
    static void NAME##_range(const int64_t *row, const float *h, float coef, float grad_scale, \
                             int64_t begin, int64_t end) {                                   \
        PT##_t *pp = (PT##_t *)(intptr_t)row[T_P];                                           \
        const GT##_t *gp = (const GT##_t *)(intptr_t)row[T_G];                               \
        ST##_t *vp = (ST##_t *)(intptr_t)row[T_V];                                           \
        ST##_t *up = (ST##_t *)(intptr_t)row[T_U];                                           \
        const float lr = h[H_LR], rho = h[H_RHO], omr = h[H_OMR], eps = h[H_EPS];            \
        const float wd = h[H_WD], sign = h[H_SIGN];                                          \
        const float clip_value = h[H_CLIP_VALUE];                                            \
        if (wd != 0.0f) {                                                                    \
            UPDATE_LOOP(PT, GT, ST, 1)                                                       \
        } else {                                                                             \
            UPDATE_LOOP(PT, GT, ST, 0)                                                       \
        }                                                                                    \
    }                                                                                        \
    void NAME(int64_t n, const int64_t *table, const float *hyper, const float *coefs,       \
              const float *grad_scale, int threads) {                                        \
        run(n, table, hyper, coefs, grad_scale ? *grad_scale : 1.0f, threads, NAME##_range); \
    }

typedef float f32_t;
typedef bf16 bf16_t;

/* Thread k of `threads` owns elements [start(k), start(k + 1)) of the concatenated tensors. */
static int64_t range_start(int64_t total, int k, int threads) {
    if (k >= threads) return total;
    int64_t s = (int64_t)((double)total * k / threads);
    s -= s % RANGE_ALIGN;
    return s;
}

static void run(int64_t n, const int64_t *table, const float *hyper, const float *coefs, float grad_scale,
                int threads, range_fn fn) {
    int64_t total = 0;
    for (int64_t t = 0; t < n; ++t) {
        const int64_t *row = table + T_COLS * t;
        total += row[T_NUMEL];
        if (row[T_STEP]) *(float *)(intptr_t)row[T_STEP] += 1.0f; /* torch's float32 step count */
    }
    if (total < SERIAL_BELOW || threads < 1) threads = 1;
#pragma omp parallel num_threads(threads)
    {
        int k = 0, team = 1;
#ifdef _OPENMP
        k = omp_get_thread_num();
        team = omp_get_num_threads();
#endif
        int64_t lo = range_start(total, k, team), hi = range_start(total, k + 1, team);
        int64_t base = 0;
        for (int64_t t = 0; t < n && base < hi; ++t) {
            const int64_t *row = table + T_COLS * t;
            int64_t numel = row[T_NUMEL];
            int64_t begin = lo > base ? lo - base : 0;
            int64_t end = hi < base + numel ? hi - base : numel;
            if (begin < end)
                fn(row, hyper + H_COLS * row[T_ROW], coefs ? coefs[t] : 1.0f, grad_scale, begin, end);
            base += numel;
        }
    }
}

VARIANT(adadelta_cpu_f32_f32_f32, f32, f32, f32)
VARIANT(adadelta_cpu_f32_f32_bf16, f32, f32, bf16)
VARIANT(adadelta_cpu_bf16_bf16_f32, bf16, bf16, f32)
VARIANT(adadelta_cpu_bf16_bf16_bf16, bf16, bf16, bf16)
VARIANT(adadelta_cpu_bf16_f32_f32, bf16, f32, f32)
VARIANT(adadelta_cpu_bf16_f32_bf16, bf16, f32, bf16)

#ifdef __FLT16_MAX__
typedef f16 f16_t;
VARIANT(adadelta_cpu_f16_f16_f32, f16, f16, f32)
VARIANT(adadelta_cpu_f16_f16_bf16, f16, f16, bf16)
VARIANT(adadelta_cpu_f16_f32_f32, f16, f32, f32)
VARIANT(adadelta_cpu_f16_f32_bf16, f16, f32, bf16)
#endif

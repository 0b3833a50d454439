/* Attention of one query per row over a KV cache: the CPU decode step's attention.
 *
 * q [B, H, hd] contiguous; k, v [B, KV, n, hd] with rows of hd contiguous floats, batch stride
 * `kv_batch` and head stride `kv_head` (a slice of a preallocated cache); visible [B or 1, n]
 * bytes, nonzero where the query may see the key (row stride `visible_batch`, 0 to share one
 * row); out [B, H, hd]. Query head h reads KV head h / (H / KV) (GQA, MQA). hd must be a
 * multiple of 8.
 *
 * Per (row, head): scores = scale · q · k_t for the visible keys, then a softmax and the
 * weighted sum of v in one pass over the keys. Each (row, head) is a few vector loops over
 * its keys, where a blocked attention kernel built for many queries pays its setup per head.
 * Build with -O3 -ffp-contract=fast (llmfn.kernels.build).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef float vec8 __attribute__((vector_size(32)));

static inline vec8 load8(const float* p) {
    vec8 v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline float sum8(vec8 v) {
    return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}

/* One (row, head). Inlined into callers with a constant hd, q and the output stay in
 * registers. */
static inline __attribute__((always_inline)) void attend(
    const float* q, const float* k, const float* v, const uint8_t* visible, float* out,
    float* scores, int64_t n, const int64_t hd, float scale) {
    vec8 qv[hd / 8], acc[hd / 8];
    for (int64_t c = 0; c < hd / 8; ++c) qv[c] = load8(q + 8 * c) * scale;
    float best = -INFINITY;
    for (int64_t t = 0; t < n; ++t) {
        vec8 dot = {0};
        for (int64_t c = 0; c < hd / 8; ++c) dot += qv[c] * load8(k + t * hd + 8 * c);
        scores[t] = visible[t] ? sum8(dot) : -INFINITY;
        best = scores[t] > best ? scores[t] : best;
    }
    for (int64_t c = 0; c < hd / 8; ++c) acc[c] = (vec8){0};
    float total = 0.0f;
    if (best != -INFINITY) /* else nothing visible: zeros (callers always show one key) */
        for (int64_t t = 0; t < n; ++t) {
            if (scores[t] == -INFINITY) continue;
            float p = expf(scores[t] - best);
            total += p;
            for (int64_t c = 0; c < hd / 8; ++c) acc[c] += p * load8(v + t * hd + 8 * c);
        }
    float inverse = total > 0.0f ? 1.0f / total : 0.0f;
    for (int64_t c = 0; c < hd / 8; ++c) {
        vec8 o = acc[c] * inverse;
        memcpy(out + 8 * c, &o, sizeof o);
    }
}

static void attend_any(const float* q, const float* k, const float* v, const uint8_t* visible,
                       float* out, float* scores, int64_t n, int64_t hd, float scale) {
    switch (hd) { /* the common head sizes with constant loops, others generic */
        case 64: attend(q, k, v, visible, out, scores, n, 64, scale); break;
        case 128: attend(q, k, v, visible, out, scores, n, 128, scale); break;
        default: attend(q, k, v, visible, out, scores, n, hd, scale);
    }
}

/* Returns 0, or -1 when the scores' workspace (n floats per thread) cannot be allocated. */
int decode_attention(const float* q, const float* k, const float* v, const uint8_t* visible,
                     float* out, int64_t B, int64_t H, int64_t KV, int64_t n, int64_t hd,
                     int64_t kv_batch, int64_t kv_head, int64_t visible_batch, float scale,
                     int64_t threads) {
    const int64_t group = H / KV;
    int failed = 0;
#pragma omp parallel num_threads(threads) if (threads > 1) reduction(| : failed)
    {
        float* scores = malloc(n * sizeof(float));
        if (!scores) failed = 1;
#pragma omp for schedule(static)
        for (int64_t bh = 0; bh < B * H; ++bh) {
            if (!scores) continue;
            const int64_t b = bh / H, h = bh % H;
            const int64_t kv = b * kv_batch + (h / group) * kv_head;
            attend_any(q + bh * hd, k + kv, v + kv, visible + b * visible_batch,
                       out + bh * hd, scores, n, hd, scale);
        }
        free(scores);
    }
    return failed ? -1 : 0;
}

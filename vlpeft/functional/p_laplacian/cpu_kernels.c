/*
 * Fused CPU kernels of the p-Laplacian aggregation, float32: the ``release`` variant whole (p-adapter.md §3.1),
 * the ``paper`` variant's elementwise work between its matrix products (§3.2, further below).
 *
 * Built at first use by vlpeft/functional/p_laplacian/cpu_kernels.py, which also holds the autograd wrapper and the
 * description of the layout. Every function returns 0, or 1 if its scratch rows could not be allocated;
 * vlpeft_paper_forward returns 2 if an attention entry it read was negative (the caller raises).
 *
 * ``release``: one call handles the slices [s0, s1) of (batch * heads) independent graphs; every
 * query row is one pass over the keys up to its last edge, so no (n_q, n_k) intermediate is ever stored: the
 * forward and backward passes keep two / four rows of n_k floats of scratch; the forward pass records each row's
 * key extent (1 + its last edge) for the backward pass.
 *
 * Per slice: xq (n_q, d) query-node features, xkt (d, n_k) key-node features transposed, attn rows of n_k entries
 * ``attn_stride`` apart, half / log_c (n_q) the per-row (p - 2) / 2 and log(2 mu / p). Per query row i and key j:
 *   D = |xq_i - xk_j|^2, S = max((A + eps) D, s_min_sq) (self loop of the self graph forced to s_min_sq unless
 *   dropped), log W = log A + half log S; L = log(sum_j W + c), omega = W / e^L, beta = c / e^L;
 *   out_i = sum_j omega_ij xk_j (+ beta xq_i in the self graph).
 * Non-edges (A = 0) have weight exactly 0 and get no gradient through it, as in the torch path.
 */
#include <float.h>
#include <math.h>
#include <stddef.h>
#include <stdlib.h>

/* 1 + the last key column with a non-zero attention entry of a row (0 for an empty row). Attention is
 * non-negative, so a run of zeros is one whose maximum is 0: skipped 64 entries at a time (vectorised). */
static int row_extent(const float *a, int n_k) {
    int n = n_k;
    while (n >= 64) {
        float largest = 0.0f;
        for (int t = n - 64; t < n; t++) largest = fmaxf(largest, a[t]);
        if (largest != 0.0f) break;
        n -= 64;
    }
    while (n > 0 && a[n - 1] == 0.0f) n--;
    return n;
}

/* dist[j] = |xq - xk_j|^2 for j < n, from the transposed key features (contiguous over j for each feature). */
static void distances(const float *xq, const float *xkt, int d, int n_k, int n, float *dist) {
    for (int j = 0; j < n; j++) dist[j] = 0.0f;
    for (int c = 0; c < d; c++) {
        const float q = xq[c];
        const float *k = xkt + (size_t)c * n_k;
        for (int j = 0; j < n; j++) {
            const float t = q - k[j];
            dist[j] += t * t;
        }
    }
}

/* log S[j] into log_s (S = max((A + eps) D, s_min_sq), forced self loop). Returns the loop column or -1. */
static int log_scaled(const float *a, const float *dist, int n, float eps, float s_min_sq, int loop_col,
                      int force_loop, float *log_s) {
    for (int j = 0; j < n; j++) log_s[j] = logf(fmaxf((a[j] + eps) * dist[j], s_min_sq));
    if (loop_col >= 0 && loop_col < n) {
        if (force_loop) log_s[loop_col] = logf(s_min_sq);
        return loop_col;
    }
    return -1;
}

typedef struct {
    int n_q, n_k, d;
    long attn_stride;       /* elements between attention rows */
    long attn_slice_stride; /* elements between attention slices */
    float eps, s_min_sq;
    int self_graph, drop_self_loops, query_offset;
} Settings;

int vlpeft_release_forward(int s0, int s1, const Settings *cfg, const float *xq, const float *xkt, const float *attn,
                           const float *half, const float *log_c, float *out, float *agg, float *log_norm,
                           int *extents) {
    const int n_q = cfg->n_q, n_k = cfg->n_k, d = cfg->d;
    float *scratch = malloc(sizeof(float) * 2 * (size_t)(n_k > 0 ? n_k : 1));
    if (scratch == NULL) return 1;
    float *dist = scratch, *w = scratch + n_k;
    for (int s = s0; s < s1; s++) {
        const float *xq_s = xq + (size_t)s * n_q * d, *xkt_s = xkt + (size_t)s * d * n_k;
        const float *attn_s = attn + (size_t)s * cfg->attn_slice_stride;
        for (int i = 0; i < n_q; i++) {
            const size_t row = (size_t)s * n_q + i;
            const float *a = attn_s + (size_t)i * cfg->attn_stride, *x = xq_s + (size_t)i * d;
            const int n = row_extent(a, n_k);
            const int loop = cfg->self_graph ? cfg->query_offset + i : -1;
            const float h = half[row], lc = log_c[row];
            extents[row] = n;
            distances(x, xkt_s, d, n_k, n, dist);
            const int loop_col = log_scaled(a, dist, n, cfg->eps, cfg->s_min_sq, loop, !cfg->drop_self_loops, w);
            float m = lc;
            for (int j = 0; j < n; j++) {
                w[j] *= h;
                m = fmaxf(m, w[j]);
            }
            for (int j = 0; j < n; j++) w[j] = a[j] * expf(w[j] - m);
            if (loop_col >= 0 && cfg->drop_self_loops) w[loop_col] = 0.0f;
            float total = expf(lc - m);
            for (int j = 0; j < n; j++) total += w[j];
            const float lnorm = m + logf(total), inv = 1.0f / total;
            const float beta = cfg->self_graph ? expf(lc - lnorm) : 0.0f;
            log_norm[row] = lnorm;
            for (int c = 0; c < d; c++) {
                const float *k = xkt_s + (size_t)c * n_k;
                float acc = 0.0f;
                for (int j = 0; j < n; j++) acc += w[j] * k[j];
                agg[row * d + c] = acc * inv;
                out[row * d + c] = acc * inv + beta * x[c];
            }
        }
    }
    free(scratch);
    return 0;
}

/* grad_xkt (slices, d, n_k) is accumulated into (zeroed by the caller); grad_attn (if not NULL) rows are written
 * whole, zeros right of a row's last edge; grad_p_rows / grad_log_c_rows: per-row dL/dp of the weights and
 * dL/dlog c. */
int vlpeft_release_backward(int s0, int s1, const Settings *cfg, const float *xq, const float *xkt,
                            const float *attn, const float *half, const float *log_c, const float *log_norm,
                            const float *agg, const int *extents, const float *grad_out, float *grad_xq, float *grad_xkt,
                            float *grad_attn, long grad_attn_stride, long grad_attn_slice_stride,
                            float *grad_p_rows, float *grad_log_c_rows) {
    const int n_q = cfg->n_q, n_k = cfg->n_k, d = cfg->d;
    float *scratch = malloc(sizeof(float) * 4 * (size_t)(n_k > 0 ? n_k : 1));
    if (scratch == NULL) return 1;
    float *dist = scratch, *log_s = scratch + n_k, *omega = scratch + 2 * (size_t)n_k, *gx = scratch + 3 * (size_t)n_k;
    for (int s = s0; s < s1; s++) {
        const float *xq_s = xq + (size_t)s * n_q * d, *xkt_s = xkt + (size_t)s * d * n_k;
        const float *attn_s = attn + (size_t)s * cfg->attn_slice_stride;
        float *gxkt_s = grad_xkt + (size_t)s * d * n_k;
        for (int i = 0; i < n_q; i++) {
            const size_t row = (size_t)s * n_q + i;
            const float *a = attn_s + (size_t)i * cfg->attn_stride, *x = xq_s + (size_t)i * d;
            const float *g = grad_out + row * d;
            const int n = extents[row];
            const int loop = cfg->self_graph ? cfg->query_offset + i : -1;
            const float h = half[row], lc = log_c[row], lnorm = log_norm[row];
            const float beta = expf(lc - lnorm);
            /* dL/dlog c = beta g . (xq_i - U_i) (self graph; U_i = agg_i + beta xq_i) or -beta g . U_i. */
            float g_dot = 0.0f;
            for (int c = 0; c < d; c++) {
                const float u = agg[row * d + c] + (cfg->self_graph ? beta * x[c] : 0.0f);
                g_dot += g[c] * (cfg->self_graph ? x[c] - u : -u);
            }
            grad_log_c_rows[row] = beta * g_dot;
            float *gq = grad_xq + row * d;
            for (int c = 0; c < d; c++) gq[c] = cfg->self_graph ? beta * g[c] : 0.0f;
            distances(x, xkt_s, d, n_k, n, dist);
            const int loop_col = log_scaled(a, dist, n, cfg->eps, cfg->s_min_sq, loop, !cfg->drop_self_loops, log_s);
            for (int j = 0; j < n; j++) omega[j] = a[j] * expf(h * log_s[j] - lnorm);
            if (loop_col >= 0 && cfg->drop_self_loops) omega[loop_col] = 0.0f;
            /* dL/domega_j = g . xk_j; minus total = g . U_i, taken as g . (xk_j - U_i) against cancellation. */
            for (int j = 0; j < n; j++) gx[j] = 0.0f;
            for (int c = 0; c < d; c++) {
                const float gc = g[c], u = agg[row * d + c] + (cfg->self_graph ? beta * x[c] : 0.0f);
                const float *k = xkt_s + (size_t)c * n_k;
                for (int j = 0; j < n; j++) gx[j] += gc * (k[j] - u);
            }
            /* gx <- dL/dlog W; log_s is kept for dL/dp; dist <- dL/dD (0 at the floor and on forced loops). */
            float grad_p = 0.0f;
            float *ga = grad_attn != NULL
                            ? grad_attn + (size_t)s * grad_attn_slice_stride + (size_t)i * grad_attn_stride
                            : NULL;
            for (int j = 0; j < n; j++) {
                const float glw = gx[j] * omega[j];
                grad_p += glw * log_s[j];
                const float a_eps = a[j] + cfg->eps;
                /* S above the floor: dL/dS = glw h / S with S = (A + eps) D, so dL/dS D = glw h / (A + eps). */
                const float free_grad = a_eps * dist[j] > cfg->s_min_sq ? glw * h : 0.0f;
                const float grad_d = free_grad / fmaxf(dist[j], FLT_MIN);
                if (ga != NULL) ga[j] = glw / fmaxf(a[j], FLT_MIN) + free_grad / a_eps;
                dist[j] = grad_d;
                gx[j] = glw;
            }
            if (loop_col >= 0 && !cfg->drop_self_loops) {
                /* S forced to the floor: no gradient to the distance, dL/dA = dL/dlog W / A only. */
                dist[loop_col] = 0.0f;
                if (ga != NULL) ga[loop_col] = gx[loop_col] / fmaxf(a[loop_col], FLT_MIN);
            }
            if (ga != NULL)
                for (int j = n; j < n_k; j++) ga[j] = 0.0f;
            grad_p_rows[row] = 0.5f * grad_p;
            for (int c = 0; c < d; c++) {
                const float q = x[c], gc = g[c];
                const float *k = xkt_s + (size_t)c * n_k;
                float *gk = gxkt_s + (size_t)c * n_k;
                float acc = 0.0f;
                for (int j = 0; j < n; j++) {
                    const float diff = q - k[j];
                    acc += dist[j] * diff;
                    gk[j] += omega[j] * gc - 2.0f * dist[j] * diff;
                }
                gq[c] += 2.0f * acc;
            }
        }
    }
    free(scratch);
    return 0;
}

/*
 * ``paper`` variant (p-adapter.md §3.2), one block of query rows of a graph: the elementwise work between the
 * Gram product G = xq xk^T and the aggregation products, which stay BLAS matrix products in the caller.
 * Per slice: G, A (rows x keys, contiguous), col0 (keys) the column degrees before the block (causal) or of all
 * queries, sq_q (rows) / sq_k (keys) squared feature norms, half_p / log_c (rows) p/2 and log(2 mu / p).
 * With r = D_q^-1/2, c = D_j^-1/2 (0 for zero degrees; causal: D_j of row q counts rows <= q):
 *   dist = max(sq_q r^2 + sq_k c^2 - 2 G r c, floor), log W = (p/2) (log A + log dist) - log dist - log D_q,
 *   L = log(sum_edges W + e^log_c), omega = W e^-L, coefficient = omega sqrt(D_q) c (0 on non-edges).
 */
typedef struct {
    int rows, keys;
    float floor;
    int causal;
} PaperSettings;

typedef struct {
    float r, sqrt_row, log_row;
} RowDegree;

static RowDegree row_degree(const float *a, int keys) {
    float deg = 0.0f;
    for (int j = 0; j < keys; j++) deg += a[j];
    RowDegree out = {0.0f, 1.0f, 0.0f};
    if (deg > 0.0f) {
        out.r = 1.0f / sqrtf(deg);
        out.sqrt_row = sqrtf(deg);
        out.log_row = logf(deg);
    }
    return out;
}

/* Per key of one row: c (inv_col), 1 / dist above the floor else 0 (free_inv; NULL in the forward pass, which does
 * not need it), log A' + log dist (log_sum; A' = A on edges, 1 elsewhere) and log W (log_w). */
static void paper_row(const float *a, const float *g, const float *col, const float *sq_k, int keys, float sq_q,
                      RowDegree rd, float half_p, float floor, float *restrict inv_col, float *restrict free_inv,
                      float *restrict log_sum, float *restrict log_w) {
    const float sq_q_r2 = sq_q * rd.r * rd.r;
    for (int j = 0; j < keys; j++) {
        const float c = col[j] > 0.0f ? 1.0f / sqrtf(col[j]) : 0.0f;
        const float raw = sq_q_r2 + sq_k[j] * c * c - 2.0f * g[j] * rd.r * c;
        const float log_dist = logf(fmaxf(raw, floor));
        inv_col[j] = c;
        if (free_inv != NULL) free_inv[j] = raw > floor ? 1.0f / raw : 0.0f; /* the test is hoisted out of the loop */
        log_sum[j] = logf(a[j] > 0.0f ? a[j] : 1.0f) + log_dist;
        log_w[j] = half_p * log_sum[j] - log_dist - rd.log_row;
    }
}

/* Normaliser L of a row: log(sum over edges of e^log_w + e^log_c); e^(log_w - m) on edges (0 elsewhere) is left in
 * ``shifted`` and m in *shift, so that the caller needs no second exponential. */
static float paper_normaliser(const float *a, const float *log_w, int keys, float log_c, float *restrict shifted,
                              float *shift) {
    float m = log_c;
    for (int j = 0; j < keys; j++) m = fmaxf(m, a[j] > 0.0f ? log_w[j] : log_c);
    float total = expf(log_c - m);
    for (int j = 0; j < keys; j++) {
        const float e = a[j] > 0.0f ? expf(log_w[j] - m) : 0.0f;
        shifted[j] = e;
        total += e;
    }
    *shift = m;
    return m + logf(total);
}

/* Second backward pass over one row's keys (omega in ``omega``, t = dL/dcoef * coef): writes dL/dG, the column
 * degree gradient, the edge part of dL/dA, accumulates dL/dsq_k and the row sums. */
static void paper_row_grads(const float *restrict a, const float *restrict g, const float *restrict sqk,
                            const float *restrict t, const float *restrict omega, const float *restrict inv_col,
                            const float *restrict log_sum, const float *restrict free_inv, int keys, float total,
                            float hp, float r, float *restrict dgram, float *restrict grad_col,
                            float *restrict grad_attn, float *restrict gsqk, float *gp_out, float *glw_out,
                            float *gd_out, float *gic_out) {
    float gp = 0.0f, glw_sum = 0.0f, gd_sum = 0.0f, gic_g = 0.0f;
    for (int j = 0; j < keys; j++) {
        const float glw = t[j] - omega[j] * total; /* exactly 0 on non-edges */
        const float c = inv_col[j];
        gp += glw * log_sum[j];
        glw_sum += glw;
        const float gd = glw * (hp - 1.0f) * free_inv[j];
        const float g_ic = gd * c;
        dgram[j] = -2.0f * r * g_ic;
        gd_sum += gd;
        gic_g += g_ic * g[j];
        grad_col[j] = c * c * (g_ic * (r * g[j] - sqk[j] * c) - 0.5f * t[j]);
        grad_attn[j] = hp * glw / (a[j] > 0.0f ? a[j] : 1.0f);
        gsqk[j] += g_ic * c;
    }
    *gp_out = gp;
    *glw_out = glw_sum;
    *gd_out = gd_sum;
    *gic_out = gic_g;
}

/* Forward of one block: coef (rows x keys) and log_norm (rows); returns 2 if an entry of the rows it read (up to
 * each row's last non-zero) is negative. */
int vlpeft_paper_forward(int s0, int s1, const PaperSettings *cfg, const float *gram, const float *attn,
                         const float *col0, const float *sq_q, const float *sq_k, const float *half_p,
                         const float *log_c, float *coef, float *log_norm) {
    const int rows = cfg->rows, keys = cfg->keys;
    float *scratch = malloc(sizeof(float) * 5 * (size_t)(keys > 0 ? keys : 1));
    if (scratch == NULL) return 1;
    float *col = scratch, *inv_col = col + keys, *row_log_sum = inv_col + keys, *log_w = row_log_sum + keys;
    float *shifted = log_w + keys;
    for (int s = s0; s < s1; s++) {
        const size_t block = (size_t)s * rows * keys;
        for (int j = 0; j < keys; j++) col[j] = col0[(size_t)s * keys + j];
        for (int i = 0; i < rows; i++) {
            const size_t row = (size_t)s * rows + i, at = block + (size_t)i * keys;
            const float *a = attn + at, *g = gram + at;
            const int n = row_extent(a, keys); /* keys past the row's last edge have coefficient 0 */
            float lowest = 0.0f;
            for (int j = 0; j < n; j++) lowest = fminf(lowest, a[j]);
            if (lowest < 0.0f) {
                free(scratch);
                return 2;
            }
            if (cfg->causal)
                for (int j = 0; j < n; j++) col[j] += a[j];
            const RowDegree rd = row_degree(a, n);
            paper_row(a, g, col, sq_k + (size_t)s * keys, n, sq_q[row], rd, half_p[row], cfg->floor, inv_col, NULL,
                      row_log_sum, log_w);
            float shift;
            const float lnorm = paper_normaliser(a, log_w, n, log_c[row], shifted, &shift);
            log_norm[row] = lnorm;
            const float scale = expf(shift - lnorm) * rd.sqrt_row;
            float *out = coef + at;
            for (int j = 0; j < n; j++) out[j] = shifted[j] * scale * inv_col[j];
            for (int j = n; j < keys; j++) out[j] = 0.0f;
        }
    }
    free(scratch);
    return 0;
}

/*
 * Backward of one block. Inputs as the forward plus log_norm, dcoef = dL/dcoefficient (grad_out xk^T), grad_beta
 * (rows) = dL/dbeta and carry (keys): dL/dD_j of the later blocks (causal; added to every row's column term).
 * Outputs: coef (recomputed), dgram = dL/dG, grad_attn (rows x keys), per row grad_p (dL/dp of the weights), grad_log_c, grad_sq_q
 * (dL/dsq_q), grad_row_deg (dL/dD_q); per key grad_sq_k (+=) and col_grad_sum (the block's sum over rows of
 * dL/dD_j). grad_col is rows x keys scratch.
 */
int vlpeft_paper_backward(int s0, int s1, const PaperSettings *cfg, const float *gram, const float *attn,
                          const float *col0, const float *sq_q, const float *sq_k, const float *half_p,
                          const float *log_c, const float *log_norm, const float *dcoef, const float *grad_beta,
                          const float *carry, float *coef, float *dgram,
                          float *grad_attn, float *grad_col, float *grad_p, float *grad_log_c, float *grad_sq_q,
                          float *grad_row_deg, float *grad_sq_k, float *col_grad_sum) {
    const int rows = cfg->rows, keys = cfg->keys;
    float *scratch = malloc(sizeof(float) * 6 * (size_t)(keys > 0 ? keys : 1));
    if (scratch == NULL) return 1;
    float *col = scratch, *inv_col = col + keys, *free_inv = inv_col + keys, *row_log_sum = free_inv + keys;
    float *omega = row_log_sum + keys, *t = omega + keys;
    for (int s = s0; s < s1; s++) {
        const size_t block = (size_t)s * rows * keys;
        const float *sqk = sq_k + (size_t)s * keys;
        float *gsqk = grad_sq_k + (size_t)s * keys;
        for (int j = 0; j < keys; j++) col[j] = col0[(size_t)s * keys + j];
        for (int i = 0; i < rows; i++) {
            const size_t row = (size_t)s * rows + i, at = block + (size_t)i * keys;
            const float *a = attn + at, *g = gram + at, *dc = dcoef + at;
            /* Past the row's last edge every per-pair term is 0 (no weight, so no coefficient, dL/dG or column-degree
             * term); only the degree sums of the reverse pass below reach those entries of dL/dA. */
            const int n = row_extent(a, keys);
            if (cfg->causal)
                for (int j = 0; j < n; j++) col[j] += a[j];
            const RowDegree rd = row_degree(a, n);
            const float hp = half_p[row], lnorm = log_norm[row];
            const float beta = expf(log_c[row] - lnorm);
            float *cf = coef + at;
            float t_sum = 0.0f;
            paper_row(a, g, col, sqk, n, sq_q[row], rd, hp, cfg->floor, inv_col, free_inv, row_log_sum, omega);
            for (int j = 0; j < n; j++) {
                const float w = a[j] > 0.0f ? expf(omega[j] - lnorm) : 0.0f; /* omega held log W */
                omega[j] = w;
                cf[j] = w * rd.sqrt_row * inv_col[j];
                t[j] = dc[j] * cf[j];
                t_sum += t[j];
            }
            const float total = t_sum + beta * grad_beta[row];
            float gp = 0.0f, glw_sum = 0.0f, gd_sum = 0.0f, gic_g = 0.0f;
            paper_row_grads(a, g, sqk, t, omega, inv_col, row_log_sum, free_inv, n, total, hp, rd.r, dgram + at,
                            grad_col + at, grad_attn + at, gsqk, &gp, &glw_sum, &gd_sum, &gic_g);
            for (int j = n; j < keys; j++) cf[j] = dgram[at + j] = grad_col[at + j] = grad_attn[at + j] = 0.0f;
            const float grad_ir = 2.0f * sq_q[row] * rd.r * gd_sum - 2.0f * gic_g;
            grad_row_deg[row] = (-0.5f * grad_ir * rd.r + 0.5f * t_sum - glw_sum) * rd.r * rd.r;
            grad_p[row] = 0.5f * gp;
            grad_log_c[row] = beta * (grad_beta[row] - total);
            grad_sq_q[row] = gd_sum * rd.r * rd.r;
        }
        /* Column-degree terms: causal D_j of row q sums rows <= q, so row q' gets the sum over q >= q' (and the
         * later blocks' carry); otherwise the caller takes the column sum through the full degrees. */
        float *sums = col_grad_sum + (size_t)s * keys;
        for (int j = 0; j < keys; j++) col[j] = cfg->causal ? carry[(size_t)s * keys + j] : 0.0f;
        for (int j = 0; j < keys; j++) sums[j] = 0.0f;
        for (int i = rows - 1; i >= 0; i--) {
            const size_t row = (size_t)s * rows + i, at = block + (size_t)i * keys;
            const float rdeg = grad_row_deg[row];
            for (int j = 0; j < keys; j++) {
                sums[j] += grad_col[at + j];
                col[j] += cfg->causal ? grad_col[at + j] : 0.0f;
                grad_attn[at + j] += rdeg + col[j];
            }
        }
    }
    free(scratch);
    return 0;
}

"""Triton kernels of :mod:`vlpeft.functional.p_laplacian.triton_attention` (import that module, not this one).

Layouts: q (B, H, n, D), k/v (B, H_kv, n, D), features (B, H, n, D_f), row statistics (B, H, n) contiguous; grid
(query blocks or key blocks, batch * heads). Row statistics of the softmax are kept as the row maximum and the log
of the row sum separately (A = exp((S - max) - log sum)): under a finite "minus max float" mask every score of a
fully masked row rounds to the same value, and max + log sum would round back to it.

Importing this module needs Triton.
"""

import triton
import triton.language as tl


@triton.jit
def _tile_scores(q, k, bias_base, offs_m, offs_n, n, scale, s_bm, s_bn,
                 HAS_BIAS: tl.constexpr, CAUSAL: tl.constexpr, IEEE_SCORES: tl.constexpr):
    """Scores (BLOCK_M, BLOCK_N) in float32; -inf outside the sequence and above the causal diagonal."""
    col_ok = offs_n < n
    if IEEE_SCORES:
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
    else:
        s = tl.dot(q, tl.trans(k)) * scale
    if HAS_BIAS:
        bias = tl.load(bias_base + offs_m[:, None] * s_bm + offs_n[None, :] * s_bn,
                       mask=(offs_m < n)[:, None] & col_ok[None, :], other=0.0)
        s = s + bias.to(tl.float32)
    valid = col_ok[None, :]
    if CAUSAL:
        valid = valid & (offs_n[None, :] <= offs_m[:, None])
    return tl.where(valid, s, float("-inf"))


@triton.jit
def _tile_softmax(s, row_max, log_sum):
    """(A, log A) of a tile from the row statistics; A = 0 on rows whose scores are all -inf."""
    has_mass = row_max > float("-inf")
    shift = tl.where(has_mass, row_max, 0.0)
    log_a = (s - shift[:, None]) - log_sum[:, None]
    return tl.where(has_mass[:, None], tl.exp(log_a), 0.0), log_a


@triton.jit
def _tile_log_weights(a, log_a, d2, attended, offs_m, offs_n, half_pm2, eps, s_min_sq,
                      DROP_SELF_LOOPS: tl.constexpr):
    """(log W, log s^2, s^2, above floor) of a tile from the graph's A (and log A: the scores minus the row's
    log-sum-exp, no logarithm taken) and the squared distances D."""
    diag = offs_m[:, None] == offs_n[None, :]
    s2 = tl.maximum((a + eps) * d2, s_min_sq)
    s2 = tl.where(diag, s_min_sq, s2)
    log_s2 = tl.log(s2)
    edge = (a > 0.0) & attended[:, None]
    if DROP_SELF_LOOPS:
        edge = edge & (diag == 0)
    log_w = log_a + half_pm2 * log_s2
    log_w = tl.where(edge, log_w, float("-inf"))
    above = (s2 > s_min_sq) & (diag == 0)
    return log_w, log_s2, s2, above


@triton.jit
def _tile_distances(f_i, sq_i, f_j, f_base, offs_m, offs_n, n, d_f, s_fn, s_fd, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, F_LOOP: tl.constexpr, EXACT_DISTANCES: tl.constexpr,
                    PLAP_PRECISION: tl.constexpr):
    """Squared distances (BLOCK_M, BLOCK_N) of the feature rows: channel by channel (exact, no cancellation)
    or by the Gram identity |f_i|^2 + |f_j|^2 - 2 f_i.f_j (one product)."""
    if EXACT_DISTANCES:
        d2 = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for c in tl.static_range(F_LOOP):
            f_ic = tl.load(f_base + offs_m * s_fn + c * s_fd, mask=offs_m < n, other=0.0)
            f_jc = tl.load(f_base + offs_n * s_fn + c * s_fd, mask=offs_n < n, other=0.0)
            diff = f_ic[:, None] - f_jc[None, :]
            d2 += diff * diff
        return d2
    sq_j = tl.sum(f_j * f_j, 1)
    return sq_i[:, None] + sq_j[None, :] - 2.0 * tl.dot(f_i, tl.trans(f_j), input_precision=PLAP_PRECISION)


@triton.jit
def _tile_backward(s, f_i, sq_i, f_j, du_i, row_max, log_sum, log_norm, total_u, offs_m, offs_n, half_pm2, eps,
                   s_min_sq, f_base, n, d_f, s_fn, s_fd, DROP_SELF_LOOPS: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, F_LOOP: tl.constexpr, EXACT_DISTANCES: tl.constexpr,
                   PLAP_PRECISION: tl.constexpr):
    """Recompute a tile's softmax and p-Laplacian weights; return (A_softmax, dA^plap, dD, d log W, log s^2,
    omega)."""
    a_soft, log_a = _tile_softmax(s, row_max, log_sum)
    attended = row_max > -1e30
    a = tl.where(attended[:, None], a_soft, 0.0)
    d2 = _tile_distances(f_i, sq_i, f_j, f_base, offs_m, offs_n, n, d_f, s_fn, s_fd, BLOCK_M, BLOCK_N, F_LOOP,
                         EXACT_DISTANCES, PLAP_PRECISION)
    log_w, log_s2, s2, above = _tile_log_weights(a, log_a, d2, attended, offs_m, offs_n, half_pm2, eps,
                                                 s_min_sq, DROP_SELF_LOOPS)
    omega = tl.exp(log_w - log_norm[:, None])
    g = tl.dot(du_i, tl.trans(f_j), input_precision=PLAP_PRECISION)
    dlog_w = omega * (g - total_u[:, None])
    ratio = tl.where(above, half_pm2 / s2, 0.0)
    da = dlog_w / tl.maximum(a, 1.1754943508222875e-38) + dlog_w * ratio * d2
    dd = dlog_w * ratio * (a + eps)
    return a_soft, da, dd, dlog_w, log_s2, omega


@triton.jit
def forward_kernel(
    Q, K, V, F, BIAS, OUT, U, ROW_MAX, LOG_SUM, LOG_NORM, P, LOG_C,
    s_qb, s_qh, s_qn, s_qd, s_kb, s_kh, s_kn, s_kd, s_fb, s_fh, s_fn, s_fd, s_bb, s_bh, s_bm, s_bn,
    H, GROUP, n, head_dim, d_f, scale, eps, s_min_sq,
    HAS_BIAS: tl.constexpr, CAUSAL: tl.constexpr, DROP_SELF_LOOPS: tl.constexpr, D_PAD: tl.constexpr,
    F_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IEEE_SCORES: tl.constexpr,
    F_LOOP: tl.constexpr, EXACT_DISTANCES: tl.constexpr, PLAP_PRECISION: tl.constexpr,
):
    """One query block: pass 1 = flash-attention forward, pass 2 = the release p-Laplacian rows."""
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    kh = h // GROUP
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    offs_f = tl.arange(0, F_PAD)
    row_ok = offs_m < n
    q_mask = row_ok[:, None] & (offs_d < head_dim)[None, :]
    q_rows = b * s_qb + h * s_qh + offs_m[:, None] * s_qn + offs_d[None, :] * s_qd
    q = tl.load(Q + q_rows, mask=q_mask, other=0.0)
    kv_base = b * s_kb + kh * s_kh
    f_base = F + b * s_fb + h * s_fh
    bias_base = BIAS + b * s_bb + h * s_bh
    hi = n
    if CAUSAL:
        hi = tl.minimum(n, start_m + BLOCK_M)

    row_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    row_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kv_mask = (offs_n < n)[:, None] & (offs_d < head_dim)[None, :]
        kv_offsets = kv_base + offs_n[:, None] * s_kn + offs_d[None, :] * s_kd
        k = tl.load(K + kv_offsets, mask=kv_mask, other=0.0)
        s = _tile_scores(q, k, bias_base, offs_m, offs_n, n, scale, s_bm, s_bn, HAS_BIAS, CAUSAL, IEEE_SCORES)
        new_max = tl.maximum(row_max, tl.max(s, 1))
        shift = tl.where(new_max > float("-inf"), new_max, 0.0)
        alpha = tl.exp(row_max - shift)
        prob = tl.exp(s - shift[:, None])
        row_sum = row_sum * alpha + tl.sum(prob, 1)
        v = tl.load(V + kv_offsets, mask=kv_mask, other=0.0)
        if IEEE_SCORES:
            acc = acc * alpha[:, None] + tl.dot(prob, v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(prob.to(v.dtype), v)
        row_max = new_max
    has_mass = row_sum > 0.0
    safe_sum = tl.where(has_mass, row_sum, 1.0)
    tl.store(OUT + q_rows, (acc / safe_sum[:, None]).to(OUT.dtype.element_ty), mask=q_mask)
    log_sum = tl.log(safe_sum)
    tl.store(ROW_MAX + bh * n + offs_m, row_max, mask=row_ok)
    tl.store(LOG_SUM + bh * n + offs_m, log_sum, mask=row_ok)

    attended = row_max > -1e30
    f_mask = row_ok[:, None] & (offs_f < d_f)[None, :]
    f_rows = b * s_fb + h * s_fh + offs_m[:, None] * s_fn + offs_f[None, :] * s_fd
    f_i = tl.load(F + f_rows, mask=f_mask, other=0.0)
    sq_i = tl.sum(f_i * f_i, 1)
    log_c = tl.load(LOG_C + h)
    half_pm2 = 0.5 * (tl.load(P + h) - 2.0)
    w_max = tl.zeros([BLOCK_M], tl.float32) + log_c  # online log-sum-exp over {log W_ij} U {log c}
    w_sum = tl.zeros([BLOCK_M], tl.float32) + 1.0
    acc_u = tl.zeros([BLOCK_M, F_PAD], tl.float32)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kv_mask = (offs_n < n)[:, None] & (offs_d < head_dim)[None, :]
        k = tl.load(K + kv_base + offs_n[:, None] * s_kn + offs_d[None, :] * s_kd, mask=kv_mask, other=0.0)
        s = _tile_scores(q, k, bias_base, offs_m, offs_n, n, scale, s_bm, s_bn, HAS_BIAS, CAUSAL, IEEE_SCORES)
        a, log_a = _tile_softmax(s, row_max, log_sum)
        a = tl.where(attended[:, None], a, 0.0)
        f_j = tl.load(f_base + offs_n[:, None] * s_fn + offs_f[None, :] * s_fd,
                      mask=(offs_n < n)[:, None] & (offs_f < d_f)[None, :], other=0.0)
        d2 = _tile_distances(f_i, sq_i, f_j, f_base, offs_m, offs_n, n, d_f, s_fn, s_fd, BLOCK_M, BLOCK_N,
                             F_LOOP, EXACT_DISTANCES, PLAP_PRECISION)
        log_w, log_s2, s2, above = _tile_log_weights(a, log_a, d2, attended, offs_m, offs_n, half_pm2, eps,
                                                     s_min_sq, DROP_SELF_LOOPS)
        new_max = tl.maximum(w_max, tl.max(log_w, 1))
        alpha = tl.exp(w_max - new_max)
        w = tl.exp(log_w - new_max[:, None])
        w_sum = w_sum * alpha + tl.sum(w, 1)
        acc_u = acc_u * alpha[:, None] + tl.dot(w, f_j, input_precision=PLAP_PRECISION)
        w_max = new_max
    log_norm = w_max + tl.log(w_sum)
    beta = tl.exp(log_c - log_norm)
    tl.store(U + f_rows, acc_u / w_sum[:, None] + beta[:, None] * f_i, mask=f_mask)
    tl.store(LOG_NORM + bh * n + offs_m, log_norm, mask=row_ok)


@triton.jit
def backward_rows_kernel(
    Q, K, F, BIAS, ROW_MAX, LOG_SUM, LOG_NORM, P, DU, DELTA_OUT, TOTAL_U, DELTA, DP_ROWS, DF,
    s_qb, s_qh, s_qn, s_qd, s_kb, s_kh, s_kn, s_kd, s_fb, s_fh, s_fn, s_fd, s_bb, s_bh, s_bm, s_bn,
    H, GROUP, n, head_dim, d_f, scale, eps, s_min_sq,
    HAS_BIAS: tl.constexpr, CAUSAL: tl.constexpr, DROP_SELF_LOOPS: tl.constexpr, D_PAD: tl.constexpr,
    F_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IEEE_SCORES: tl.constexpr,
    F_LOOP: tl.constexpr, EXACT_DISTANCES: tl.constexpr, PLAP_PRECISION: tl.constexpr,
):
    """One query block: Delta_i = dO_i.O_i + sum_j A_ij dA^plap_ij, the row terms of dp, and the row half of
    dF (2 F_i sum_j dD_ij - 2 sum_j dD_ij F_j)."""
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    kh = h // GROUP
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    offs_f = tl.arange(0, F_PAD)
    row_ok = offs_m < n
    q = tl.load(Q + b * s_qb + h * s_qh + offs_m[:, None] * s_qn + offs_d[None, :] * s_qd,
                mask=row_ok[:, None] & (offs_d < head_dim)[None, :], other=0.0)
    f_mask = row_ok[:, None] & (offs_f < d_f)[None, :]
    f_rows = b * s_fb + h * s_fh + offs_m[:, None] * s_fn + offs_f[None, :] * s_fd
    f_i = tl.load(F + f_rows, mask=f_mask, other=0.0)
    du_i = tl.load(DU + f_rows, mask=f_mask, other=0.0)
    sq_i = tl.sum(f_i * f_i, 1)
    row_max = tl.load(ROW_MAX + bh * n + offs_m, mask=row_ok, other=float("-inf"))
    log_sum = tl.load(LOG_SUM + bh * n + offs_m, mask=row_ok, other=0.0)
    log_norm = tl.load(LOG_NORM + bh * n + offs_m, mask=row_ok, other=0.0)
    total_u = tl.load(TOTAL_U + bh * n + offs_m, mask=row_ok, other=0.0)
    half_pm2 = 0.5 * (tl.load(P + h) - 2.0)
    kv_base = b * s_kb + kh * s_kh
    f_base = F + b * s_fb + h * s_fh
    bias_base = BIAS + b * s_bb + h * s_bh
    hi = n
    if CAUSAL:
        hi = tl.minimum(n, start_m + BLOCK_M)
    attended = row_max > -1e30
    delta_plap = tl.zeros([BLOCK_M], tl.float32)
    dp_rows = tl.zeros([BLOCK_M], tl.float32)
    dd_rows = tl.zeros([BLOCK_M], tl.float32)
    dd_f = tl.zeros([BLOCK_M, F_PAD], tl.float32)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = tl.load(K + kv_base + offs_n[:, None] * s_kn + offs_d[None, :] * s_kd,
                    mask=(offs_n < n)[:, None] & (offs_d < head_dim)[None, :], other=0.0)
        s = _tile_scores(q, k, bias_base, offs_m, offs_n, n, scale, s_bm, s_bn, HAS_BIAS, CAUSAL, IEEE_SCORES)
        f_j = tl.load(f_base + offs_n[:, None] * s_fn + offs_f[None, :] * s_fd,
                      mask=(offs_n < n)[:, None] & (offs_f < d_f)[None, :], other=0.0)
        a_soft, da, dd, dlog_w, log_s2, omega = _tile_backward(
            s, f_i, sq_i, f_j, du_i, row_max, log_sum, log_norm, total_u, offs_m, offs_n, half_pm2, eps,
            s_min_sq, f_base, n, d_f, s_fn, s_fd, DROP_SELF_LOOPS, BLOCK_M, BLOCK_N, F_LOOP, EXACT_DISTANCES,
            PLAP_PRECISION)
        delta_plap += tl.sum(tl.where(attended[:, None], a_soft, 0.0) * da, 1)
        dp_rows += tl.sum(dlog_w * (log_s2 - tl.log(s_min_sq)), 1)  # self loops sit at 0
        dd_rows += tl.sum(dd, 1)
        dd_f += tl.dot(dd, f_j, input_precision=PLAP_PRECISION)
    delta_out = tl.load(DELTA_OUT + bh * n + offs_m, mask=row_ok, other=0.0)
    tl.store(DELTA + bh * n + offs_m, delta_out + delta_plap, mask=row_ok)
    tl.store(DP_ROWS + bh * n + offs_m, 0.5 * dp_rows, mask=row_ok)
    tl.store(DF + f_rows, 2.0 * dd_rows[:, None] * f_i - 2.0 * dd_f, mask=f_mask)


@triton.jit
def backward_columns_kernel(
    Q, K, V, F, BIAS, ROW_MAX, LOG_SUM, LOG_NORM, P, DO, DU, TOTAL_U, DELTA, DQ, DK, DV, DF,
    s_qb, s_qh, s_qn, s_qd, s_kb, s_kh, s_kn, s_kd, s_fb, s_fh, s_fn, s_fd, s_bb, s_bh, s_bm, s_bn,
    H, GROUP, n, head_dim, d_f, scale, eps, s_min_sq,
    HAS_BIAS: tl.constexpr, CAUSAL: tl.constexpr, DROP_SELF_LOOPS: tl.constexpr, D_PAD: tl.constexpr,
    F_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IEEE_SCORES: tl.constexpr,
    F_LOOP: tl.constexpr, EXACT_DISTANCES: tl.constexpr, PLAP_PRECISION: tl.constexpr,
):
    """One key block: dK, dV (per query head), the column half of dF, and dQ by float32 atomic adds."""
    start_n = tl.program_id(0) * BLOCK_N
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    kh = h // GROUP
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    offs_f = tl.arange(0, F_PAD)
    col_ok = offs_n < n
    kv_mask = col_ok[:, None] & (offs_d < head_dim)[None, :]
    kv_offsets = b * s_kb + kh * s_kh + offs_n[:, None] * s_kn + offs_d[None, :] * s_kd
    k = tl.load(K + kv_offsets, mask=kv_mask, other=0.0)
    v = tl.load(V + kv_offsets, mask=kv_mask, other=0.0)
    f_mask_j = col_ok[:, None] & (offs_f < d_f)[None, :]
    f_cols = b * s_fb + h * s_fh + offs_n[:, None] * s_fn + offs_f[None, :] * s_fd
    f_j = tl.load(F + f_cols, mask=f_mask_j, other=0.0)
    half_pm2 = 0.5 * (tl.load(P + h) - 2.0)
    bias_base = BIAS + b * s_bb + h * s_bh
    f_base = F + b * s_fb + h * s_fh
    dk = tl.zeros([BLOCK_N, D_PAD], tl.float32)
    dv = tl.zeros([BLOCK_N, D_PAD], tl.float32)
    df = tl.zeros([BLOCK_N, F_PAD], tl.float32)
    dd_cols = tl.zeros([BLOCK_N], tl.float32)
    lo = 0
    if CAUSAL:
        lo = (start_n // BLOCK_M) * BLOCK_M
    for start_m in range(lo, n, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_ok = offs_m < n
        q_mask = row_ok[:, None] & (offs_d < head_dim)[None, :]
        q_rows = b * s_qb + h * s_qh + offs_m[:, None] * s_qn + offs_d[None, :] * s_qd
        q = tl.load(Q + q_rows, mask=q_mask, other=0.0)
        do = tl.load(DO + q_rows, mask=q_mask, other=0.0)
        f_mask_i = row_ok[:, None] & (offs_f < d_f)[None, :]
        f_rows = b * s_fb + h * s_fh + offs_m[:, None] * s_fn + offs_f[None, :] * s_fd
        f_i = tl.load(F + f_rows, mask=f_mask_i, other=0.0)
        du_i = tl.load(DU + f_rows, mask=f_mask_i, other=0.0)
        sq_i = tl.sum(f_i * f_i, 1)
        row_max = tl.load(ROW_MAX + bh * n + offs_m, mask=row_ok, other=float("-inf"))
        log_sum = tl.load(LOG_SUM + bh * n + offs_m, mask=row_ok, other=0.0)
        log_norm = tl.load(LOG_NORM + bh * n + offs_m, mask=row_ok, other=0.0)
        total_u = tl.load(TOTAL_U + bh * n + offs_m, mask=row_ok, other=0.0)
        delta = tl.load(DELTA + bh * n + offs_m, mask=row_ok, other=0.0)
        s = _tile_scores(q, k, bias_base, offs_m, offs_n, n, scale, s_bm, s_bn, HAS_BIAS, CAUSAL, IEEE_SCORES)
        a_soft, da, dd, dlog_w, log_s2, omega = _tile_backward(
            s, f_i, sq_i, f_j, du_i, row_max, log_sum, log_norm, total_u, offs_m, offs_n, half_pm2, eps,
            s_min_sq, f_base, n, d_f, s_fn, s_fd, DROP_SELF_LOOPS, BLOCK_M, BLOCK_N, F_LOOP, EXACT_DISTANCES,
            PLAP_PRECISION)
        if IEEE_SCORES:
            ds = a_soft * (tl.dot(do, tl.trans(v), input_precision="ieee") + da - delta[:, None])
            dv += tl.dot(tl.trans(a_soft), do, input_precision="ieee")
            dk += tl.dot(tl.trans(ds), q, input_precision="ieee")
            dq = tl.dot(ds, k, input_precision="ieee")
        else:
            ds = a_soft * (tl.dot(do, tl.trans(v)) + da - delta[:, None])
            dv += tl.dot(tl.trans(a_soft.to(do.dtype)), do)
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q)
            dq = tl.dot(ds.to(k.dtype), k)
        tl.atomic_add(DQ + bh * n * head_dim + offs_m[:, None] * head_dim + offs_d[None, :], dq * scale,
                      mask=q_mask, sem="relaxed")  # a plain sum: no ordering needed
        df += tl.dot(tl.trans(omega), du_i, input_precision=PLAP_PRECISION)
        df -= 2.0 * tl.dot(tl.trans(dd), f_i, input_precision=PLAP_PRECISION)
        dd_cols += tl.sum(dd, 0)
    df += 2.0 * dd_cols[:, None] * f_j
    kv_rows = bh * n * head_dim + offs_n[:, None] * head_dim + offs_d[None, :]
    tl.store(DK + kv_rows, (dk * scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + kv_rows, dv.to(DV.dtype.element_ty), mask=kv_mask)
    tl.store(DF + f_cols, df, mask=f_mask_j)

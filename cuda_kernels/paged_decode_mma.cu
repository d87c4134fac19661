// Paged decode attention on tensor cores (mma.sync m16n8k16, fp32 accumulation): same
// contract, grid and partial outputs as paged_decode_split_kernel (paged_decode.cu, whose
// pass 2 merges them). NOTE: a fused pass 2 (last CTA merges, threadFenceReduction style)
// was measured slower (batch 1: 23 us vs 13 us; batch >= 16: -5..10%) and dropped.
// The HG query heads of one KV head form the 16 rows of the MMA
// A operand (rows >= HG are zero padding), so a warp spends ~2 MMAs per token instead of
// ~1000 FMAs per token per CTA on CUDA cores.
//
// Grid (num_heads / HG, num_seqs, max_splits), 4 warps, HG <= 16 (runtime), dynamic smem.
// Each warp streams its own 16-token slices of the partition (warp w takes tokens
// [start + 64*i + 16*w, +16) for i = 0, 1, ...) through a private STAGES-deep cp.async ring:
//
//   ring[stage][warp][K|V][token 0..15][chunk 0..D/8-1] of 16 B, chunk stored at chunk^(token&7)
//
// (the XOR swizzle keeps the 8 rows of every ldmatrix 8x8 tile in distinct banks).
// Per 16-token slice:  S[16 x 16] = Q[16 x D] . K^T   (ldmatrix K, D/8 MMAs)
//                      online softmax per row in the log2 domain (lazy rescale, as pass 1)
//                      O[16 x D] += P[16 x 16] . V    (ldmatrix.trans V, D/8 MMAs)
// The S accumulator fragment is reused as the P operand fragment (FlashAttention-2 layout).

#define MMA_WARPS 4
#define MMA_MAX_PARTITION 512
#define MMA_LAZY 8.f

template <typename T> struct Mma;

template <> struct Mma<bf16_t> {
  static __device__ __forceinline__ void run(float* c, const unsigned* a, unsigned b0,
                                             unsigned b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  static __device__ __forceinline__ unsigned pack(float lo, float hi) {
    unsigned r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
  }
};

template <> struct Mma<f16_t> {
  static __device__ __forceinline__ void run(float* c, const unsigned* a, unsigned b0,
                                             unsigned b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  static __device__ __forceinline__ unsigned pack(float lo, float hi) {
    unsigned r;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
  }
};

__device__ __forceinline__ unsigned mma_smem_addr(const void* p) {
  unsigned a;
  asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
  return a;
}

// 16-byte async copy; src_bytes 0 zero-fills the destination (padding tokens).
__device__ __forceinline__ void mma_cp_async(unsigned dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
               "r"(src_bytes));
}

__device__ __forceinline__ void ldsm_x4(unsigned addr, unsigned& r0, unsigned& r1, unsigned& r2,
                                        unsigned& r3) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3) : "r"(addr));
}

__device__ __forceinline__ void ldsm_x4_t(unsigned addr, unsigned& r0, unsigned& r1,
                                          unsigned& r2, unsigned& r3) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3) : "r"(addr));
}

// MMA_STAGES 3: 96 KiB ring (D=128) -> 2 CTAs per SM; 2: 64 KiB -> 3 CTAs per SM.
template <typename T, int HEAD_DIM, int BLOCK_SIZE, int MMA_STAGES>
__global__ void __launch_bounds__(MMA_WARPS * 32, MMA_STAGES == 2 ? 3 : 2) paged_decode_mma_kernel(
    float* __restrict__ part_out, float* __restrict__ part_ml,
    const T* __restrict__ query, const T* __restrict__ k_cache, const T* __restrict__ v_cache,
    const int* __restrict__ block_tables, const int* __restrict__ seq_lens,
    i64 q_stride_seq, i64 q_stride_head, i64 cache_block_stride, i64 cache_slot_stride,
    int bt_stride, int num_heads, int group, int max_splits, int partition, float scale_log2,
    int hg) {
  constexpr int CHUNKS = HEAD_DIM / 8;             // 16-byte chunks per row
  constexpr int ROW_BYTES = HEAD_DIM * 2;
  constexpr int SLICE_BYTES = 16 * ROW_BYTES;      // one K (or V) slice of 16 tokens
  constexpr int WARP_STAGE = 2 * SLICE_BYTES;      // K + V
  constexpr int STAGE_BYTES = MMA_WARPS * WARP_STAGE;
  constexpr int CTA_STEP = MMA_WARPS * 16;
  constexpr int KSTEPS = HEAD_DIM / 16;
  constexpr int NTILES = HEAD_DIM / 8;

  const int h0 = blockIdx.x * hg;
  const int seq = blockIdx.y;
  const int split = blockIdx.z;
  const int kvh = h0 / group;
  const int seq_len = imin(seq_lens[seq], bt_stride * BLOCK_SIZE);
  const int start = split * partition;
  if (start >= seq_len) return;  // empty partition: pass 2 ignores it (uses seq_len too)
  const int end = imin(start + partition, seq_len);
  const int num_steps = (end - start + CTA_STEP - 1) / CTA_STEP;

  extern __shared__ __align__(128) unsigned char smem[];
  __shared__ int s_bt[MMA_MAX_PARTITION / BLOCK_SIZE];
  __shared__ float s_m[MMA_WARPS][16], s_l[MMA_WARPS][16];

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int first_blk = start / BLOCK_SIZE;
  const int num_blk = (end - 1) / BLOCK_SIZE - first_blk + 1;
  const int* bt = block_tables + (i64)seq * bt_stride + first_blk;
  for (int i = tid; i < num_blk; i += MMA_WARPS * 32) s_bt[i] = bt[i];
  __syncthreads();

  const T* k_head = k_cache + (i64)kvh * HEAD_DIM;
  const T* v_head = v_cache + (i64)kvh * HEAD_DIM;
  const unsigned ring = mma_smem_addr(smem) + warp * WARP_STAGE;

  // lane copies chunks idx = lane + 32*j of the 16 x CHUNKS slice: coalesced row pieces.
  // NOTE: a 16-token slice starts 16-aligned, so it lies in ONE block (BLOCK_SIZE 16 or 32):
  // one block-table read per slice; rows past `end` stay inside that block's memory and are
  // zero-filled (src size 0), so no clamping is needed.
  static_assert(BLOCK_SIZE % 16 == 0, "a 16-token slice must not straddle blocks");
  auto issue = [&](int step) {
    const int t0 = start + step * CTA_STEP + warp * 16;
    if (step < num_steps && t0 < end) {
      const unsigned base = ring + (step % MMA_STAGES) * STAGE_BYTES;
      const i64 blk_off = (i64)s_bt[t0 / BLOCK_SIZE - first_blk] * cache_block_stride +
                          (i64)(t0 % BLOCK_SIZE) * cache_slot_stride;
      const T* k_src = k_head + blk_off;
      const T* v_src = v_head + blk_off;
#pragma unroll
      for (int idx = lane; idx < 16 * CHUNKS; idx += 32) {
        const int row = idx / CHUNKS, chunk = idx % CHUNKS;
        const i64 off = (i64)row * cache_slot_stride + chunk * 8;
        const int nbytes = t0 + row < end ? 16 : 0;
        const unsigned dst = base + row * ROW_BYTES + ((chunk ^ (row & 7)) * 16);
        mma_cp_async(dst, k_src + off, nbytes);
        mma_cp_async(dst + SLICE_BYTES, v_src + off, nbytes);
      }
    }
    asm volatile("cp.async.commit_group;\n" ::);
  };
#pragma unroll
  for (int s = 0; s < MMA_STAGES - 1; ++s) issue(s);

  // Q as MMA A fragments: rows r0 = lane/4 and r1 = r0 + 8 (zero when >= hg)
  const int r0 = lane / 4, r1 = r0 + 8, cq = (lane % 4) * 2;
  unsigned qa[KSTEPS][4];
  {
    const unsigned* q0 = reinterpret_cast<const unsigned*>(query + seq * q_stride_seq + (i64)(h0 + r0) * q_stride_head);
    const unsigned* q1 = reinterpret_cast<const unsigned*>(query + seq * q_stride_seq + (i64)(h0 + r1) * q_stride_head);
#pragma unroll
    for (int ks = 0; ks < KSTEPS; ++ks) {
      const int w = (ks * 16 + cq) / 2;  // 32-bit word index of the pair
      qa[ks][0] = r0 < hg ? __ldg(q0 + w) : 0u;
      qa[ks][1] = r1 < hg ? __ldg(q1 + w) : 0u;
      qa[ks][2] = r0 < hg ? __ldg(q0 + w + 4) : 0u;
      qa[ks][3] = r1 < hg ? __ldg(q1 + w + 4) : 0u;
    }
  }
  float o[NTILES][4];
#pragma unroll
  for (int n = 0; n < NTILES; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
  float m0 = NEG_INF, m1 = NEG_INF, l0 = 0.f, l1 = 0.f;  // rows r0, r1 (l: this lane's part)

  // ldmatrix lane roles: matrix mi = lane / 8, row lane % 8
  const int mi = lane / 8, mrow = lane % 8;
  for (int step = 0; step < num_steps; ++step) {
    issue(step + MMA_STAGES - 1);
    asm volatile("cp.async.wait_group %0;\n" ::"n"(MMA_STAGES - 1));
    __syncwarp();
    const int t0 = start + step * CTA_STEP + warp * 16;
    if (t0 < end) {  // warp-uniform
      const unsigned kbase = ring + (step % MMA_STAGES) * STAGE_BYTES;
      const unsigned vbase = kbase + SLICE_BYTES;
      // ---- S = Q K^T: s[nb] covers tokens nb*8 + cq, +1 (rows r0: [0],[1]; r1: [2],[3])
      float s[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
      const int krow = (mi / 2) * 8 + mrow;
#pragma unroll
      for (int ks = 0; ks < KSTEPS; ++ks) {
        const int chunk = 2 * ks + (mi % 2);
        unsigned b00, b01, b10, b11;
        ldsm_x4(kbase + krow * ROW_BYTES + ((chunk ^ (krow & 7)) * 16), b00, b01, b10, b11);
        Mma<T>::run(s[0], qa[ks], b00, b01);
        Mma<T>::run(s[1], qa[ks], b10, b11);
      }
      // ---- online softmax (log2 domain), tokens past `end` masked
      float mx0 = NEG_INF, mx1 = NEG_INF;
#pragma unroll
      for (int nb = 0; nb < 2; ++nb)
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          const bool ok = t0 + nb * 8 + cq + j < end;
          s[nb][j] = ok ? s[nb][j] * scale_log2 : NEG_INF;
          s[nb][2 + j] = ok ? s[nb][2 + j] * scale_log2 : NEG_INF;
          mx0 = fmaxf(mx0, s[nb][j]);
          mx1 = fmaxf(mx1, s[nb][2 + j]);
        }
      mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
      mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
      mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
      mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
      // NOTE: t0 < end, so every row has >= 1 finite logit: mx is finite here.
      if (mx0 > m0 + MMA_LAZY) {
        const float a = fast_exp2(m0 - mx0);
        m0 = mx0;
        l0 *= a;
#pragma unroll
        for (int n = 0; n < NTILES; ++n) o[n][0] *= a, o[n][1] *= a;
      }
      if (mx1 > m1 + MMA_LAZY) {
        const float a = fast_exp2(m1 - mx1);
        m1 = mx1;
        l1 *= a;
#pragma unroll
        for (int n = 0; n < NTILES; ++n) o[n][2] *= a, o[n][3] *= a;
      }
      unsigned pa[4];  // P as the A fragment of the PV MMA (k = tokens)
#pragma unroll
      for (int nb = 0; nb < 2; ++nb) {
        const float p0 = fast_exp2(s[nb][0] - m0), p1 = fast_exp2(s[nb][1] - m0);
        const float p2 = fast_exp2(s[nb][2] - m1), p3 = fast_exp2(s[nb][3] - m1);
        l0 += p0 + p1;
        l1 += p2 + p3;
        pa[2 * nb] = Mma<T>::pack(p0, p1);
        pa[2 * nb + 1] = Mma<T>::pack(p2, p3);
      }
      // ---- O += P V
      const int vrow = (mi % 2) * 8 + mrow;
#pragma unroll
      for (int j = 0; j < NTILES / 2; ++j) {
        const int chunk = 2 * j + mi / 2;
        unsigned b00, b01, b10, b11;
        ldsm_x4_t(vbase + vrow * ROW_BYTES + ((chunk ^ (vrow & 7)) * 16), b00, b01, b10, b11);
        Mma<T>::run(o[2 * j], pa, b00, b01);
        Mma<T>::run(o[2 * j + 1], pa, b10, b11);
      }
    }
    __syncwarp();  // NOTE: all lanes done reading this stage before it is refilled
  }
  asm volatile("cp.async.wait_group 0;\n" ::);
  __syncthreads();  // the ring becomes the cross-warp reduction buffer

  l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
  l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
  l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
  l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
  float* s_o = reinterpret_cast<float*>(smem);  // [MMA_WARPS][16][HEAD_DIM]
#pragma unroll
  for (int n = 0; n < NTILES; ++n) {
    float* row0 = s_o + (warp * 16 + r0) * HEAD_DIM + n * 8 + cq;
    float* row1 = s_o + (warp * 16 + r1) * HEAD_DIM + n * 8 + cq;
    row0[0] = o[n][0];
    row0[1] = o[n][1];
    row1[0] = o[n][2];
    row1[1] = o[n][3];
  }
  if (lane % 4 == 0) {
    s_m[warp][r0] = m0;
    s_l[warp][r0] = l0;
    s_m[warp][r1] = m1;
    s_l[warp][r1] = l1;
  }
  __syncthreads();
  for (int i = tid; i < hg * HEAD_DIM; i += MMA_WARPS * 32) {
    const int g = i / HEAD_DIM, d = i % HEAD_DIM;
    float mx = s_m[0][g];
#pragma unroll
    for (int w = 1; w < MMA_WARPS; ++w) mx = fmaxf(mx, s_m[w][g]);
    float acc = 0.f, lsum = 0.f;
#pragma unroll
    for (int w = 0; w < MMA_WARPS; ++w) {
      const float wt = (s_m[w][g] == NEG_INF) ? 0.f : fast_exp2(s_m[w][g] - mx);
      acc = fmaf(s_o[(w * 16 + g) * HEAD_DIM + d], wt, acc);
      lsum = fmaf(s_l[w][g], wt, lsum);
    }
    const i64 row = ((i64)seq * num_heads + h0 + g) * max_splits + split;
    part_out[row * HEAD_DIM + d] = acc;
    if (d == 0) {
      part_ml[row * 2] = mx;
      part_ml[row * 2 + 1] = lsum;
    }
  }
}

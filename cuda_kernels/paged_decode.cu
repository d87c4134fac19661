// Paged decode attention, split-K (flash-decoding): pass 1 attends one context partition per
// CTA and writes unnormalised partial outputs plus (max, sum) in the log2 domain; pass 2
// merges the partitions of each (sequence, head). fp16/bf16 loads, fp32 accumulation.
//
//   query        [num_seqs, num_heads, HEAD_DIM]       (16-byte aligned rows)
//   k/v_cache    [num_blocks, BLOCK_SIZE, num_kv_heads, HEAD_DIM]
//   block_tables [num_seqs, bt_stride] int32, seq_lens [num_seqs] int32
//   part_out     [num_seqs, num_heads, max_splits, HEAD_DIM] f32
//   part_ml      [num_seqs, num_heads, max_splits, 2]        f32 (max, sum)
//
// Pass 1 grid = (num_heads / HG, num_seqs, max_splits), 128 threads. One CTA serves HG query
// heads that share one KV head (GQA), so each K/V row is read once for all of them.
// Thread layout inside a warp (LANES = HEAD_DIM / 16 lanes per token):
//
//   lane = ltok * LANES + lpart     token (ltok) x 16 of its HEAD_DIM elements (lpart)
//   lpart owns elements [lpart*8, +8) and [HEAD_DIM/2 + lpart*8, +8): each of the two 16-byte
//   loads of a warp covers whole contiguous 128-byte (D=128) or 64-byte (D=64) row halves.

#define NUM_WARPS 4
#define UNROLL 2

__device__ __forceinline__ uint4 ldg16(const void* p) {
  return __ldg(reinterpret_cast<const uint4*>(p));
}

template <typename T, int HEAD_DIM, int BLOCK_SIZE, int HG>
__global__ void __launch_bounds__(NUM_WARPS * 32) paged_decode_split_kernel(
    float* __restrict__ part_out, float* __restrict__ part_ml,
    const T* __restrict__ query, const T* __restrict__ k_cache, const T* __restrict__ v_cache,
    const int* __restrict__ block_tables, const int* __restrict__ seq_lens,
    i64 q_stride_seq, i64 q_stride_head, i64 cache_block_stride, i64 cache_slot_stride,
    int bt_stride, int num_heads, int group, int max_splits, int partition, float scale_log2) {
  constexpr int LANES = HEAD_DIM / 16;
  constexpr int TPW = 32 / LANES;           // tokens per warp step
  constexpr int STEP = NUM_WARPS * TPW;     // tokens per CTA step
  const int h0 = blockIdx.x * HG;
  const int seq = blockIdx.y;
  const int split = blockIdx.z;
  const int kvh = h0 / group;
  // NOTE: clamp to the table's capacity so bad seq_lens cannot read past the block table.
  const int seq_len = imin(seq_lens[seq], bt_stride * BLOCK_SIZE);
  const int start = split * partition;
  if (start >= seq_len) return;  // empty partition: pass 2 ignores it (uses seq_len too)
  const int end = imin(start + partition, seq_len);
  const int n = end - start;

  extern __shared__ float smem[];
  float* logits = smem;                          // [HG][partition]
  float* red_out = smem + HG * partition;        // [NUM_WARPS][HG][HEAD_DIM]
  __shared__ float red[NUM_WARPS][HG];
  __shared__ float s_max[HG], s_sum[HG];

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int ltok = lane / LANES, lpart = lane % LANES;
  const int e0 = lpart * 8, e1 = HEAD_DIM / 2 + lpart * 8;

  float q[HG][16];
#pragma unroll
  for (int g = 0; g < HG; ++g) {
    const T* qp = query + seq * q_stride_seq + (i64)(h0 + g) * q_stride_head;
    unpack8<T>(ldg16(qp + e0), q[g]);
    unpack8<T>(ldg16(qp + e1), q[g] + 8);
#pragma unroll
    for (int e = 0; e < 16; ++e) q[g][e] *= scale_log2;  // logits in log2 units
  }
  const int* bt = block_tables + (i64)seq * bt_stride;
  const T* k_head = k_cache + (i64)kvh * HEAD_DIM;
  const T* v_head = v_cache + (i64)kvh * HEAD_DIM;

  // ---- pass over K: logits[g][t] = q_g . k_t * scale * log2(e)
  float tmax[HG];
#pragma unroll
  for (int g = 0; g < HG; ++g) tmax[g] = NEG_INF;
  for (int base = start; base < end; base += STEP * UNROLL) {
    uint4 kr[UNROLL][2];
    int tk[UNROLL];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      tk[u] = base + u * STEP + warp * TPW + ltok;
      if (tk[u] < end) {
        const T* p = k_head + (i64)bt[tk[u] / BLOCK_SIZE] * cache_block_stride +
                     (i64)(tk[u] % BLOCK_SIZE) * cache_slot_stride;
        kr[u][0] = ldg16(p + e0);
        kr[u][1] = ldg16(p + e1);
      } else {
        kr[u][0] = zero_uint4();
        kr[u][1] = zero_uint4();
      }
    }
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      float kf[16];
      unpack8<T>(kr[u][0], kf);
      unpack8<T>(kr[u][1], kf + 8);
#pragma unroll
      for (int g = 0; g < HG; ++g) {
        float s = 0.f;
#pragma unroll
        for (int e = 0; e < 16; ++e) s = fmaf(q[g][e], kf[e], s);
#pragma unroll
        for (int o = LANES / 2; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
        if (tk[u] < end) {
          tmax[g] = fmaxf(tmax[g], s);
          if (lpart == 0) logits[g * partition + (tk[u] - start)] = s;
        }
      }
    }
  }
#pragma unroll
  for (int g = 0; g < HG; ++g) {
    const float m = warp_max(tmax[g]);
    if (lane == 0) red[warp][g] = m;
  }
  __syncthreads();
  if (threadIdx.x < HG) {
    float m = red[0][threadIdx.x];
#pragma unroll
    for (int w = 1; w < NUM_WARPS; ++w) m = fmaxf(m, red[w][threadIdx.x]);
    s_max[threadIdx.x] = m;
  }
  __syncthreads();

  // ---- softmax numerators in place, partial sums
  float lsum[HG];
#pragma unroll
  for (int g = 0; g < HG; ++g) {
    lsum[g] = 0.f;
    const float m = s_max[g];
    for (int i = threadIdx.x; i < n; i += NUM_WARPS * 32) {
      const float p = fast_exp2(logits[g * partition + i] - m);
      logits[g * partition + i] = p;
      lsum[g] += p;
    }
  }
  __syncthreads();  // NOTE: `red` is reused below and logits must be final before pass over V
#pragma unroll
  for (int g = 0; g < HG; ++g) {
    const float s = warp_sum(lsum[g]);
    if (lane == 0) red[warp][g] = s;
  }

  // ---- pass over V: acc[g] = sum_t p[g][t] * v_t
  float acc[HG][16];
#pragma unroll
  for (int g = 0; g < HG; ++g)
#pragma unroll
    for (int e = 0; e < 16; ++e) acc[g][e] = 0.f;
  for (int base = start; base < end; base += STEP * UNROLL) {
    uint4 vr[UNROLL][2];
    int tk[UNROLL];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      tk[u] = base + u * STEP + warp * TPW + ltok;
      if (tk[u] < end) {
        const T* p = v_head + (i64)bt[tk[u] / BLOCK_SIZE] * cache_block_stride +
                     (i64)(tk[u] % BLOCK_SIZE) * cache_slot_stride;
        vr[u][0] = ldg16(p + e0);
        vr[u][1] = ldg16(p + e1);
      }
    }
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      if (tk[u] < end) {
        float vf[16];
        unpack8<T>(vr[u][0], vf);
        unpack8<T>(vr[u][1], vf + 8);
#pragma unroll
        for (int g = 0; g < HG; ++g) {
          const float p = logits[g * partition + (tk[u] - start)];
#pragma unroll
          for (int e = 0; e < 16; ++e) acc[g][e] = fmaf(p, vf[e], acc[g][e]);
        }
      }
    }
  }
  // reduce over the TPW token lanes of this warp, then over warps through shared memory
#pragma unroll
  for (int g = 0; g < HG; ++g)
#pragma unroll
    for (int e = 0; e < 16; ++e)
#pragma unroll
      for (int o = LANES; o < 32; o <<= 1) acc[g][e] += __shfl_xor_sync(0xffffffffu, acc[g][e], o);
  if (ltok == 0) {
#pragma unroll
    for (int g = 0; g < HG; ++g)
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        red_out[(warp * HG + g) * HEAD_DIM + e0 + e] = acc[g][e];
        red_out[(warp * HG + g) * HEAD_DIM + e1 + e] = acc[g][8 + e];
      }
  }
  __syncthreads();
  for (int i = threadIdx.x; i < HG * HEAD_DIM; i += NUM_WARPS * 32) {
    const int g = i / HEAD_DIM, d = i % HEAD_DIM;
    float s = 0.f;
#pragma unroll
    for (int w = 0; w < NUM_WARPS; ++w) s += red_out[(w * HG + g) * HEAD_DIM + d];
    part_out[(((i64)seq * num_heads + h0 + g) * max_splits + split) * HEAD_DIM + d] = s;
  }
  if (threadIdx.x < HG) {
    float l = 0.f;
#pragma unroll
    for (int w = 0; w < NUM_WARPS; ++w) l += red[w][threadIdx.x];
    float* ml = part_ml + (((i64)seq * num_heads + h0 + threadIdx.x) * max_splits + split) * 2;
    ml[0] = s_max[threadIdx.x];
    ml[1] = l;
  }
}

// Pass 2: grid = (num_heads, num_seqs), HEAD_DIM threads. out [num_seqs, num_heads, HEAD_DIM]
// contiguous. seq_len 0 (a padded batch row) writes zeros.
template <typename T, int HEAD_DIM>
__global__ void __launch_bounds__(HEAD_DIM) paged_decode_reduce_kernel(
    unsigned short* __restrict__ out, const float* __restrict__ part_out,
    const float* __restrict__ part_ml, const int* __restrict__ seq_lens,
    int num_heads, int max_splits, int partition, int max_len) {
  const int head = blockIdx.x, seq = blockIdx.y, d = threadIdx.x;
  const int seq_len = imin(seq_lens[seq], max_len);
  const int n_splits = seq_len > 0 ? (seq_len + partition - 1) / partition : 0;
  const i64 row = (i64)seq * num_heads + head;
  const float* ml = part_ml + row * max_splits * 2;
  float m = NEG_INF;
  for (int i = 0; i < n_splits; ++i) m = fmaxf(m, ml[2 * i]);
  float l = 0.f, acc = 0.f;
  for (int i = 0; i < n_splits; ++i) {
    const float w = fast_exp2(ml[2 * i] - m);
    l = fmaf(ml[2 * i + 1], w, l);
    acc = fmaf(part_out[(row * max_splits + i) * HEAD_DIM + d], w, acc);
  }
  out[row * HEAD_DIM + d] = Packed<T>::from_float(n_splits > 0 ? acc / l : 0.f);
}

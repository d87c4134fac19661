// Paged decode attention, split-K (flash-decoding): pass 1 attends one context partition per
// CTA in ONE streaming pass over K and V (online softmax) and writes unnormalised partial
// outputs plus (max, sum) in the log2 domain; pass 2 merges the partitions of each
// (sequence, head). fp16/bf16 loads, fp32 accumulation.
//
//   query        [num_seqs, num_heads, HEAD_DIM]       (16-byte aligned rows)
//   k/v_cache    [num_blocks, BLOCK_SIZE, num_kv_heads, HEAD_DIM]
//   block_tables [num_seqs, bt_stride] int32, seq_lens [num_seqs] int32
//   part_out     [num_seqs, num_heads, max_splits, HEAD_DIM] f32
//   part_ml      [num_seqs, num_heads, max_splits, 2]        f32 (max, sum)
//
// Pass 1 grid = (num_heads / HG, num_seqs, max_splits), 128 threads. One CTA serves HG <= 4
// query heads that share one KV head (GQA), so each K/V row is read once for all of them
// (larger groups use several CTAs per KV head; their re-reads hit L2).
// Thread layout inside a warp (LANES = HEAD_DIM / 16 lanes per token):
//
//   lane = ltok * LANES + lpart     token (ltok) x 16 of its HEAD_DIM elements (lpart)
//   lpart owns elements [lpart*8, +8) and [HEAD_DIM/2 + lpart*8, +8): each 16-byte load of a
//   quarter warp covers one contiguous 128-byte row half (D=128) or row (D=64).
//
// Memory pipeline: a CTA walks its partition in tiles of STEP tokens (one token per lane
// group). Every thread cp.async-copies exactly the four 16-byte pieces (K e0, K e1, V e0,
// V e1) it will consume into its own slots of a STAGES-deep shared-memory ring, so tiles
// i+1..i+STAGES-1 are in flight while tile i is computed, with no registers held for them
// and no CTA barrier (each thread only reads what it copied itself):
//
//   ring[stage][piece 0..3][thread 0..127] of 16 B   (a quarter warp reads 128 contiguous B)
//
// Each lane group keeps a running (max m, sum l, acc[HG][16]). Rescaling is lazy: m only
// moves when a logit exceeds it by more than 8 (log2 units), so p = 2^(s-m) <= 256 stays
// far from overflow while the rescale of acc is rare. Groups merge by shuffles at the end,
// warps through shared memory.

#define NUM_WARPS 4
#define STAGES 4
#define MAX_PARTITION 512  // launcher keeps partition <= this and a multiple of BLOCK_SIZE
#define LAZY_RESCALE 8.f

__device__ __forceinline__ uint4 ldg16(const void* p) {
  return __ldg(reinterpret_cast<const uint4*>(p));
}

__device__ __forceinline__ unsigned smem_addr(const void* p) {
  unsigned a;
  asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
  return a;
}

__device__ __forceinline__ void cp_async16(unsigned dst, const void* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(src));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// Merge scale factors for two running softmax states with maxima m and mo (log2 domain).
__device__ __forceinline__ void merge_scale(float m, float mo, float& a, float& b, float& mn) {
  mn = fmaxf(m, mo);
  a = (m == NEG_INF) ? 0.f : fast_exp2(m - mn);
  b = (mo == NEG_INF) ? 0.f : fast_exp2(mo - mn);
}

template <typename T, int HEAD_DIM, int BLOCK_SIZE, int HG>
__global__ void __launch_bounds__(NUM_WARPS * 32, 3) paged_decode_split_kernel(
    float* __restrict__ part_out, float* __restrict__ part_ml,
    const T* __restrict__ query, const T* __restrict__ k_cache, const T* __restrict__ v_cache,
    const int* __restrict__ block_tables, const int* __restrict__ seq_lens,
    i64 q_stride_seq, i64 q_stride_head, i64 cache_block_stride, i64 cache_slot_stride,
    int bt_stride, int num_heads, int group, int max_splits, int partition, float scale_log2) {
  constexpr int LANES = HEAD_DIM / 16;
  constexpr int TPW = 32 / LANES;           // tokens per warp per tile
  constexpr int STEP = NUM_WARPS * TPW;     // tokens per tile
  constexpr int THREADS = NUM_WARPS * 32;
  const int h0 = blockIdx.x * HG;
  const int seq = blockIdx.y;
  const int split = blockIdx.z;
  const int kvh = h0 / group;
  // NOTE: clamp to the table's capacity so bad seq_lens cannot read past the block table.
  const int seq_len = imin(seq_lens[seq], bt_stride * BLOCK_SIZE);
  const int start = split * partition;
  if (start >= seq_len) return;  // empty partition: pass 2 ignores it (uses seq_len too)
  const int end = imin(start + partition, seq_len);
  const int num_tiles = (end - start + STEP - 1) / STEP;

  __shared__ __align__(16) uint4 ring[STAGES][4][THREADS];
  __shared__ int s_bt[MAX_PARTITION / BLOCK_SIZE];
  __shared__ float s_m[NUM_WARPS][HG], s_l[NUM_WARPS][HG];

  const int tid = threadIdx.x;
  const int warp = tid / 32, lane = tid % 32;
  const int ltok = lane / LANES, lpart = lane % LANES;
  const int e0 = lpart * 8, e1 = HEAD_DIM / 2 + lpart * 8;

  // NOTE: the partition's block ids go to shared memory once, so each copy below depends on
  // a shared-memory read instead of a second global round trip.
  const int first_blk = start / BLOCK_SIZE;
  const int num_blk = (end - 1) / BLOCK_SIZE - first_blk + 1;
  const int* bt = block_tables + (i64)seq * bt_stride + first_blk;
  for (int i = tid; i < num_blk; i += THREADS) s_bt[i] = bt[i];
  __syncthreads();

  const T* k_head = k_cache + (i64)kvh * HEAD_DIM;
  const T* v_head = v_cache + (i64)kvh * HEAD_DIM;
  const unsigned ring0 = smem_addr(&ring[0][0][tid]);
  constexpr unsigned PIECE = THREADS * 16, STAGE_BYTES = 4 * PIECE;
  auto issue = [&](int tile) {  // copy this thread's pieces of `tile` (if any) into its stage
    const int t = start + tile * STEP + warp * TPW + ltok;
    if (tile < num_tiles && t < end) {
      const i64 off = (i64)s_bt[t / BLOCK_SIZE - first_blk] * cache_block_stride +
                      (i64)(t % BLOCK_SIZE) * cache_slot_stride;
      const unsigned dst = ring0 + (tile % STAGES) * STAGE_BYTES;
      cp_async16(dst, k_head + off + e0);
      cp_async16(dst + PIECE, k_head + off + e1);
      cp_async16(dst + 2 * PIECE, v_head + off + e0);
      cp_async16(dst + 3 * PIECE, v_head + off + e1);
    }
    cp_async_commit();  // NOTE: always commit (maybe empty) so group counting stays uniform
  };
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) issue(s);

  float q[HG][16];
#pragma unroll
  for (int g = 0; g < HG; ++g) {
    const T* qp = query + seq * q_stride_seq + (i64)(h0 + g) * q_stride_head;
    unpack8<T>(ldg16(qp + e0), q[g]);
    unpack8<T>(ldg16(qp + e1), q[g] + 8);
#pragma unroll
    for (int e = 0; e < 16; ++e) q[g][e] *= scale_log2;  // logits in log2 units
  }
  float m[HG], l[HG], acc[HG][16];
#pragma unroll
  for (int g = 0; g < HG; ++g) {
    m[g] = NEG_INF;
    l[g] = 0.f;
#pragma unroll
    for (int e = 0; e < 16; ++e) acc[g][e] = 0.f;
  }

  for (int tile = 0; tile < num_tiles; ++tile) {
    issue(tile + STAGES - 1);
    cp_async_wait<STAGES - 1>();  // this thread's copies of `tile` have landed
    const int t = start + tile * STEP + warp * TPW + ltok;
    const bool ok = t < end;
    const uint4* st = &ring[tile % STAGES][0][tid];
    float p[HG];
    {
      float kf[16];
      unpack8<T>(st[0], kf);
      unpack8<T>(st[THREADS], kf + 8);
#pragma unroll
      for (int g = 0; g < HG; ++g) {
        float d = 0.f;
#pragma unroll
        for (int e = 0; e < 16; ++e) d = fmaf(q[g][e], kf[e], d);
#pragma unroll
        for (int o = LANES / 2; o > 0; o >>= 1) d += __shfl_xor_sync(0xffffffffu, d, o);
        p[g] = 0.f;
        if (ok) {
          if (d > m[g] + LAZY_RESCALE) {  // also the first token (m = -inf)
            const float alpha = fast_exp2(m[g] - d);
            m[g] = d;
            l[g] *= alpha;
#pragma unroll
            for (int e = 0; e < 16; ++e) acc[g][e] *= alpha;
          }
          p[g] = fast_exp2(d - m[g]);
        }
      }
    }
    if (ok) {
      float vf[16];
      unpack8<T>(st[2 * THREADS], vf);
      unpack8<T>(st[3 * THREADS], vf + 8);
#pragma unroll
      for (int g = 0; g < HG; ++g) {
        l[g] += p[g];
#pragma unroll
        for (int e = 0; e < 16; ++e) acc[g][e] = fmaf(p[g], vf[e], acc[g][e]);
      }
    }
  }
  cp_async_wait<0>();
  __syncthreads();  // NOTE: the ring is reused below as the cross-warp reduction buffer

  // merge the TPW lane groups of this warp (same lpart, different tokens)
#pragma unroll
  for (int o = LANES; o < 32; o <<= 1) {
#pragma unroll
    for (int g = 0; g < HG; ++g) {
      const float mo = __shfl_xor_sync(0xffffffffu, m[g], o);
      const float lo = __shfl_xor_sync(0xffffffffu, l[g], o);
      float a, b, mn;
      merge_scale(m[g], mo, a, b, mn);
      m[g] = mn;
      l[g] = l[g] * a + lo * b;
#pragma unroll
      for (int e = 0; e < 16; ++e) {
        const float ao = __shfl_xor_sync(0xffffffffu, acc[g][e], o);
        acc[g][e] = acc[g][e] * a + ao * b;
      }
    }
  }
  float* s_acc = reinterpret_cast<float*>(&ring[0][0][0]);  // [NUM_WARPS][HG][HEAD_DIM]
  if (ltok == 0) {
#pragma unroll
    for (int g = 0; g < HG; ++g) {
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        s_acc[(warp * HG + g) * HEAD_DIM + e0 + e] = acc[g][e];
        s_acc[(warp * HG + g) * HEAD_DIM + e1 + e] = acc[g][8 + e];
      }
      if (lpart == 0) {
        s_m[warp][g] = m[g];
        s_l[warp][g] = l[g];
      }
    }
  }
  __syncthreads();
  // merge warps; write this partition's (max, sum) and unnormalised output
  for (int i = tid; i < HG * HEAD_DIM; i += THREADS) {
    const int g = i / HEAD_DIM, d = i % HEAD_DIM;
    float mx = s_m[0][g];
#pragma unroll
    for (int w = 1; w < NUM_WARPS; ++w) mx = fmaxf(mx, s_m[w][g]);
    float o = 0.f, lsum = 0.f;
#pragma unroll
    for (int w = 0; w < NUM_WARPS; ++w) {
      const float wt = (s_m[w][g] == NEG_INF) ? 0.f : fast_exp2(s_m[w][g] - mx);
      o = fmaf(s_acc[(w * HG + g) * HEAD_DIM + d], wt, o);
      lsum = fmaf(s_l[w][g], wt, lsum);
    }
    const i64 row = ((i64)seq * num_heads + h0 + g) * max_splits + split;
    part_out[row * HEAD_DIM + d] = o;
    if (d == 0) {
      part_ml[row * 2] = mx;
      part_ml[row * 2 + 1] = lsum;
    }
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
#pragma unroll 8
  for (int i = 0; i < n_splits; ++i) m = fmaxf(m, ml[2 * i]);
  float l = 0.f, acc = 0.f;
#pragma unroll 8
  for (int i = 0; i < n_splits; ++i) {
    const float w = fast_exp2(ml[2 * i] - m);
    l = fmaf(ml[2 * i + 1], w, l);
    acc = fmaf(part_out[(row * max_splits + i) * HEAD_DIM + d], w, acc);
  }
  out[row * HEAD_DIM + d] = Packed<T>::from_float(n_splits > 0 ? acc / l : 0.f);
}

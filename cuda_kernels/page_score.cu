// Quest page scores for sparse paged decode (contract: sparse_reference.page_scores).
//
//   scores[seq, kvh, p] = max_{g < group} sum_d max(q[g,d] * k_min[b,kvh,d], q[g,d] * k_max[b,kvh,d])
//   with b = block_tables[seq, p]; +inf for p == 0 and p == last page; -inf past the end.
//
// Grid (ceil(max_blocks / (SCORE_WARPS * PAGES_PER_WARP)), num_kv_heads, num_seqs),
// SCORE_WARPS warps. One warp scores one page at a time: lane l holds elements
// [l*E, l*E+E) of the group's query rows (E = HEAD_DIM / 32, registers) and of the page's
// min/max rows (one coalesced 4- or 8-byte load each), then a butterfly sum per query head.
// NOTE: reads 2 * HEAD_DIM values per page and KV head, 1/block_size of what dense attention
// reads for K alone; the kernel is bandwidth-bound like attention.

#define SCORE_WARPS 4
#define PAGES_PER_WARP 8
#define SCORE_MAX_GROUP 16

template <typename T, int HEAD_DIM>
__global__ void __launch_bounds__(SCORE_WARPS * 32) page_score_kernel(
    float* __restrict__ scores, const T* __restrict__ query, const T* __restrict__ k_min,
    const T* __restrict__ k_max, const int* __restrict__ block_tables,
    const int* __restrict__ seq_lens, i64 q_stride_seq, int bt_stride, int num_kv_heads,
    int group, int block_size) {
  constexpr int E = HEAD_DIM / 32;  // 2 (D=64) or 4 (D=128): one or two packed words
  const int kvh = blockIdx.y, seq = blockIdx.z;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int seq_len = seq_lens[seq];
  const int num_pages = imin((seq_len + block_size - 1) / block_size, bt_stride);

  float q[SCORE_MAX_GROUP][E];
  const T* qrow = query + (i64)seq * q_stride_seq + (i64)kvh * group * HEAD_DIM + lane * E;
#pragma unroll
  for (int g = 0; g < SCORE_MAX_GROUP; ++g) {
    if (g < group) {
      const unsigned* w = reinterpret_cast<const unsigned*>(qrow + g * HEAD_DIM);
#pragma unroll
      for (int j = 0; j < E / 2; ++j) Packed<T>::unpack(w[j], q[g][2 * j], q[g][2 * j + 1]);
    }
  }
  float* out = scores + ((i64)seq * num_kv_heads + kvh) * bt_stride;
  const int first = (blockIdx.x * SCORE_WARPS + warp) * PAGES_PER_WARP;
  for (int i = 0; i < PAGES_PER_WARP; ++i) {
    const int p = first + i;
    if (p >= bt_stride) break;
    if (p >= num_pages || p == 0 || p == num_pages - 1) {  // warp-uniform branch
      if (lane == 0) out[p] = p >= num_pages ? NEG_INF : __uint_as_float(0x7f800000u);
      continue;
    }
    const i64 row = ((i64)block_tables[(i64)seq * bt_stride + p] * num_kv_heads + kvh) * HEAD_DIM;
    float lo[E], hi[E];
    const unsigned* wl = reinterpret_cast<const unsigned*>(k_min + row + lane * E);
    const unsigned* wh = reinterpret_cast<const unsigned*>(k_max + row + lane * E);
#pragma unroll
    for (int j = 0; j < E / 2; ++j) {
      Packed<T>::unpack(wl[j], lo[2 * j], lo[2 * j + 1]);
      Packed<T>::unpack(wh[j], hi[2 * j], hi[2 * j + 1]);
    }
    float best = NEG_INF;
#pragma unroll
    for (int g = 0; g < SCORE_MAX_GROUP; ++g) {
      if (g < group) {
        float s = 0.f;
#pragma unroll
        for (int j = 0; j < E; ++j) s += fmaxf(q[g][j] * lo[j], q[g][j] * hi[j]);
#pragma unroll
        for (int o = 16; o > 0; o /= 2) s += __shfl_xor_sync(0xffffffffu, s, o);
        best = fmaxf(best, s);
      }
    }
    if (lane == 0) out[p] = best;
  }
}

// Variant "thread": one THREAD per page (same contract and grid axes y/z; x covers
// SCORE_THREADS pages per CTA). The group's query rows sit in shared memory (fp32; every
// lane reads the same element: broadcast), each thread streams its page's min/max rows in
// 16-byte chunks and accumulates the group's bounds in registers: no shuffles per page.
#define SCORE_THREADS 128

template <typename T, int HEAD_DIM>
__global__ void __launch_bounds__(SCORE_THREADS) page_score_thread_kernel(
    float* __restrict__ scores, const T* __restrict__ query, const T* __restrict__ k_min,
    const T* __restrict__ k_max, const int* __restrict__ block_tables,
    const int* __restrict__ seq_lens, i64 q_stride_seq, int bt_stride, int num_kv_heads,
    int group, int block_size) {
  __shared__ float s_q[SCORE_MAX_GROUP * HEAD_DIM];
  const int kvh = blockIdx.y, seq = blockIdx.z;
  const unsigned short* qh = reinterpret_cast<const unsigned short*>(
      query + (i64)seq * q_stride_seq + (i64)kvh * group * HEAD_DIM);
  for (int i = threadIdx.x; i < group * HEAD_DIM; i += SCORE_THREADS) {
    float lo_f, hi_f;
    Packed<T>::unpack((unsigned)qh[i], lo_f, hi_f);
    s_q[i] = lo_f;
  }
  __syncthreads();
  const int seq_len = seq_lens[seq];
  const int num_pages = imin((seq_len + block_size - 1) / block_size, bt_stride);
  const int p = blockIdx.x * SCORE_THREADS + threadIdx.x;
  if (p >= bt_stride) return;
  float* out = scores + ((i64)seq * num_kv_heads + kvh) * bt_stride;
  if (p >= num_pages || p == 0 || p == num_pages - 1) {
    out[p] = p >= num_pages ? NEG_INF : __uint_as_float(0x7f800000u);
    return;
  }
  const i64 row = ((i64)block_tables[(i64)seq * bt_stride + p] * num_kv_heads + kvh) * HEAD_DIM;
  const uint4* lo4 = reinterpret_cast<const uint4*>(k_min + row);
  const uint4* hi4 = reinterpret_cast<const uint4*>(k_max + row);
  float acc[SCORE_MAX_GROUP];
#pragma unroll
  for (int g = 0; g < SCORE_MAX_GROUP; ++g) acc[g] = 0.f;
#pragma unroll 4
  for (int c = 0; c < HEAD_DIM / 8; ++c) {
    float l[8], h[8];
    unpack8<T>(lo4[c], l);
    unpack8<T>(hi4[c], h);
#pragma unroll
    for (int g = 0; g < SCORE_MAX_GROUP; ++g) {
      if (g < group) {
        const float* qg = s_q + g * HEAD_DIM + c * 8;
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[g] += fmaxf(qg[e] * l[e], qg[e] * h[e]);
      }
    }
  }
  float best = NEG_INF;
#pragma unroll
  for (int g = 0; g < SCORE_MAX_GROUP; ++g)
    if (g < group) best = fmaxf(best, acc[g]);
  out[p] = best;
}

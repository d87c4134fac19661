// Top-k page selection for sparse paged decode (contract: sparse_reference.select_pages).
//
// Grid (num_seqs * num_kv_heads), SELECT_THREADS threads; one CTA per row r = seq * Hkv + h.
//   1. n = pages of the sequence. n <= k: take pages 0..n-1 (dense row).
//   2. else radix-select the k-th largest score T (4 passes of 8 bits over order-preserving
//      uint keys, warp-aggregated shared histogram), take every page with key > T and the
//      first (in page order) pages with key == T until k are taken.
//   3. ordered compaction: each warp owns a contiguous segment; per-warp counts, one
//      exchange, then ballot prefix sums write pages in ascending order.
// Outputs: page_ids [rows, k] int64 (max_blocks past the selection), virtual block_tables
// [rows, k] int32 (block * block_size * Hkv + h), seq_lens [rows] int32 (selected tokens).
// NOTE: replaces torch topk + sort + gather (~10 launches, 50-110 us on an H100 at batch 16).

#define SELECT_THREADS 256
#define SELECT_WARPS (SELECT_THREADS / 32)

__device__ __forceinline__ unsigned order_key(float f) {
  const unsigned u = __float_as_uint(f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

__global__ void __launch_bounds__(SELECT_THREADS) page_select_kernel(
    long long* __restrict__ page_ids, int* __restrict__ vtable, int* __restrict__ sel_lens,
    const float* __restrict__ scores, const int* __restrict__ block_tables,
    const int* __restrict__ seq_lens, int max_blocks, int num_kv_heads, int block_size, int k) {
  __shared__ int hist[256];
  __shared__ int s_digit, s_remaining;
  __shared__ int s_gt[SELECT_WARPS], s_eq[SELECT_WARPS];
  const int row = blockIdx.x, seq = row / num_kv_heads, h = row % num_kv_heads;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int seq_len = imin(seq_lens[seq], max_blocks * block_size);
  const int n = (seq_len + block_size - 1) / block_size;
  const float* sc = scores + (long long)row * max_blocks;
  const int* bt = block_tables + (long long)seq * max_blocks;
  long long* ids = page_ids + (long long)row * k;
  int* vt = vtable + (long long)row * k;
  const int vstride = block_size * num_kv_heads;

  unsigned thresh = 0u;  // take key > thresh, and the first `take_eq` keys == thresh
  int take_eq = 0;
  if (n > k) {
    unsigned prefix = 0u, mask = 0u;
    int remaining = k;
    for (int shift = 24; shift >= 0; shift -= 8) {
      for (int i = tid; i < 256; i += SELECT_THREADS) hist[i] = 0;
      __syncthreads();
      for (int base = 0; base < n; base += SELECT_THREADS) {
        const int i = base + tid;
        const unsigned u = i < n ? order_key(sc[i]) : 0u;
        const bool hit = i < n && (u & mask) == prefix;
        const int digit = hit ? (int)((u >> shift) & 255u) : 256 + lane;  // unique if no hit
        const unsigned peers = __match_any_sync(0xffffffffu, digit);
        if (hit && lane == __ffs(peers) - 1) atomicAdd(&hist[digit], __popc(peers));
      }
      __syncthreads();
      if (warp == 0) {  // lane l owns bins 8l..8l+7; find the bin holding the remaining-th key
        int c[8], sum = 0;
#pragma unroll
        for (int j = 0; j < 8; ++j) sum += (c[j] = hist[8 * lane + j]);
        int incl = sum;  // inclusive suffix sum over lanes >= lane (Hillis-Steele)
#pragma unroll
        for (int o = 1; o < 32; o *= 2) {
          const int v = __shfl_down_sync(0xffffffffu, incl, o);
          if (lane + o < 32) incl += v;
        }
        const int above = incl - sum;  // keys in the bins of higher lanes
        if (above < remaining && remaining <= above + sum) {
          int acc = above;
          for (int j = 7; j >= 0; --j) {
            if (remaining <= acc + c[j]) {
              s_digit = 8 * lane + j;
              s_remaining = remaining - acc;
              break;
            }
            acc += c[j];
          }
        }
      }
      __syncthreads();
      prefix |= (unsigned)s_digit << shift;
      mask |= 255u << shift;
      remaining = s_remaining;
      __syncthreads();
    }
    thresh = prefix;
    take_eq = remaining;
  }
  // ordered compaction: warp w owns pages [w*seg, (w+1)*seg)
  const int seg = (n + SELECT_WARPS - 1) / SELECT_WARPS;
  const int lo = imin(warp * seg, n), hi = imin(lo + seg, n);
  const unsigned lt = (1u << lane) - 1u;
  int gt = 0, eq = 0;
  if (n > k) {
    for (int base = lo; base < hi; base += 32) {
      const int i = base + lane;
      const unsigned u = i < hi ? order_key(sc[i]) : 0u;
      gt += __popc(__ballot_sync(0xffffffffu, i < hi && u > thresh));
      eq += __popc(__ballot_sync(0xffffffffu, i < hi && u == thresh));
    }
  } else {
    gt = hi - lo;
  }
  if (lane == 0) s_gt[warp] = gt, s_eq[warp] = eq;
  __syncthreads();
  int gt_before = 0, eq_before = 0;
  for (int w = 0; w < warp; ++w) gt_before += s_gt[w], eq_before += s_eq[w];
  int pos = gt_before + imin(eq_before, take_eq), eq_seen = eq_before;
  for (int base = lo; base < hi; base += 32) {
    const int i = base + lane;
    bool sel = i < hi;
    if (n > k) {
      const unsigned u = i < hi ? order_key(sc[i]) : 0u;
      const bool is_eq = i < hi && u == thresh;
      const unsigned eq_mask = __ballot_sync(0xffffffffu, is_eq);
      sel = i < hi && (u > thresh || (is_eq && eq_seen + __popc(eq_mask & lt) < take_eq));
      eq_seen += __popc(eq_mask);
    }
    const unsigned sel_mask = __ballot_sync(0xffffffffu, sel);
    if (sel) {
      const int at = pos + __popc(sel_mask & lt);
      ids[at] = i;
      vt[at] = bt[i] * vstride + h;
    }
    pos += __popc(sel_mask);
  }
  const int taken = n < k ? n : k;
  for (int j = taken + tid; j < k; j += SELECT_THREADS) ids[j] = max_blocks, vt[j] = h;
  if (tid == 0) sel_lens[row] = n == 0 ? 0 : taken * block_size - (n * block_size - seq_len);
}

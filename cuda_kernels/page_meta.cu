// Page metadata refresh for sparse decode (contract: sparse_reference.update_page_minmax).
//
//   k_min[b, :] = min over offsets 0..off of k_cache[b, offset, :]   (k_max likewise)
//
// for every block b written this step, where off is the HIGHEST offset written into b by
// this call. Grid (num_tokens), 128 threads. Token i does the work only if it is the last
// write into its block in this call (the next token's slot is not slot + 1 in the same
// block); it recomputes the block from the cache rows, so no atomics and no ordering
// between CTAs are needed.
// NOTE: valid because a block fills from offset 0 upward and belongs to one sequence while
// written (the pool only shares full blocks), exactly the incremental rule's precondition.
// Run after reshape_and_cache (same stream). Rows are [num_kv_heads * head_dim] elements,
// read and written as packed pairs.

template <typename T, typename IdxT>
__global__ void __launch_bounds__(128) page_minmax_kernel(
    unsigned* __restrict__ k_min, unsigned* __restrict__ k_max,
    const unsigned* __restrict__ k_cache, const IdxT* __restrict__ slot_mapping,
    int num_tokens, int row_words, int block_size) {
  const int i = blockIdx.x;
  const i64 slot = (i64)slot_mapping[i];
  if (slot < 0) return;
  const int off = (int)(slot % block_size);
  if (i + 1 < num_tokens && (i64)slot_mapping[i + 1] == slot + 1 && off != block_size - 1)
    return;  // a later token of this call writes the same block: it does the work
  const i64 blk = slot / block_size;
  const unsigned* rows = k_cache + blk * block_size * row_words;
  for (int w = threadIdx.x; w < row_words; w += 128) {
    float lo0 = __uint_as_float(0x7f800000u), lo1 = lo0, hi0 = NEG_INF, hi1 = NEG_INF;
    for (int t = 0; t <= off; ++t) {
      float a, b;
      Packed<T>::unpack(rows[(i64)t * row_words + w], a, b);
      lo0 = fminf(lo0, a), lo1 = fminf(lo1, b), hi0 = fmaxf(hi0, a), hi1 = fmaxf(hi1, b);
    }
    k_min[blk * row_words + w] =
        (unsigned)Packed<T>::from_float(lo0) | ((unsigned)Packed<T>::from_float(lo1) << 16);
    k_max[blk * row_words + w] =
        (unsigned)Packed<T>::from_float(hi0) | ((unsigned)Packed<T>::from_float(hi1) << 16);
  }
}

// KV-cache write and block copy kernels. Both are dtype-agnostic byte movers: the launcher
// picks the widest vector type V (uint4 / uint2 / unsigned int / unsigned short) that divides
// every row size, stride and base address, so fp16, bf16 and fp32 share one kernel.
//
// Cache (flash layout, contiguous):
//   [num_blocks, block_size, num_kv_heads, head_dim]  ==  [num_slots, row]   row = H*D elems
//   slot = block_id * block_size + offset

// reshape_and_cache: grid = num_tokens, block = 128 threads.
//   key/value: [num_tokens, num_kv_heads, head_dim], rows contiguous, token stride free
//   slot_mapping[i] < 0: padding token, nothing written.
template <typename V, typename IdxT>
__global__ void reshape_and_cache_kernel(
    const V* __restrict__ key, const V* __restrict__ value,
    V* __restrict__ k_cache, V* __restrict__ v_cache,
    const IdxT* __restrict__ slot_mapping,
    i64 key_stride, i64 value_stride,  // in V units, between tokens
    int row_vecs) {                     // V units per row (= cache slot stride)
  const int token = blockIdx.x;
  const i64 slot = (i64)slot_mapping[token];
  if (slot < 0) return;
  const V* k_src = key + (i64)token * key_stride;
  const V* v_src = value + (i64)token * value_stride;
  V* k_dst = k_cache + slot * row_vecs;
  V* v_dst = v_cache + slot * row_vecs;
  for (int i = threadIdx.x; i < row_vecs; i += blockDim.x) {
    const V k = k_src[i];
    const V v = v_src[i];
    k_dst[i] = k;
    v_dst[i] = v;
  }
}

// copy_blocks: grid = (num_pairs, num_caches), block = 256 threads.
//   dst_bases[c][dst_ids[p]] = src_bases[c][src_ids[p]]   (a block = block_vecs V units)
// NOTE: pairs in one launch run in parallel; the launcher guarantees no pair reads a block
// that another pair of the same launch writes (overlapping moves go through a scratch).
template <typename V>
__global__ void copy_blocks_kernel(
    const unsigned long long* __restrict__ src_bases,
    const unsigned long long* __restrict__ dst_bases,
    const i64* __restrict__ src_ids, const i64* __restrict__ dst_ids,
    i64 block_vecs) {
  const int pair = blockIdx.x;
  const int cache = blockIdx.y;
  const V* src = reinterpret_cast<const V*>(src_bases[cache]) + src_ids[pair] * block_vecs;
  V* dst = reinterpret_cast<V*>(dst_bases[cache]) + dst_ids[pair] * block_vecs;
  const i64 stride = blockDim.x;
  i64 i = threadIdx.x;
  // NOTE: four independent loads in flight per thread before the stores.
  for (; i + 3 * stride < block_vecs; i += 4 * stride) {
    const V a = src[i], b = src[i + stride], c = src[i + 2 * stride], d = src[i + 3 * stride];
    dst[i] = a;
    dst[i + stride] = b;
    dst[i + 2 * stride] = c;
    dst[i + 3 * stride] = d;
  }
  for (; i < block_vecs; i += stride) dst[i] = src[i];
}

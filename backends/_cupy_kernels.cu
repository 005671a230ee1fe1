// CUDA kernels of the cupy backend, compiled by CuPy (NVRTC) once per storage kind and head_dim.
//
// Compile-time defines: KIND (0 float32, 1 float16 bits, 2 q8_0), HEAD_DIM, ROWS (query rows
// per attention block). No CUDA headers are included: half conversions are PTX instructions.
//
// store_kv      K rotated (RoPE) and V written into the cache layout, one pass (float32, float16).
// store_q8      the same for q8_0 (ggml's blocks of 32 int8 values and a half scale).
// attend_split  flash-decoding: each block reads one split of the keys of one KV head once and
//               leaves a partial softmax state (max, sum, weighted V) per query row; the last
//               block to finish merges the splits by log-sum-exp into (n_q, n_heads, head_dim).
// read_sum      a streaming read (the bandwidth probe's read figure).

#define WARPS 4
#define TILE 32
#define FULL_MASK 0xffffffffu
#define PAIRS ((HEAD_DIM / 2 + 31) / 32)
#define GROUP 8  // keys whose V loads are issued together (16 and 32 measured no faster on an H100)
#define MAX_SPLITS 128
#define NEG_INF __int_as_float(0xff800000)

typedef long long index_t;

#if KIND == 0
typedef float store_t;
#elif KIND == 1
typedef unsigned short store_t;
#else
typedef signed char store_t;
#endif

__device__ __forceinline__ float half_to_float(unsigned short h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

__device__ __forceinline__ unsigned short float_to_half(float f) {
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

__device__ __forceinline__ store_t encode(float x) {
#if KIND == 1
    return float_to_half(x);
#else
    return (store_t)x;  // float32 only: store_kv is not used for q8_0
#endif
}

// x rotated at element j of a row: x*cos + partner*(-+sin), each product rounded, then the sum
// (no fused multiply-add), as the NumPy kernels compute it, so that stored bytes agree.
__device__ __forceinline__ float rope_element(const float* x, int j, const float* c, const float* s,
                                              int half, int gptj) {
    int pair, partner;
    float signed_sin;
    if (gptj) {
        pair = j >> 1;
        partner = j ^ 1;
        signed_sin = (j & 1) ? s[pair] : -s[pair];
    } else if (j < half) {
        pair = j;
        partner = j + half;
        signed_sin = -s[pair];
    } else {
        pair = j - half;
        partner = j - half;
        signed_sin = s[pair];
    }
    return __fadd_rn(__fmul_rn(x[j], c[pair]), __fmul_rn(x[partner], signed_sin));
}

// k, v: (n, heads, HEAD_DIM) float32. cos_rows, sin_rows: (rows, half), position start+i at row
// rope_row+i. k_out, v_out: one layer's storage (heads, positions, HEAD_DIM); rows start ..
// start+n-1 are written. Block (32, 8): a warp per row of one position and head; blockIdx.y
// picks K (rotated) or V.
extern "C" __global__ void store_kv(const float* __restrict__ k, const float* __restrict__ v,
                                    const float* __restrict__ cos_rows, const float* __restrict__ sin_rows,
                                    store_t* __restrict__ k_out, store_t* __restrict__ v_out,
                                    int n, int heads, int half, int positions, int start, int rope_row, int gptj) {
    const int is_k = blockIdx.y == 0;
    const float* src = is_k ? k : v;
    store_t* dst = is_k ? k_out : v_out;
    const int rotary = is_k ? 2 * half : 0;
    const int rows = n * heads;
    for (int r = blockIdx.x * blockDim.y + threadIdx.y; r < rows; r += gridDim.x * blockDim.y) {
        const int i = r / heads, h = r - i * heads;
        const float* x = src + (index_t)r * HEAD_DIM;
        const float* c = cos_rows + (index_t)(rope_row + i) * half;
        const float* s = sin_rows + (index_t)(rope_row + i) * half;
        store_t* out = dst + ((index_t)h * positions + start + i) * HEAD_DIM;
        for (int j = threadIdx.x; j < HEAD_DIM; j += 32) {
            const float y = j < rotary ? rope_element(x, j, c, s, half, gptj) : x[j];
            out[j] = encode(y);
        }
    }
}

// ggml's q8_0 of K (rotated) and V, as store_kv lays them out: a warp per row, whose lanes hold
// the 32 values of one block at a time. d = amax/127 and q = round half away from zero of x/d
// are computed in float64 like the reference quantizer; d is rounded to half once (through
// float32 rounded to odd, which cannot double-round). scale rows: (heads, positions, HEAD_DIM/32).
__device__ __forceinline__ unsigned short double_to_half(double x) {
    float f = __double2float_rz(x);
    if ((double)f != x) f = __int_as_float(__float_as_int(f) | 1);
    return float_to_half(f);
}

extern "C" __global__ void store_q8(const float* __restrict__ k, const float* __restrict__ v,
                                    const float* __restrict__ cos_rows, const float* __restrict__ sin_rows,
                                    signed char* __restrict__ k_out, signed char* __restrict__ v_out,
                                    unsigned short* __restrict__ k_scale, unsigned short* __restrict__ v_scale,
                                    int n, int heads, int half, int positions, int start, int rope_row, int gptj) {
    const int is_k = blockIdx.y == 0;
    const float* src = is_k ? k : v;
    signed char* dst = is_k ? k_out : v_out;
    unsigned short* scales = is_k ? k_scale : v_scale;
    const int rotary = is_k ? 2 * half : 0;
    const int rows = n * heads, lane = threadIdx.x;
    for (int r = blockIdx.x * blockDim.y + threadIdx.y; r < rows; r += gridDim.x * blockDim.y) {
        const int i = r / heads, h = r - i * heads;
        const float* x = src + (index_t)r * HEAD_DIM;
        const float* c = cos_rows + (index_t)(rope_row + i) * half;
        const float* s = sin_rows + (index_t)(rope_row + i) * half;
        const index_t slot = (index_t)h * positions + start + i;
        for (int j0 = 0; j0 < HEAD_DIM; j0 += 32) {
            const int j = j0 + lane;
            const float y = j < rotary ? rope_element(x, j, c, s, half, gptj) : x[j];
            float amax = fabsf(y);
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(FULL_MASK, amax, o));
            const double scale = (double)amax / 127.0;
            const double scaled = (double)y * (1.0 / fmax(scale, 2.2250738585072014e-308));
            dst[slot * HEAD_DIM + j] = (signed char)trunc(scaled + copysign(0.5, scaled));
            if (lane == 0) scales[slot * (HEAD_DIM / 32) + j0 / 32] = double_to_half(scale);
        }
    }
}

// --- attention ---------------------------------------------------------------------------

// scores[r] = q_rows[r] . K row (one key, whole row read by this thread in 16-byte loads).
__device__ __forceinline__ void key_scores(const store_t* __restrict__ krow, const unsigned short* __restrict__ kscale,
                                           const float* q_rows, float* scores) {
#pragma unroll
    for (int r = 0; r < ROWS; ++r) scores[r] = 0.f;
#if KIND == 0
    const float4* p = (const float4*)krow;
#pragma unroll 8
    for (int c = 0; c < HEAD_DIM / 4; ++c) {
        const float4 x = __ldg(p + c);
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
            const float4 q = *(const float4*)(q_rows + r * HEAD_DIM + 4 * c);  // one 16-byte shared load
            scores[r] += q.x * x.x + q.y * x.y + q.z * x.z + q.w * x.w;
        }
    }
#elif KIND == 1
    const uint4* p = (const uint4*)krow;
#pragma unroll
    for (int c = 0; c < HEAD_DIM / 8; ++c) {
        const uint4 w = __ldg(p + c);
        const unsigned int words[4] = {w.x, w.y, w.z, w.w};
        float x[8];
#pragma unroll
        for (int b = 0; b < 4; ++b) {
            x[2 * b] = half_to_float((unsigned short)(words[b] & 0xffffu));
            x[2 * b + 1] = half_to_float((unsigned short)(words[b] >> 16));
        }
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
            const float4* q4 = (const float4*)(q_rows + r * HEAD_DIM + 8 * c);
            const float4 a = q4[0], b = q4[1];
            scores[r] += a.x * x[0] + a.y * x[1] + a.z * x[2] + a.w * x[3] + b.x * x[4] + b.y * x[5] + b.z * x[6] +
                         b.w * x[7];
        }
    }
#else
    const int4* p = (const int4*)krow;
#pragma unroll 2
    for (int c = 0; c < HEAD_DIM / 16; ++c) {
        const int4 w = __ldg(p + c);
        const int words[4] = {w.x, w.y, w.z, w.w};
        const float scale = half_to_float(__ldg(kscale + c / 2));
        float x[16];
#pragma unroll
        for (int b = 0; b < 16; ++b) x[b] = (float)(signed char)(words[b / 4] >> (8 * (b % 4))) * scale;
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
            const float4* q4 = (const float4*)(q_rows + r * HEAD_DIM + 16 * c);
            float sum = scores[r];
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const float4 a = q4[e];
                sum += a.x * x[4 * e] + a.y * x[4 * e + 1] + a.z * x[4 * e + 2] + a.w * x[4 * e + 3];
            }
            scores[r] = sum;
        }
    }
#endif
}

// V values 2*pair and 2*pair+1 of one row.
__device__ __forceinline__ float2 value_pair(const store_t* __restrict__ vrow, const unsigned short* __restrict__ vscale,
                                             int pair) {
#if KIND == 0
    return __ldg((const float2*)vrow + pair);
#elif KIND == 1
    const unsigned int w = __ldg((const unsigned int*)vrow + pair);
    return make_float2(half_to_float((unsigned short)(w & 0xffffu)), half_to_float((unsigned short)(w >> 16)));
#else
    const short w = __ldg((const short*)vrow + pair);
    const float scale = half_to_float(__ldg(vscale + (2 * pair) / 32));
    return make_float2((float)(signed char)(w & 0xff) * scale, (float)(signed char)(w >> 8) * scale);
#endif
}

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(FULL_MASK, x, o));
    return x;
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(FULL_MASK, x, o);
    return x;
}

// Grid (splits, n_kv, row tiles), block 32*WARPS. Query row r (0 <= r < n_rows = n_q*group) is
// query r / group of head kv*group + r % group, at position first + r / group. Keys lo .. hi-1
// are split in runs of split_len; block x reads run x of KV head y for rows ROWS*z ... Each warp
// takes tiles of 32 keys: scores with a key per lane, the tile's softmax, then V with the
// lanes over head_dim. The warps' states are merged in shared memory into one partial per block.
// q: (n_q, n_heads, HEAD_DIM) pre-RoPE float32; cos_rows, sin_rows: rows of positions from
// first - rope_row on. part_acc (n_kv, splits, n_rows, HEAD_DIM), part_max and part_sum
// (n_kv, splits, n_rows); done: a zeroed counter per (KV head, row tile); out (n_q, n_heads, HEAD_DIM).
extern "C" __global__ void __launch_bounds__(32 * WARPS)
attend_split(const store_t* __restrict__ k, const store_t* __restrict__ v,
             const unsigned short* __restrict__ k_scale, const unsigned short* __restrict__ v_scale,
             const float* __restrict__ q, const float* __restrict__ cos_rows, const float* __restrict__ sin_rows,
             float* __restrict__ part_acc, float* __restrict__ part_max, float* __restrict__ part_sum,
             unsigned int* __restrict__ done, float* __restrict__ out,
             int positions, int half, int rope_row, int gptj, int n_heads, int group, int n_rows, int first,
             int lo, int hi, int split_len, int window, float scale, float softcap) {
    __shared__ __align__(16) float q_rows[ROWS * HEAD_DIM];
    __shared__ float merge_max[WARPS][ROWS];
    __shared__ float merge_sum[WARPS][ROWS];
    __shared__ float merge_acc[WARPS][ROWS][HEAD_DIM];

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int kv = blockIdx.y, split = blockIdx.x, splits = gridDim.x;
    const int row0 = blockIdx.z * ROWS;
    const index_t head_offset = (index_t)kv * positions;
    const int scale_row = HEAD_DIM / 32;  // q8_0 scales per row

    // The block's query rows, rotated at their positions and scaled; rows past n_rows are 0.
    for (int e = threadIdx.x; e < ROWS * HEAD_DIM; e += blockDim.x) {
        const int r = e / HEAD_DIM, j = e - r * HEAD_DIM, row = row0 + r;
        float value = 0.f;
        if (row < n_rows) {
            const int i = row / group, head = kv * group + row % group;
            const float* x = q + ((index_t)i * n_heads + head) * HEAD_DIM;
            const index_t at = (index_t)(rope_row + i) * half;
            value = j < 2 * half ? rope_element(x, j, cos_rows + at, sin_rows + at, half, gptj) : x[j];
            value *= scale;
        }
        q_rows[e] = value;
    }
    __syncthreads();

    int row_pos[ROWS];
#pragma unroll
    for (int r = 0; r < ROWS; ++r) row_pos[r] = row0 + r < n_rows ? first + (row0 + r) / group : -1;

    float run_max[ROWS], run_sum[ROWS], acc[ROWS][PAIRS][2];
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
        run_max[r] = NEG_INF;
        run_sum[r] = 0.f;
#pragma unroll
        for (int u = 0; u < PAIRS; ++u) acc[r][u][0] = acc[r][u][1] = 0.f;
    }

    const int s0 = lo + split * split_len;
    const int s1 = min(s0 + split_len, hi);
    for (int base = s0 + warp * TILE; base < s1; base += WARPS * TILE) {
        const int t = base + lane;
        float p[ROWS];
        if (t < s1) {
            key_scores(k + (head_offset + t) * HEAD_DIM, k_scale + (head_offset + t) * scale_row, q_rows, p);
        }
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
            const bool visible = t < s1 && t <= row_pos[r] && (window == 0 || t > row_pos[r] - window);
            float x = p[r];
            if (softcap > 0.f) x = softcap * tanhf(x / softcap);
            x = visible ? x : NEG_INF;
            const float new_max = fmaxf(run_max[r], warp_max(x));
            if (new_max == NEG_INF) {  // no key of this tile or before is visible to the row
                p[r] = 0.f;
                continue;
            }
            const float rescale = expf(run_max[r] - new_max);  // exp(-inf) = 0 for a first key
            p[r] = expf(x - new_max);
            run_sum[r] = run_sum[r] * rescale + warp_sum(p[r]);
            run_max[r] = new_max;
#pragma unroll
            for (int u = 0; u < PAIRS; ++u) {
                acc[r][u][0] *= rescale;
                acc[r][u][1] *= rescale;
            }
        }
        // V with the lanes over head_dim, a group of keys' values loaded before any is used so
        // that their loads are in flight together (latency, not bandwidth, bounds one at a time).
        const int keys = min(TILE, s1 - base);
#pragma unroll
        for (int key0 = 0; key0 < TILE; key0 += GROUP) {
            if (key0 >= keys) break;
            float2 values[GROUP][PAIRS];
#pragma unroll
            for (int g = 0; g < GROUP; ++g) {
                const index_t row = head_offset + base + key0 + g;
#pragma unroll
                for (int u = 0; u < PAIRS; ++u) {
                    const int pair = lane + 32 * u;
                    values[g][u] = key0 + g < keys && pair < HEAD_DIM / 2
                                       ? value_pair(v + row * HEAD_DIM, v_scale + row * scale_row, pair)
                                       : make_float2(0.f, 0.f);
                }
            }
#pragma unroll
            for (int g = 0; g < GROUP; ++g) {
#pragma unroll
                for (int r = 0; r < ROWS; ++r) {
                    const float weight = __shfl_sync(FULL_MASK, p[r], key0 + g);
#pragma unroll
                    for (int u = 0; u < PAIRS; ++u) {
                        acc[r][u][0] += weight * values[g][u].x;
                        acc[r][u][1] += weight * values[g][u].y;
                    }
                }
            }
        }
    }

    // Merge the warps' states: max, rescaled sums and accumulators.
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
        if (lane == 0) {
            merge_max[warp][r] = run_max[r];
            merge_sum[warp][r] = run_sum[r];
        }
#pragma unroll
        for (int u = 0; u < PAIRS; ++u) {
            const int pair = lane + 32 * u;
            if (pair < HEAD_DIM / 2) {
                merge_acc[warp][r][2 * pair] = acc[r][u][0];
                merge_acc[warp][r][2 * pair + 1] = acc[r][u][1];
            }
        }
    }
    __syncthreads();
    for (int e = threadIdx.x; e < ROWS * HEAD_DIM; e += blockDim.x) {
        const int r = e / HEAD_DIM, j = e - r * HEAD_DIM, row = row0 + r;
        if (row >= n_rows) continue;
        float m = NEG_INF;
#pragma unroll
        for (int w = 0; w < WARPS; ++w) m = fmaxf(m, merge_max[w][r]);
        float sum = 0.f, value = 0.f;
        if (m != NEG_INF) {
#pragma unroll
            for (int w = 0; w < WARPS; ++w) {
                const float factor = expf(merge_max[w][r] - m);
                sum += factor * merge_sum[w][r];
                value += factor * merge_acc[w][r][j];
            }
        }
        const index_t out_row = ((index_t)kv * splits + split) * n_rows + row;
        part_acc[out_row * HEAD_DIM + j] = value;
        if (j == 0) {
            part_max[out_row] = m;
            part_sum[out_row] = sum;
        }
    }

    // The last block of this KV head and row tile to finish merges every split (one launch, not
    // two): its partials are visible after the fence, and the counter is reset for the next call.
    __shared__ bool last;
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) {
        unsigned int* counter = done + blockIdx.y * gridDim.z + blockIdx.z;
        last = atomicAdd(counter, 1u) == (unsigned int)(splits - 1);
        if (last) *counter = 0u;
    }
    __syncthreads();
    if (!last) return;
    __threadfence();
    // Each warp weighs the splits of some rows: weight_s = exp(max_s - max), total = sum weight_s * sum_s.
    __shared__ float split_weight[ROWS][MAX_SPLITS];
    __shared__ float row_total[ROWS];
    for (int r = warp; r < ROWS; r += WARPS) {
        const int row = row0 + r;
        if (row >= n_rows) continue;
        const index_t first_split = (index_t)kv * splits * n_rows + row;  // split s at first_split + s*n_rows
        float m = NEG_INF;
        for (int s = lane; s < splits; s += 32) m = fmaxf(m, __ldcg(part_max + first_split + (index_t)s * n_rows));
        m = warp_max(m);
        float total = 0.f;
        for (int s = lane; s < splits; s += 32) {
            const index_t at = first_split + (index_t)s * n_rows;
            const float split_max = __ldcg(part_max + at);
            const float weight = split_max == NEG_INF ? 0.f : expf(split_max - m);
            split_weight[r][s] = weight;
            total += weight * __ldcg(part_sum + at);
        }
        total = warp_sum(total);
        if (lane == 0) row_total[r] = total;
    }
    __syncthreads();
    for (int e = threadIdx.x; e < ROWS * HEAD_DIM; e += blockDim.x) {
        const int r = e / HEAD_DIM, j = e - r * HEAD_DIM, row = row0 + r;
        if (row >= n_rows) continue;
        const index_t first_split = (index_t)kv * splits * n_rows + row;
        float value = 0.f;
#pragma unroll 16
        for (int s = 0; s < splits; ++s) {
            value += split_weight[r][s] * __ldcg(part_acc + (first_split + (index_t)s * n_rows) * HEAD_DIM + j);
        }
        const int i = row / group, head = kv * group + row % group;
        out[((index_t)i * n_heads + head) * HEAD_DIM + j] = value / row_total[r];
    }
}

// Streams n float4 once; one partial sum per block keeps the loads from being optimised away.
extern "C" __global__ void read_sum(const float4* __restrict__ x, long long n, float* __restrict__ partial) {
    float sum = 0.f;
#pragma unroll 4
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        const float4 a = __ldg(x + i);
        sum += (a.x + a.y) + (a.z + a.w);
    }
    sum = warp_sum(sum);
    if ((threadIdx.x & 31) == 0) atomicAdd(partial + blockIdx.x, sum);
}

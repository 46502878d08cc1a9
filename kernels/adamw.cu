// adamw.cu: a multi-tensor AdamW step, one launch for every parameter of the model (the fused path of
// optim.py's AdamW; tinygrad_llm.gpu.adamw.adamw_step).
//
// adamw_multi_tensor, for tensor i and element j, with the step's four values read from device memory,
// values = [grad_scale, lr, step_size, inv_sqrt_bias2] (so a captured training step can decide them on the
// device: the clipping factor, the learning rate of the step), and g = grad · grad_scale:
//     p ← p · (1 − lr · wd_i)                          (decoupled weight decay)
//     m ← β₁ m + (1 − β₁) g;   v ← β₂ v + (1 − β₂) g²
//     p ← p − step_size · m / (√v · inv_sqrt_bias2 + eps)
// with step_size = lr / (1 − β₁ᵗ) and inv_sqrt_bias2 = 1 / √(1 − β₂ᵗ): PyTorch's AdamW, and the NumPy
// AdamW it must match. A grad_scale that is not finite means "skip this update": nothing is written.
// Params, moments and grads are float32 (the fp32 master copy).
//
// Shapes:  pointer tables (one uint64 per tensor): params, grads, exp_avgs, exp_avg_sqs; sizes (int64);
//          weight_decays (float32); block_tensor (int32) and block_start (int64): which tensor and which
//          first element each block handles; values (float32, 4).
// Launch:  grid (number of chunks,), blockDim 256; a chunk is CHUNK = 4096 consecutive elements of one
//          tensor; threads take 16-byte packs of 4 elements in turn (coalesced) when the tensor's four
//          buffers are 16-byte aligned, single elements otherwise (and for a chunk's tail).
#include "common.cuh"

#define CHUNK 4096

__device__ __forceinline__ void adamw_element(float& p, float g, float& m, float& v, float scale, float decay,
                                              float beta1, float beta2, float eps, float step_size,
                                              float inv_sqrt_bias2) {
    const float grad = g * scale;
    m = beta1 * m + (1.0f - beta1) * grad;
    v = beta2 * v + (1.0f - beta2) * grad * grad;
    p = p * decay - step_size * m / (sqrtf(v) * inv_sqrt_bias2 + eps);
}

extern "C" __global__ void __launch_bounds__(256)
adamw_multi_tensor(const unsigned long long* params, const unsigned long long* grads,
                   const unsigned long long* exp_avgs, const unsigned long long* exp_avg_sqs,
                   const int64* sizes, const int* block_tensor, const int64* block_start,
                   const float* weight_decays, const float* values, float beta1, float beta2, float eps) {
    const float scale = values[0];
    if (!isfinite(scale)) return;                            // the step was skipped
    const float lr = values[1], step_size = values[2], inv_sqrt_bias2 = values[3];
    const int tensor = block_tensor[blockIdx.x];
    const int64 start = block_start[blockIdx.x];
    const int64 end = min(start + (int64)CHUNK, sizes[tensor]);
    float* p = reinterpret_cast<float*>(params[tensor]);
    const float* g = reinterpret_cast<const float*>(grads[tensor]);
    float* m = reinterpret_cast<float*>(exp_avgs[tensor]);
    float* v = reinterpret_cast<float*>(exp_avg_sqs[tensor]);
    const float decay = 1.0f - lr * weight_decays[tensor];
    int64 j = start;
    if (((params[tensor] | grads[tensor] | exp_avgs[tensor] | exp_avg_sqs[tensor]) & 15) == 0) {
        // 16-byte packs of 4 elements (start is a multiple of CHUNK, so packs stay aligned)
        const int64 packs = (end - start) / 4;
#pragma unroll 2
        for (int64 k = threadIdx.x; k < packs; k += blockDim.x) {
            const int64 at = start + 4 * k;
            float4 pp = *reinterpret_cast<float4*>(p + at);
            const float4 gg = __ldcs(reinterpret_cast<const float4*>(g + at));
            float4 mm = *reinterpret_cast<float4*>(m + at);
            float4 vv = *reinterpret_cast<float4*>(v + at);
            adamw_element(pp.x, gg.x, mm.x, vv.x, scale, decay, beta1, beta2, eps, step_size, inv_sqrt_bias2);
            adamw_element(pp.y, gg.y, mm.y, vv.y, scale, decay, beta1, beta2, eps, step_size, inv_sqrt_bias2);
            adamw_element(pp.z, gg.z, mm.z, vv.z, scale, decay, beta1, beta2, eps, step_size, inv_sqrt_bias2);
            adamw_element(pp.w, gg.w, mm.w, vv.w, scale, decay, beta1, beta2, eps, step_size, inv_sqrt_bias2);
            *reinterpret_cast<float4*>(p + at) = pp;
            *reinterpret_cast<float4*>(m + at) = mm;
            *reinterpret_cast<float4*>(v + at) = vv;
        }
        j = start + 4 * packs;
    }
    for (j += threadIdx.x; j < end; j += blockDim.x)        // the tail, or everything when unaligned
        adamw_element(p[j], g[j], m[j], v[j], scale, decay, beta1, beta2, eps, step_size, inv_sqrt_bias2);
}

// square_sums: block b adds up g² over its chunk of the same chunk table as adamw_multi_tensor (the
// global gradient norm's sum, without a host sync), one float32 partial sum a block; the caller adds the
// partials. Launch: grid (number of chunks,), blockDim 256.
extern "C" __global__ void __launch_bounds__(256)
square_sums(const unsigned long long* arrays, const int64* sizes, const int* block_tensor, const int64* block_start,
            float* partials) {
    const int tensor = block_tensor[blockIdx.x];
    const int64 start = block_start[blockIdx.x];
    const int64 end = min(start + (int64)CHUNK, sizes[tensor]);
    const float* g = reinterpret_cast<const float*>(arrays[tensor]);
    float sum = 0.0f;
    for (int64 j = start + threadIdx.x; j < end; j += blockDim.x) sum += g[j] * g[j];
    __shared__ float warp_sums[8];
    for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
    if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = sum;
    __syncthreads();
    if (threadIdx.x == 0) {
        float total = 0.0f;
        for (int w = 0; w < 8; ++w) total += warp_sums[w];
        partials[blockIdx.x] = total;
    }
}

// sum_partials: one block adds up `count` float32 partial sums (square_sums' output) into total[0].
// Launch: grid (1,), blockDim 256.
extern "C" __global__ void __launch_bounds__(256)
sum_partials(const float* partials, int count, float* total) {
    __shared__ float scratch[32];
    float sum = 0.0f;
    for (int j = threadIdx.x; j < count; j += blockDim.x) sum += partials[j];
    sum = block_sum(sum, scratch);
    if (threadIdx.x == 0) total[0] = sum;
}

// accumulate_loss: acc[0] = (first ? 0 : acc[0]) + loss[0] · share, the step's loss summed over its
// micro-batches, each weighted by its share of the target tokens. Launch: grid (1,), blockDim 1.
extern "C" __global__ void accumulate_loss(float* acc, const float* loss, float share, int first) {
    acc[0] = (first ? 0.0f : acc[0]) + loss[0] * share;
}

// step_decision: the end of a training step on the device. From the loss and Σ g²:
//     norm = √(Σ g²);  finite = loss and norm are finite
//     values[0] = finite ? (clip > 0 ? min(1, clip / (norm + 1e-6)) : 1) : NaN    (AdamW's grad_scale:
//                 the clipping factor, or NaN, which makes adamw_multi_tensor skip the update)
//     report = [loss, norm, finite ? 1 : 0]                                       (read by the host)
// Launch: grid (1,), blockDim 1.
extern "C" __global__ void step_decision(const float* loss, const float* square_sum, float clip, float* values,
                                         float* report) {
    const float norm = sqrtf(square_sum[0]);
    const bool finite = isfinite(loss[0]) && isfinite(norm);
    const float scale = clip > 0.0f ? fminf(1.0f, clip / (norm + 1e-6f)) : 1.0f;
    values[0] = finite ? scale : __int_as_float(0x7fc00000);
    report[0] = loss[0];
    report[1] = norm;
    report[2] = finite ? 1.0f : 0.0f;
}

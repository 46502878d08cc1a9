// adamw.cu: a multi-tensor AdamW step and a multi-tensor sum of squares, each one launch for every
// parameter of the model (the fused path of optim.py's AdamW; gpu.adamw_step / gpu.sum_of_squares).
//
// adamw_multi_tensor, for tensor i and element j, with g = grad · grad_scale[0] (a device scalar: a
// clipping factor or 1/loss_scale, read on the device so the host never waits):
//     p ← p · (1 − lr · wd_i)                          (decoupled weight decay)
//     m ← β₁ m + (1 − β₁) g;   v ← β₂ v + (1 − β₂) g²
//     p ← p − step_size · m / (√v · inv_sqrt_bias2 + eps)
// with step_size = lr / (1 − β₁ᵗ) and inv_sqrt_bias2 = 1 / √(1 − β₂ᵗ): PyTorch's AdamW, and the NumPy
// AdamW it must match. Params, moments and grads are float32 (the fp32 master copy).
//
// sum_of_squares_multi_tensor: partial[b] = Σ over block b's chunk of grad² (float32); the caller sums
// the partials (fixed order) for the global gradient norm used by clipping.
//
// Shapes:  pointer tables (one uint64 per tensor): params, grads, exp_avgs, exp_avg_sqs; sizes (int64);
//          weight_decays (float32); block_tensor (int32) and block_start (int64): which tensor and which
//          first element each block handles.
// Launch:  grid (number of chunks,), blockDim 256; a chunk is CHUNK = 4096 consecutive elements of one
//          tensor, thread k handles elements start + k, start + k + 256, ... (coalesced).
#include "common.cuh"

#define CHUNK 4096

extern "C" __global__ void __launch_bounds__(256)
adamw_multi_tensor(const unsigned long long* params, const unsigned long long* grads,
                   const unsigned long long* exp_avgs, const unsigned long long* exp_avg_sqs,
                   const int64* sizes, const int* block_tensor, const int64* block_start,
                   const float* weight_decays, const float* grad_scale, float lr, float beta1, float beta2,
                   float eps, float step_size, float inv_sqrt_bias2) {
    const int tensor = block_tensor[blockIdx.x];
    const int64 start = block_start[blockIdx.x];
    const int64 end = min(start + (int64)CHUNK, sizes[tensor]);
    float* p = reinterpret_cast<float*>(params[tensor]);
    const float* g = reinterpret_cast<const float*>(grads[tensor]);
    float* m = reinterpret_cast<float*>(exp_avgs[tensor]);
    float* v = reinterpret_cast<float*>(exp_avg_sqs[tensor]);
    const float scale = grad_scale[0];
    const float decay = 1.0f - lr * weight_decays[tensor];
#pragma unroll 4
    for (int64 j = start + threadIdx.x; j < end; j += blockDim.x) {
        const float grad = g[j] * scale;
        const float m_new = beta1 * m[j] + (1.0f - beta1) * grad;
        const float v_new = beta2 * v[j] + (1.0f - beta2) * grad * grad;
        m[j] = m_new;
        v[j] = v_new;
        p[j] = p[j] * decay - step_size * m_new / (sqrtf(v_new) * inv_sqrt_bias2 + eps);
    }
}

extern "C" __global__ void __launch_bounds__(256)
sum_of_squares_multi_tensor(const unsigned long long* grads, const int64* sizes, const int* block_tensor,
                            const int64* block_start, float* partial) {
    __shared__ float scratch[32];
    const int tensor = block_tensor[blockIdx.x];
    const int64 start = block_start[blockIdx.x];
    const int64 end = min(start + (int64)CHUNK, sizes[tensor]);
    const float* g = reinterpret_cast<const float*>(grads[tensor]);
    float total = 0.0f;
#pragma unroll 4
    for (int64 j = start + threadIdx.x; j < end; j += blockDim.x) total = fmaf(g[j], g[j], total);
    total = block_sum(total, scratch);
    if (threadIdx.x == 0) partial[blockIdx.x] = total;
}

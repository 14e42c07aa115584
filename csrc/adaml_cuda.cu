// The CUDA kernel of adaml_kernels::fused_step_: one launch per bucket, one block per chunk of
// the bucket's pointer table (the same table the Triton kernel reads).
//
// The loss, the step counts, the learning-rate tensor, the grad scale and the take/skip flag are
// read from device memory, so a step needs no host synchronisation and can be captured in a
// CUDA graph. Offsets are 64-bit. Full chunks of tables whose addresses are all 16-byte aligned
// are moved with 16-byte vector accesses.
//
// c10 headers only: ATen/cuda/CUDAContext.h would also need the cuBLAS/cuSPARSE headers, which a
// minimal toolkit lacks.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <string>
#include <type_traits>

#include "adaml_quant8.h"
#include "adaml_update.h"

namespace adaml {
namespace {

constexpr int kThreads = 256;
constexpr int kPerThread = static_cast<int>(kChunk) / kThreads;  // a thread's contiguous elements
static_assert(kPerThread == 8, "a thread moves 8 elements: 16 bytes of 2-byte params");

struct LaunchArgs {
  const int64_t* rows;
  const int32_t* chunk_tensor;
  int64_t num_chunks;
  const float* take;
  const void* loss;
  const void* lr_tensor;   // nullptr: hyper.lr
  const void* grad_scale;  // nullptr: no grad scale
  const double* initial_loss;  // f_1; nullptr unless normalize_loss
  int loss_type, lr_type, grad_scale_type;
  int decay_mode;
  bool maximize;
  bool grad_float;           // gradients are float32 (else the params' dtype)
  bool stochastic_rounding;  // round what is stored as bf16 or 8-bit codes stochastically
  bool aligned;
  uint64_t seed;  // stochastic rounding only
  Hyper hyper;
  double* telemetry;  // kTelemetry: [num_chunks, kFigures], a row per block (chunk)
};

template <typename T> struct alignas(16) Pack {
  T v[kPerThread];
};

// The table holds plain integers, so the compiler cannot tell that they point to global memory;
// these accesses say so (ld/st.global). Grads are read-only here: the read-only path suits them.
template <typename T, bool kReadOnly = false>
__device__ __forceinline__ Pack<T> load_pack(const T* ptr) {
  Pack<T> out;
  const uint4* src = reinterpret_cast<const uint4*>(ptr);
  uint4* dst = reinterpret_cast<uint4*>(&out);
#pragma unroll
  for (int k = 0; k < static_cast<int>(sizeof(Pack<T>) / 16); ++k) {
    dst[k] = kReadOnly ? __ldg(src + k) : __ldcg(src + k);
  }
  return out;
}

template <typename T> __device__ __forceinline__ void store_pack(T* ptr, const Pack<T>& in) {
  uint4* dst = reinterpret_cast<uint4*>(ptr);
  const uint4* src = reinterpret_cast<const uint4*>(&in);
#pragma unroll
  for (int k = 0; k < static_cast<int>(sizeof(Pack<T>) / 16); ++k) __stcg(dst + k, src[k]);
}

struct TensorScalars {
  StepScalars<float> s;
  uint32_t key;  // tensor_key(): stochastic rounding only
};

// The step's scalars for the tensor of `row`, in double; run by one thread per block. Not
// inlined: one copy serves every instantiation of the kernel, which keeps compiling short.
__device__ __noinline__ TensorScalars tensor_scalars(const LaunchArgs& a, const int64_t* row) {
  const double loss = load_scalar(a.loss, a.loss_type);
  const double f1 = a.initial_loss ? *a.initial_loss : 0.0;
  const double lr = a.lr_tensor ? load_scalar(a.lr_tensor, a.lr_type) : a.hyper.lr;
  const double scale = a.grad_scale ? load_scalar(a.grad_scale, a.grad_scale_type) : 1.0;
  const float k = *reinterpret_cast<const float*>(row[kStepAddr]);
  TensorScalars out;
  out.s = step_scalars<float>(a.hyper, loss, f1, k, lr, scale);
  out.key = tensor_key(a.seed, static_cast<uint32_t>(k), static_cast<uint32_t>(row[kParamIndex]));
  return out;
}

// What every thread of a block needs of its chunk: the tensor's row, the chunk's elements
// [start, end), and the step's scalars (computed by thread 0, shared through shared memory).
struct ChunkWork {
  const int64_t* row;
  int64_t start, end;
  StepScalars<float> s;
  uint32_t key;
  uint64_t offset;  // the whole parameter's index of the tensor's element 0
  SwitchMasks<float> on;
};

__device__ __forceinline__ ChunkWork chunk_work(const LaunchArgs& a) {
  const int64_t chunk = blockIdx.x;
  ChunkWork c;
  c.row = a.rows + static_cast<int64_t>(a.chunk_tensor[chunk]) * kColumns;
  const int64_t numel = c.row[kNumel];
  c.start = (chunk - c.row[kFirstChunk]) * kChunk;
  c.end = c.start + kChunk < numel ? c.start + kChunk : numel;
  __shared__ TensorScalars shared;
  if (threadIdx.x == 0) shared = tensor_scalars(a, c.row);
  __syncthreads();
  c.s = shared.s;
  c.key = shared.key;
  c.offset = static_cast<uint64_t>(c.row[kElementOffset]);
  c.on = SwitchMasks<float>(a.decay_mode, a.maximize, a.grad_scale != nullptr);
  return c;
}

// Telemetry: a thread's figures summed over its elements.
__device__ __forceinline__ void add_figures(ElementFigures<float>& sum,
                                            const ElementFigures<float>& f) {
  sum.sgd_like += f.sgd_like;
  sum.squared_change += f.squared_change;
  sum.lost += f.lost;
  sum.saturated += f.saturated;
}

// The block's sums of its threads' figures, written by thread 0 to the chunk's row. Every thread
// of the block calls it.
__device__ __forceinline__ void write_block_figures(ElementFigures<float> f, double* telemetry) {
#pragma unroll
  for (int lane = 16; lane > 0; lane >>= 1) {
    f.sgd_like += __shfl_xor_sync(0xFFFFFFFFu, f.sgd_like, lane);
    f.squared_change += __shfl_xor_sync(0xFFFFFFFFu, f.squared_change, lane);
    f.lost += __shfl_xor_sync(0xFFFFFFFFu, f.lost, lane);
    f.saturated += __shfl_xor_sync(0xFFFFFFFFu, f.saturated, lane);
  }
  __shared__ float partial[kThreads / 32][kFigures];
  const int warp = threadIdx.x / 32;
  if ((threadIdx.x & 31) == 0) {
    partial[warp][kFigureSgdLike] = f.sgd_like;
    partial[warp][kFigureSquaredChange] = f.squared_change;
    partial[warp][kFigureLost] = f.lost;
    partial[warp][kFigureSaturated] = f.saturated;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    double* out = telemetry + static_cast<int64_t>(blockIdx.x) * kFigures;
#pragma unroll
    for (int k = 0; k < kFigures; ++k) {
      float sum = 0.0f;
      for (int w = 0; w < kThreads / 32; ++w) sum += partial[w][k];
      out[k] = static_cast<double>(sum);
    }
  }
}

// The storage types of params, moments and the master weight are compile-time (Cfg; its GT and
// kSR are unused here); the gradient dtype and stochastic rounding are warp-uniform run-time
// switches, the decay mode, maximize and the grad scale bit masks (as in the CPU kernel), which
// keeps the number of kernels (and the build) small. kTelemetry: each block also sums its
// elements' figures (SPEC.md, Telemetry) into its chunk's row of a.telemetry.
template <typename Cfg, bool kTelemetry>
__global__ void __launch_bounds__(kThreads) adaml_kernel(const LaunchArgs a) {
  using P = typename Cfg::P;
  using M = typename Cfg::M;
  // A skipped step is a step over nothing: no block reads or writes anything else.
  if (*a.take == 0.0f) return;
  const ChunkWork c = chunk_work(a);
  const int64_t* row = c.row;
  const int64_t start = c.start, end = c.end;
  const StepScalars<float> s = c.s;
  const uint32_t key = c.key;
  const uint64_t offset = c.offset;
  const SwitchMasks<float> on = c.on;
  const bool sr = a.stochastic_rounding;

  P* p = reinterpret_cast<P*>(row[kParamAddr]);
  const P* g = reinterpret_cast<const P*>(row[kGradAddr]);
  const float* g_float = reinterpret_cast<const float*>(row[kGradAddr]);
  M* m = reinterpret_cast<M*>(row[kExpAvgAddr]);
  M* w = reinterpret_cast<M*>(row[kExpAvgSqAddr]);
  float* master = reinterpret_cast<float*>(row[kMasterAddr]);
  ElementFigures<float> sum{0.0f, 0.0f, 0.0f, 0.0f};
  if (a.aligned && end - start == kChunk) {
    const int64_t i = start + static_cast<int64_t>(threadIdx.x) * kPerThread;
    Pack<P> pv;
    Pack<float> xv;
    if (Cfg::kMaster) {
      xv = load_pack(master + i);
      if constexpr (kTelemetry) pv = load_pack(p + i);  // the stored values' change
    } else {
      pv = load_pack(p + i);
    }
    float gv[kPerThread];
    if (a.grad_float) {
      const Pack<float> raw = load_pack<float, true>(g_float + i);
#pragma unroll
      for (int j = 0; j < kPerThread; ++j) gv[j] = raw.v[j];
    } else {
      const Pack<P> raw = load_pack<P, true>(g + i);
#pragma unroll
      for (int j = 0; j < kPerThread; ++j) gv[j] = Param<Cfg::PT>::load(raw.v[j]);
    }
    Pack<M> mv = load_pack(m + i);
    Pack<M> wv = load_pack(w + i);
#pragma unroll
    for (int j = 0; j < kPerThread; ++j) {
      if constexpr (kTelemetry) {
        ElementFigures<float> f;
        step_element<Cfg, kGradScaleByMask, true>(pv.v, xv.v, gv[j], mv.v, wv.v, j, key,
                                                  offset + static_cast<uint64_t>(i + j), s, on,
                                                  sr, &f);
        add_figures(sum, f);
      } else {
        step_element<Cfg>(pv.v, xv.v, gv[j], mv.v, wv.v, j, key,
                          offset + static_cast<uint64_t>(i + j), s, on, sr);
      }
    }
    store_pack(p + i, pv);
    if (Cfg::kMaster) store_pack(master + i, xv);
    store_pack(m + i, mv);
    store_pack(w + i, wv);
  } else {
    for (int64_t i = start + threadIdx.x; i < end; i += kThreads) {
      const float gi = a.grad_float ? g_float[i] : Param<Cfg::PT>::load(g[i]);
      if constexpr (kTelemetry) {
        ElementFigures<float> f;
        step_element<Cfg, kGradScaleByMask, true>(p, master, gi, m, w, i, key,
                                                  offset + static_cast<uint64_t>(i), s, on, sr,
                                                  &f);
        add_figures(sum, f);
      } else {
        step_element<Cfg>(p, master, gi, m, w, i, key, offset + static_cast<uint64_t>(i), s,
                          on, sr);
      }
    }
  }
  if constexpr (kTelemetry) write_block_figures(sum, a.telemetry);
}

// The largest of v over the 32 lanes of a warp, on every lane.
__device__ __forceinline__ uint32_t warp_max(uint32_t v) {
#pragma unroll
  for (int lane = 16; lane > 0; lane >>= 1) v = max(v, __shfl_xor_sync(0xFFFFFFFFu, v, lane));
  return v;
}

// 8-bit moments (adaml_quant8.h): each warp updates one block of kQuantBlock = 32 x kPerThread
// elements, so a block's new scale is one warp reduction of its new moments' magnitude bits
// (as the CPU kernel takes its integer maximum). The moments are decoded with the block's old
// scale, the update runs in float as in the other kernel, and the new moments are encoded with
// the new scale; the parameter is written from the unrounded ones.
static_assert(kQuantBlock == 32 * kPerThread, "a warp holds one block of 8-bit moments");

template <typename Cfg, bool kTelemetry>
__global__ void __launch_bounds__(kThreads) adaml_kernel_8bit(const LaunchArgs a) {
  using P = typename Cfg::P;
  if (*a.take == 0.0f) return;
  const ChunkWork c = chunk_work(a);
  const int64_t* row = c.row;
  const int64_t start = c.start, end = c.end;
  const StepScalars<float> s = c.s;
  const uint32_t key = c.key;
  const uint64_t offset = c.offset;
  const SwitchMasks<float> on = c.on;
  const bool sr = a.stochastic_rounding;

  P* p = reinterpret_cast<P*>(row[kParamAddr]);
  const P* g = reinterpret_cast<const P*>(row[kGradAddr]);
  const float* g_float = reinterpret_cast<const float*>(row[kGradAddr]);
  uint8_t* m = reinterpret_cast<uint8_t*>(row[kExpAvgAddr]);
  uint8_t* w = reinterpret_cast<uint8_t*>(row[kExpAvgSqAddr]);
  float* m_scales = reinterpret_cast<float*>(row[kExpAvgScaleAddr]);
  float* w_scales = reinterpret_cast<float*>(row[kExpAvgSqScaleAddr]);
  float* master = reinterpret_cast<float*>(row[kMasterAddr]);
  const int64_t block_start = start + static_cast<int64_t>(threadIdx.x / 32) * kQuantBlock;
  const bool block_live = block_start < end;  // the same on every lane of the warp
  const int64_t block = block_start / kQuantBlock;
  const int m_exp = block_live ? exponent_of_scale(m_scales[block]) : 0;
  const int w_exp = block_live ? exponent_of_scale(w_scales[block]) : 0;
  const int64_t first = start + static_cast<int64_t>(threadIdx.x) * kPerThread;
  float m_new[kPerThread], w_new[kPerThread];
  uint32_t m_random[kPerThread], w_random[kPerThread];
  uint32_t m_max = 0, w_max = 0;
  ElementFigures<float> sum{0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
  for (int j = 0; j < kPerThread; ++j) {
    const int64_t i = first + j;
    if (i >= end) break;
    float pc = Cfg::kMaster ? master[i] : Param<Cfg::PT>::load(p[i]);
    const float gi = a.grad_float ? g_float[i] : Param<Cfg::PT>::load(g[i]);
    float mc = decode8<kExpAvgMap>(m[i], m_exp);
    float wc = decode8<kExpAvgSqMap>(w[i], w_exp);
    const uint32_t bits = sr ? element_bits(key, offset + static_cast<uint64_t>(i)) : 0u;
    if constexpr (kTelemetry) {
      const P old = p[i];
      const float before = pc;
      ElementFigures<float> f;
      update_element<float, kGradScaleByMask, true>(pc, gi, mc, wc, s, on, &f);
      if (Cfg::kMaster) master[i] = pc;
      const P stored = Param<Cfg::PT>::store(pc, bits, sr);
      p[i] = stored;
      measure_store<Cfg>(f, old, stored, before, pc, wc);
      add_figures(sum, f);
    } else {
      update_element<float>(pc, gi, mc, wc, s, on);
      if (Cfg::kMaster) master[i] = pc;
      p[i] = Param<Cfg::PT>::store(pc, bits, sr);
    }
    m_new[j] = mc;
    w_new[j] = wc;
    m_random[j] = sr ? exp_avg_code_bits(bits) : 0u;
    w_random[j] = sr ? exp_avg_sq_code_bits(bits) : 0u;
    m_max = max(m_max, magnitude_bits(float_to_bits(mc)));
    w_max = max(w_max, magnitude_bits(float_to_bits(wc)));
  }
  m_max = warp_max(m_max);  // every lane takes part, live block or not
  w_max = warp_max(w_max);
  if (block_live) {  // (a dead block's warp still joins the block's telemetry sum below)
    const int m_new_exp = scale_exponent<kExpAvgMap>(m_max);
    const int w_new_exp = scale_exponent<kExpAvgSqMap>(w_max);
    if ((threadIdx.x & 31) == 0) {  // after every lane has read the old scales (the shuffles)
      m_scales[block] = scale_of(m_new_exp);
      w_scales[block] = scale_of(w_new_exp);
    }
#pragma unroll
    for (int j = 0; j < kPerThread; ++j) {
      const int64_t i = first + j;
      if (i >= end) break;
      const uint32_t mb = float_to_bits(m_new[j]), wb = float_to_bits(w_new[j]);
      m[i] = sr ? encode8_stochastic<kExpAvgMap>(mb, m_new_exp, m_random[j])
                : encode8<kExpAvgMap>(mb, m_new_exp);
      w[i] = sr ? encode8_stochastic<kExpAvgSqMap>(wb, w_new_exp, w_random[j])
                : encode8<kExpAvgSqMap>(wb, w_new_exp);
    }
  }
  if constexpr (kTelemetry) write_block_figures(sum, a.telemetry);
}

// Calls f(Config<PT, PT, MT, kMaster, false>{}) for the bucket's storage types.
template <typename F> void dispatch_storage(int pt, int mt, bool master, F&& f) {
  auto moments = [&](auto ptc, auto masterc) {
    constexpr int P = decltype(ptc)::value;
    constexpr bool X = decltype(masterc)::value;
    if (mt == kBFloat16) {
      f(Config<P, P, kBFloat16, X, false>{});
    } else if (mt == kUInt8) {
      f(Config<P, P, kUInt8, X, false>{});
    } else {
      f(Config<P, P, kFloat32, X, false>{});
    }
  };
  auto half = [&](auto ptc) {
    master ? moments(ptc, std::true_type{}) : moments(ptc, std::false_type{});
  };
  switch (pt) {
    case kFloat16: half(std::integral_constant<int, kFloat16>{}); break;
    case kBFloat16: half(std::integral_constant<int, kBFloat16>{}); break;
    default: moments(std::integral_constant<int, kFloat32>{}, std::false_type{}); break;
  }
}

void run_cuda_step(const StepLaunch& s) {
  const KernelTable& table = s.table;
  const int64_t blocks = table.num_chunks;  // an empty tensor has one (a block with no work)
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(),
              "adaml_kernels: a bucket of ", table.num_chunks,
              " chunks exceeds one launch's grid");
  if (blocks == 0) return;
  const c10::cuda::CUDAGuard guard(s.take.device());
  LaunchArgs a;
  a.rows = table.rows.const_data_ptr<int64_t>();
  a.chunk_tensor = table.chunk_tensor.const_data_ptr<int32_t>();
  a.num_chunks = table.num_chunks;
  a.take = s.take.const_data_ptr<float>();
  a.loss = s.loss.const_data_ptr();
  a.loss_type = scalar_type_code(s.loss);
  a.lr_tensor = s.lr_tensor ? s.lr_tensor->const_data_ptr() : nullptr;
  a.lr_type = s.lr_tensor ? scalar_type_code(*s.lr_tensor) : kFloat32;
  a.grad_scale = s.grad_scale ? s.grad_scale->const_data_ptr() : nullptr;
  a.grad_scale_type = s.grad_scale ? scalar_type_code(*s.grad_scale) : kFloat32;
  a.initial_loss = s.initial_loss ? s.initial_loss->const_data_ptr<double>() : nullptr;
  a.aligned = table.aligned;
  a.hyper = s.hyper;
  a.decay_mode = s.decay_mode;
  a.maximize = s.maximize;
  a.grad_float = s.grad_type == kFloat32;
  // Only what is stored as bf16 or as 8-bit codes is rounded stochastically (the CPU kernel
  // compiles it out).
  a.stochastic_rounding = s.stochastic_rounding && (s.param_type == kBFloat16 ||
                                                    s.moment_type == kBFloat16 ||
                                                    s.moment_type == kUInt8);
  a.seed = s.seed;
  a.telemetry = s.telemetry ? s.telemetry->data_ptr<double>() : nullptr;
  const bool measure = a.telemetry != nullptr;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const unsigned grid = static_cast<unsigned>(blocks);
  dispatch_storage(s.param_type, s.moment_type, s.master, [&](auto cfg) {
    using Cfg = decltype(cfg);
    if constexpr (Cfg::MT == kUInt8) {
      measure ? adaml_kernel_8bit<Cfg, true><<<grid, kThreads, 0, stream>>>(a)
              : adaml_kernel_8bit<Cfg, false><<<grid, kThreads, 0, stream>>>(a);
    } else {
      measure ? adaml_kernel<Cfg, true><<<grid, kThreads, 0, stream>>>(a)
              : adaml_kernel<Cfg, false><<<grid, kThreads, 0, stream>>>(a);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void fused_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                     at::TensorList exp_avg_sqs, at::TensorList steps,
                     at::TensorList master_params, at::TensorList moment_scales,
                     const at::Tensor& rows,
                     const at::Tensor& rows_host, const at::Tensor& chunk_tensor,
                     c10::ArrayRef<double> hyper, c10::ArrayRef<int64_t> config,
                     const at::Tensor& loss, const at::Tensor& take,
                     const std::optional<at::Tensor>& lr_tensor,
                     const std::optional<at::Tensor>& grad_scale,
                     const std::optional<at::Tensor>& initial_loss,
                     const std::optional<at::Tensor>& telemetry) {
  check_step_args(params, grads, exp_avgs, exp_avg_sqs, steps, master_params, moment_scales,
                  rows, rows_host, chunk_tensor, hyper, config, loss, take, lr_tensor,
                  grad_scale, initial_loss, c10::DeviceType::CUDA);
  check_telemetry(telemetry, chunk_tensor.numel(), take.device());
  bump_versions({params, exp_avgs, exp_avg_sqs, master_params, moment_scales});
  if (params.empty()) return;
  const c10::cuda::CUDAGuard guard(params[0].device());
  const bool capturing =
      c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None;
  const KernelTable table =
      resolve_table(params, grads, exp_avgs, exp_avg_sqs, steps, master_params, moment_scales,
                    rows, rows_host, chunk_tensor, /*allow_rebuild=*/!capturing);
  StepLaunch launch = make_launch(table, hyper, config, loss, take, lr_tensor, grad_scale,
                                  initial_loss);
  launch.telemetry = telemetry;
  run_cuda_step(launch);
}

// The step's prologue (fast_step_, adaml_fast_path.cpp) in one block: thread 0 decides whether the step is
// taken, records f_1 and counts a skip; then every thread advances its share of the step
// counts named by the tables ([num_tables, 2]: device address of a table's rows, row count).
__global__ void prologue_kernel(const void* loss, int loss_type, const float* found_inf,
                                double* initial_loss, double* skipped, float* take,
                                const int64_t* tables, int64_t num_tables) {
  __shared__ bool taken;
  if (threadIdx.x == 0) {
    taken = decide_step(load_scalar(loss, loss_type), found_inf, initial_loss, skipped, take);
  }
  __syncthreads();
  if (!taken) return;
  for (int64_t t = 0; t < num_tables; ++t) {
    const int64_t* rows = reinterpret_cast<const int64_t*>(tables[2 * t]);
    const int64_t n = tables[2 * t + 1];
    for (int64_t r = threadIdx.x; r < n; r += blockDim.x) {
      *reinterpret_cast<float*>(rows[r * kColumns + kStepAddr]) += 1.0f;
    }
  }
}

void step_prologue_cuda(const at::Tensor& loss, const std::optional<at::Tensor>& found_inf,
                        const at::Tensor& initial_loss, const at::Tensor& skipped,
                        const at::Tensor& take, const at::Tensor& tables) {
  const c10::cuda::CUDAGuard guard(take.device());
  prologue_kernel<<<1, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      loss.const_data_ptr(), scalar_type_code(loss),
      found_inf ? found_inf->const_data_ptr<float>() : nullptr,
      initial_loss.data_ptr<double>(), skipped.data_ptr<double>(), take.data_ptr<float>(),
      tables.const_data_ptr<int64_t>(), tables.size(0));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void fast_step_cuda(at::TensorList params, const at::Tensor& slots, const at::Tensor& record,
                    const at::Tensor& status, at::TensorList rows, at::TensorList rows_hosts,
                    at::TensorList chunks, c10::ArrayRef<int64_t> configs,
                    c10::ArrayRef<int64_t> bucket_groups,
                    c10::ArrayRef<double> hypers,
                    const c10::List<std::optional<at::Tensor>>& lr_tensors,
                    const at::Tensor& loss, const std::optional<at::Tensor>& found_inf,
                    const std::optional<at::Tensor>& grad_scale,
                    const at::Tensor& initial_loss, const at::Tensor& skipped,
                    const at::Tensor& take, const at::Tensor& tables,
                    at::TensorList telemetry) {
  const c10::cuda::CUDAGuard guard(take.device());
  fast_step(params, slots, record, status, rows, rows_hosts, chunks, configs, bucket_groups,
            hypers, lr_tensors, loss, found_inf, grad_scale, initial_loss, skipped, take, tables,
            telemetry, &step_prologue_cuda, &run_cuda_step);
}

// Why the kernel cannot run on GPU `device` ("" if it can): the build's architecture list may
// hold no code for it (e.g. a V100 or T4 under the default sm_80, sm_90 + PTX).
std::string cuda_kernel_error(int64_t device) {
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  cudaFuncAttributes attributes;
  using Default = Config<kFloat32, kFloat32, kFloat32, false, false>;
  const cudaError_t err = cudaFuncGetAttributes(&attributes, adaml_kernel<Default, false>);
  if (err == cudaSuccess) return "";
  (void)cudaGetLastError();  // not sticky, but leave no error behind for the next caller
  return cudaGetErrorString(err);
}

}  // namespace
}  // namespace adaml

TORCH_LIBRARY_FRAGMENT(adaml_kernels, m) {
  // Registered only where the CUDA kernel is built: its absence means "no CUDA kernel".
  m.def("cuda_kernel_error(int device) -> str", &adaml::cuda_kernel_error);
}

TORCH_LIBRARY_IMPL(adaml_kernels, CUDA, m) {
  m.impl("fused_step_", &adaml::fused_step_cuda);
  m.impl("fast_step_", &adaml::fast_step_cuda);
}

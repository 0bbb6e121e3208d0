// The CUDA kernel of madfast::ema_update_, and its host side (`launch` is supplied by the includer:
// csrc/cuda/ema.cu, or the CPU emulator in tests/cuda_emulator). One launch per (ema dtype, tensor
// dtype) group, whatever the number of tensors. Each CTA owns kChunk elements of one tensor and
// finds that tensor by binary search in a device table of (ema address, tensor address, numel,
// first CTA, pair index) rows -- apex's multi-tensor idea without its per-launch tensor cap.
//
// The table is either built per call (pinned memory, async copy) or, when the caller passes a
// plan's (host_table, table), kept on the device and rebuilt only when a row changes -- a tensor's
// storage, size or dtype. A call that reuses it allocates nothing and copies nothing to the
// device: the decay is a kernel argument or a device scalar, so the launch can be captured in a
// CUDA graph. A per-call table built while a CUDA graph is being captured (plain lists, e.g.
// FusedEMA under torch.compile with CUDA graphs) is written by fill kernels whose arguments carry
// the rows: a graph replays them from its own copy of the arguments, never from a host buffer the
// allocator may since have handed out again.
#pragma once

#include <ATen/OpMathType.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "../ema.h"

namespace madfast {
namespace ema_kernels {

constexpr int kThreads = 256;
constexpr int64_t kChunk = 4096;  // elements per CTA; a multiple of kThreads * every vector width
constexpr int kTableCols = 5;

template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T val[N];
};

template <typename ema_t, typename param_t, int kVec>
__global__ void __launch_bounds__(kThreads)
    ema_multi_tensor_kernel(const int64_t* __restrict__ table,  // [n_tensors, 5]
                            int64_t n_tensors, EmaScalars s) {
  using acc_t = at::opmath_type<ema_t>;
  const int64_t block = blockIdx.x;

  // Last row whose first CTA is <= this CTA.
  int64_t lo = 0, hi = n_tensors - 1;
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) >> 1;
    if (table[mid * kTableCols + 3] <= block) lo = mid; else hi = mid - 1;
  }
  const int64_t* row = table + lo * kTableCols;
  ema_t* ema = reinterpret_cast<ema_t*>(row[0]);
  const param_t* param = reinterpret_cast<const param_t*>(row[1]);
  const int64_t numel = row[2];
  const int64_t begin = (block - row[3]) * kChunk;
  const int64_t end = min(begin + kChunk, numel);
  const acc_t w = ema_weight<acc_t>(s);
  const uint64_t key = s.stochastic ? sr_pair_key(s.call_key, row[4]) : 0;

  const bool aligned = reinterpret_cast<uintptr_t>(ema) % sizeof(Vec<ema_t, kVec>) == 0 &&
                       reinterpret_cast<uintptr_t>(param) % sizeof(Vec<param_t, kVec>) == 0;
  int64_t scalar_from = begin;
  if (aligned) {
    constexpr int kIters = kChunk / (kThreads * kVec);
    if (end - begin == kChunk) {
      // Full chunk: issue every load before any math so that they overlap.
      Vec<ema_t, kVec> e[kIters];
      Vec<param_t, kVec> p[kIters];
#pragma unroll
      for (int it = 0; it < kIters; ++it) {
        const int64_t i = begin + (int64_t(it) * kThreads + threadIdx.x) * kVec;
        e[it] = *reinterpret_cast<const Vec<ema_t, kVec>*>(ema + i);
        p[it] = *reinterpret_cast<const Vec<param_t, kVec>*>(param + i);
      }
#pragma unroll
      for (int it = 0; it < kIters; ++it) {
        const int64_t i = begin + (int64_t(it) * kThreads + threadIdx.x) * kVec;
#pragma unroll
        for (int v = 0; v < kVec; ++v) e[it].val[v] = ema_element(e[it].val[v], p[it].val[v], w, s.stochastic, key, i + v);
        *reinterpret_cast<Vec<ema_t, kVec>*>(ema + i) = e[it];
      }
      return;
    }
    // Last, partial chunk: whole vectors first, the remainder below.
    const int64_t vec_end = begin + (end - begin) / kVec * kVec;
    for (int64_t i = begin + int64_t(threadIdx.x) * kVec; i < vec_end; i += int64_t(kThreads) * kVec) {
      Vec<ema_t, kVec> e = *reinterpret_cast<const Vec<ema_t, kVec>*>(ema + i);
      const Vec<param_t, kVec> p = *reinterpret_cast<const Vec<param_t, kVec>*>(param + i);
#pragma unroll
      for (int v = 0; v < kVec; ++v) e.val[v] = ema_element(e.val[v], p.val[v], w, s.stochastic, key, i + v);
      *reinterpret_cast<Vec<ema_t, kVec>*>(ema + i) = e;
    }
    scalar_from = vec_end;
  }
  for (int64_t i = scalar_from + threadIdx.x; i < end; i += kThreads) {
    ema[i] = ema_element(ema[i], param[i], w, s.stochastic, key, i);
  }
}

// The rows of every group, in group order; row_begin[g] / blocks[g]: group g's first row and CTAs.
struct TableRows {
  std::vector<int64_t> rows;
  std::vector<int64_t> row_begin, blocks;

  explicit TableRows(const EmaGroups& groups) {
    for (const auto& group : groups.groups) {
      row_begin.push_back(static_cast<int64_t>(rows.size()) / kTableCols);
      int64_t n = 0;
      for (const FlatPair& pair : group.second) {
        rows.insert(rows.end(), {reinterpret_cast<int64_t>(pair.ema.data_ptr()),
                                 reinterpret_cast<int64_t>(pair.param.const_data_ptr()), pair.ema.numel(), n,
                                 pair.index});
        n += (pair.ema.numel() + kChunk - 1) / kChunk;
      }
      TORCH_CHECK(n < (int64_t(1) << 31), "ema_update_: more than 2^31 CTAs for one launch");
      blocks.push_back(n);
    }
  }
  int64_t n_rows() const { return static_cast<int64_t>(rows.size()) / kTableCols; }
};

constexpr int kFillValues = 128;  // int64 values per fill launch: 1 KiB of kernel arguments
struct FillValues {
  int64_t v[kFillValues];
};

__global__ void fill_table_kernel(int64_t* __restrict__ dst, FillValues values, int n) {
  if (static_cast<int>(threadIdx.x) < n) dst[threadIdx.x] = values.v[threadIdx.x];
}

// The table through kernel arguments (capture-safe): ceil(values / 128) one-block launches.
template <typename Launch>
inline at::Tensor table_by_kernels(const TableRows& t, at::Device device, const Launch& launch) {
  at::Tensor dev = at::empty({t.n_rows(), kTableCols}, at::TensorOptions(at::kLong).device(device));
  const int64_t total = static_cast<int64_t>(t.rows.size());
  for (int64_t first = 0; first < total; first += kFillValues) {
    FillValues chunk{};
    const int n = static_cast<int>(std::min<int64_t>(kFillValues, total - first));
    std::memcpy(chunk.v, t.rows.data() + first, n * sizeof(int64_t));
    launch(&fill_table_kernel, dim3(1), dim3(kFillValues), dev.data_ptr<int64_t>() + first, chunk, n);
  }
  return dev;
}

// The device table of this call: the plan's, refreshed only when a row changed, or a fresh one
// (written by kernels while a CUDA graph is captured).
template <typename Launch>
inline at::Tensor device_table(const TableRows& t, bool cacheable, at::Device device,
                               const c10::optional<at::Tensor>& host_table, const c10::optional<at::Tensor>& table,
                               bool capturing, const Launch& launch) {
  const size_t bytes = t.rows.size() * sizeof(int64_t);
  if (cacheable && host_table.has_value() && table.has_value()) {
    const at::Tensor& host = *host_table;
    TORCH_CHECK_VALUE(host.device().is_cpu() && host.scalar_type() == at::kLong && host.is_contiguous(),
                      "ema_update_: host_table must be a contiguous int64 CPU tensor");
    TORCH_CHECK_VALUE(table->device() == device && table->scalar_type() == at::kLong && table->is_contiguous(),
                      "ema_update_: table must be a contiguous int64 tensor on ", device);
    if (host.numel() * int64_t(sizeof(int64_t)) != int64_t(bytes) || table->numel() != host.numel() ||
        std::memcmp(host.const_data_ptr(), t.rows.data(), bytes) != 0) {
      host.resize_({t.n_rows(), kTableCols});
      std::memcpy(host.data_ptr(), t.rows.data(), bytes);
      table->resize_({t.n_rows(), kTableCols});
      table->copy_(host);  // stream-ordered after the launches that read the old rows
    }
    return *table;
  }
  if (capturing) return table_by_kernels(t, device, launch);
  at::Tensor host = at::empty({t.n_rows(), kTableCols}, at::TensorOptions(at::kLong).pinned_memory(device.is_cuda()));
  std::memcpy(host.data_ptr(), t.rows.data(), bytes);
  return host.to(device, /*non_blocking=*/true);  // pinned: the host does not wait
}

template <typename ema_t, typename param_t, typename Launch>
void launch_group(const int64_t* table, int64_t n_rows, int64_t blocks, const EmaScalars& s, const Launch& launch) {
  constexpr int kVec = 16 / std::max(sizeof(ema_t), sizeof(param_t));  // 16-byte loads of the wider dtype
  launch(&ema_multi_tensor_kernel<ema_t, param_t, kVec>, dim3(static_cast<unsigned>(blocks)), dim3(kThreads), table,
         n_rows, s);
}

// Every (EMA dtype, tensor dtype) group of the lists in one launch each. Arguments checked by the caller.
template <typename Launch>
void update_gpu(at::TensorList ema, at::TensorList params, const c10::optional<at::Tensor>& decay, double decay_value,
                int64_t sr_seed, int64_t sr_step, const c10::optional<at::Tensor>& host_table,
                const c10::optional<at::Tensor>& table, const Launch& launch, bool capturing = false) {
  at::Tensor keep;
  const EmaScalars s = ema_scalars(decay, decay_value, sr_seed, sr_step, keep);
  const EmaGroups groups(ema, params);
  const TableRows rows(groups);
  at::Tensor dev;
  if (rows.n_rows() > 0)
    dev = device_table(rows, groups.direct, ema[0].device(), host_table, table, capturing, launch);
  groups.run(ema, params, [&](const std::vector<FlatPair>& pairs, auto e_tag, auto p_tag, size_t g) {
    launch_group<typename decltype(e_tag)::type, typename decltype(p_tag)::type>(
        dev.const_data_ptr<int64_t>() + rows.row_begin[g] * kTableCols, static_cast<int64_t>(pairs.size()),
        rows.blocks[g], s, launch);
  });
}

}  // namespace ema_kernels
}  // namespace madfast

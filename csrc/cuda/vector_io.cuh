// Vector loads shared by the CUDA kernels: V elements of T as one aligned access.
#pragma once

#include <cstddef>
#include <cstdint>

namespace xai_serve {
namespace cuda_io {

// V consecutive elements, aligned to their total size so a load is one 16-byte (or wider)
// transaction when sizeof(T) * V allows it.
template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T val[V];
};

// The caller guarantees `ptr` is aligned to sizeof(T) * V (see aligned_to).
template <typename T, int V>
__device__ __forceinline__ Pack<T, V> load_pack(const T* ptr) {
  return *reinterpret_cast<const Pack<T, V>*>(ptr);
}

inline bool aligned_to(const void* ptr, size_t bytes) {
  return reinterpret_cast<uintptr_t>(ptr) % bytes == 0;
}

}  // namespace cuda_io
}  // namespace xai_serve

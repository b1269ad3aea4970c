// Shared declarations and argument checks for the xai_serve ops.
//
// Every backend (CPU, CUDA) calls the same check_* function first, so a bad argument gets the
// same message whichever kernel would have run. Python wrappers in xai_serve/ops validate too,
// with the same wording; these checks guard direct calls of torch.ops.xai_serve.*.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <optional>

// Dispatch over the three supported dtypes (float32, float16, bfloat16), binding scalar_t.
#define XAI_SERVE_DISPATCH_FLOATS(TYPE, NAME, ...)                 \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                   \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)     \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)      \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

namespace xai_serve {

// How superpixel_mask fills a dropped pixel.
enum class BaselineMode : int {
  kConstant = 0,    // the scalar `fill`
  kPerSegment = 1,  // baseline[b, c, segment]
  kImage = 2,       // baseline[b, c, y, x]
};

inline bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

inline void check_float_tensor(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(is_supported_float(t.scalar_type()), "xai_serve::", op, ": `", name,
              "` must be float32, float16 or bfloat16, got ", t.scalar_type());
}

inline void check_same_device(const at::Tensor& a, const at::Tensor& b, const char* op,
                              const char* name_a, const char* name_b) {
  TORCH_CHECK(a.device() == b.device(), "xai_serve::", op, ": `", name_a, "` is on ", a.device(),
              " but `", name_b, "` is on ", b.device(), "; move both to the same device");
}

inline void check_segments_tensor(const at::Tensor& images, const at::Tensor& segments,
                                  const char* op) {
  TORCH_CHECK(segments.dim() == 3, "xai_serve::", op,
              ": `segments` must be Tensor[B, H, W], got ", segments.dim(), " dimensions");
  TORCH_CHECK(segments.scalar_type() == at::kInt || segments.scalar_type() == at::kLong,
              "xai_serve::", op, ": `segments` must be int32 or int64, got ",
              segments.scalar_type());
  TORCH_CHECK(segments.size(0) == images.size(0) && segments.size(1) == images.size(2) &&
                  segments.size(2) == images.size(3),
              "xai_serve::", op, ": `segments` shape ", segments.sizes(),
              " does not match images [B, C, H, W] = ", images.sizes());
  check_same_device(images, segments, op, "images", "segments");
}

// Raises if any segment id lies outside [0, num_segments). On CUDA this synchronises once.
inline void check_segment_range(const at::Tensor& segments, int64_t num_segments,
                                const char* op) {
  if (segments.numel() == 0) return;
  auto [lo_t, hi_t] = at::aminmax(segments);
  const int64_t lo = lo_t.item<int64_t>();
  const int64_t hi = hi_t.item<int64_t>();
  TORCH_CHECK(lo >= 0 && hi < num_segments, "xai_serve::", op, ": segment ids must lie in [0, ",
              num_segments, "), found ids in [", lo, ", ", hi, "]");
}

inline void check_cam_fuse(const at::Tensor& activations, const at::Tensor& weights,
                           c10::IntArrayRef size) {
  const char* op = "cam_fuse";
  TORCH_CHECK(activations.dim() == 4, "xai_serve::cam_fuse: `activations` must be ",
              "Tensor[B, K, h, w], got ", activations.dim(), " dimensions");
  check_float_tensor(activations, op, "activations");
  check_float_tensor(weights, op, "weights");
  TORCH_CHECK(weights.scalar_type() == activations.scalar_type(),
              "xai_serve::cam_fuse: `weights` dtype ", weights.scalar_type(),
              " differs from `activations` dtype ", activations.scalar_type());
  check_same_device(activations, weights, op, "activations", "weights");
  TORCH_CHECK(activations.size(1) >= 1, "xai_serve::cam_fuse: `activations` has no channels");
  TORCH_CHECK(activations.size(2) >= 1 && activations.size(3) >= 1,
              "xai_serve::cam_fuse: `activations` has an empty spatial size ",
              activations.sizes());
  if (weights.dim() == 2) {
    TORCH_CHECK(weights.size(0) == activations.size(0) && weights.size(1) == activations.size(1),
                "xai_serve::cam_fuse: channel `weights` must be Tensor[B, K] = [",
                activations.size(0), ", ", activations.size(1), "], got ", weights.sizes());
  } else {
    TORCH_CHECK(weights.dim() == 4 && weights.sizes() == activations.sizes(),
                "xai_serve::cam_fuse: `weights` must be Tensor[B, K] or Tensor[B, K, h, w] = ",
                activations.sizes(), ", got ", weights.sizes());
  }
  TORCH_CHECK(size.size() == 2 && size[0] >= 1 && size[1] >= 1,
              "xai_serve::cam_fuse: `size` must be two positive integers (H, W), got ", size);
}

inline BaselineMode check_superpixel_mask(const at::Tensor& images, const at::Tensor& segments,
                                          const at::Tensor& keep,
                                          const std::optional<at::Tensor>& baseline,
                                          const std::optional<at::Tensor>& mean,
                                          const std::optional<at::Tensor>& std) {
  const char* op = "superpixel_mask";
  TORCH_CHECK(images.dim() == 4, "xai_serve::superpixel_mask: `images` must be ",
              "Tensor[B, C, H, W], got ", images.dim(), " dimensions");
  check_float_tensor(images, op, "images");
  check_segments_tensor(images, segments, op);
  TORCH_CHECK(keep.dim() == 3, "xai_serve::superpixel_mask: `keep` must be Tensor[B, N, S], got ",
              keep.dim(), " dimensions");
  TORCH_CHECK(keep.scalar_type() == at::kBool || keep.scalar_type() == at::kByte,
              "xai_serve::superpixel_mask: `keep` must be bool or uint8, got ",
              keep.scalar_type());
  TORCH_CHECK(keep.size(0) == images.size(0), "xai_serve::superpixel_mask: `keep` has batch ",
              keep.size(0), " but `images` has batch ", images.size(0));
  TORCH_CHECK(keep.size(2) >= 1, "xai_serve::superpixel_mask: `keep` must cover at least one ",
              "segment (S >= 1)");
  check_same_device(images, keep, op, "images", "keep");
  BaselineMode mode = BaselineMode::kConstant;
  if (baseline.has_value()) {
    const at::Tensor& base = *baseline;
    check_same_device(images, base, op, "images", "baseline");
    TORCH_CHECK(base.scalar_type() == images.scalar_type(),
                "xai_serve::superpixel_mask: `baseline` dtype ", base.scalar_type(),
                " differs from `images` dtype ", images.scalar_type());
    if (base.dim() == 4) {
      TORCH_CHECK(base.sizes() == images.sizes(), "xai_serve::superpixel_mask: image `baseline` ",
                  "must match `images` ", images.sizes(), ", got ", base.sizes());
      mode = BaselineMode::kImage;
    } else {
      TORCH_CHECK(base.dim() == 3 && base.size(0) == images.size(0) &&
                      base.size(1) == images.size(1) && base.size(2) == keep.size(2),
                  "xai_serve::superpixel_mask: `baseline` must be Tensor[B, C, H, W] or ",
                  "Tensor[B, C, S] = [", images.size(0), ", ", images.size(1), ", ",
                  keep.size(2), "], got ", base.sizes());
      mode = BaselineMode::kPerSegment;
    }
  }
  TORCH_CHECK(mean.has_value() == std.has_value(),
              "xai_serve::superpixel_mask: give both `mean` and `std`, or neither");
  if (mean.has_value()) {
    for (const at::Tensor* t : {&*mean, &*std}) {
      const char* name = t == &*mean ? "mean" : "std";
      TORCH_CHECK(t->dim() == 1 && t->size(0) == images.size(1), "xai_serve::superpixel_mask: `",
                  name, "` must be Tensor[C] with C = ", images.size(1), ", got ", t->sizes());
      TORCH_CHECK(t->scalar_type() == at::kFloat, "xai_serve::superpixel_mask: `", name,
                  "` must be float32, got ", t->scalar_type());
      check_same_device(images, *t, op, "images", name);
    }
  }
  return mode;
}

inline void check_segment_mean(const at::Tensor& images, const at::Tensor& segments,
                               int64_t num_segments) {
  const char* op = "segment_mean";
  TORCH_CHECK(images.dim() == 4, "xai_serve::segment_mean: `images` must be ",
              "Tensor[B, C, H, W], got ", images.dim(), " dimensions");
  check_float_tensor(images, op, "images");
  check_segments_tensor(images, segments, op);
  TORCH_CHECK(num_segments >= 1, "xai_serve::segment_mean: `num_segments` must be >= 1, got ",
              num_segments);
}

inline void check_attention_residual(const at::Tensor& attention, int64_t drop) {
  TORCH_CHECK(attention.dim() == 3 && attention.size(1) == attention.size(2),
              "xai_serve::attention_residual: `attention` must be Tensor[M, N, N], got shape ",
              attention.sizes());
  TORCH_CHECK(attention.scalar_type() == at::kFloat,
              "xai_serve::attention_residual: `attention` must be float32, got ",
              attention.scalar_type());
  const int64_t nn = attention.size(1) * attention.size(2);
  TORCH_CHECK(drop >= 0 && (drop < nn || nn == 0),
              "xai_serve::attention_residual: `drop` must lie in [0, N * N) = [0, ", nn,
              "), got ", drop);
}

}  // namespace xai_serve

// Autograd of the fused auxiliary head, in C++ so that a training step pays no Python on the
// way through autograd (torch.library's Python autograd wrapper alone cost ~0.2 ms a call, more
// than the whole op on a GPU). Registered for the Autograd key of every device; the device
// kernels run below it.
//
// The loss is a leaf of a local graph, so with with_grad the forward has already formed
// d rows, d weight and d bias: those are saved (never the features), and the backward only
// scales them by the incoming gradient and, for 4-D features, broadcasts d rows over H x W.
// Called with with_grad=false while inputs need gradients, the op saves its inputs instead and
// the backward recomputes.
#include <ATen/SavedTensorHooks.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/graph_task.h>
#include <torch/library.h>

#include <c10/core/DispatchKeySet.h>

namespace llkern {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

at::Tensor undefined() { return at::Tensor(); }

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> call_kernel(
    const at::Tensor& features, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& target, int64_t ignore_index, double label_smoothing, c10::string_view reduction,
    bool with_grad, bool low_memory) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("llkern::aux_head_loss", "")
                             .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
                                 const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                 const at::Tensor&, int64_t, double, c10::string_view, bool, bool)>();
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return op.call(features, weight, bias, target, ignore_index, label_smoothing, reduction, with_grad, low_memory);
}

at::Tensor call_broadcast(const at::Tensor& grad_loss, const at::Tensor& grad_rows, at::IntArrayRef sizes,
                          bool channels_last, at::ScalarType dtype) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("llkern::aux_head_backward", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, at::IntArrayRef, bool,
                                               at::ScalarType)>();
  return op.call(grad_loss, grad_rows, sizes, channels_last, dtype);
}

// A real (not traced, not wrapped) CPU scalar equal to 1: the saved gradients then need no
// scaling and are handed to autograd as they are. Fake, functional and functorch tensors carry
// one of these keys; for them (and on GPUs, where reading the value would sync) always scale.
const c10::DispatchKeySet& traced_keys() {
  static const c10::DispatchKeySet traced({c10::DispatchKey::Python, c10::DispatchKey::PythonTLSSnapshot,
                                           c10::DispatchKey::Functionalize, c10::DispatchKey::FuncTorchGradWrapper,
                                           c10::DispatchKey::FuncTorchBatched});
  return traced;
}

bool is_plain_cpu_one(const at::Tensor& grad) {
  return grad.device().is_cpu() && !grad.key_set().has_any(traced_keys()) && grad.numel() == 1 &&
         grad.item<double>() == 1.0;
}

// grad * t, in t's dtype (a 16-bit t is multiplied in float32 and rounded: a bfloat16 gradient is then
// rounded twice, at most an ulp more). In place when this is the graph's last backward (not retained),
// nothing else holds t's memory (the op's outputs were dropped, as the Python wrapper drops them) and no
// saved-tensor hook saw t (one may have kept it): t is about to be freed, and a copy would add its size to
// the peak (189 MiB for the d rows and d weight of a 16384 x 2048 -> 32000 bfloat16 head).
at::Tensor scaled(const at::Tensor& t, const at::Tensor& grad, bool hooked) {
  if (!hooked && !torch::autograd::get_current_graph_task_keep_graph() && !t.key_set().has_any(traced_keys()) &&
      t.has_storage() && t.storage().use_count() == 1) {
    return t.mul_(grad);
  }
  return t.mul(grad);
}

// A new tensor object over the same memory: saved on its own, it is not one of the op's outputs
// (the user may hold those), so autograd can hand it to .grad without a copy once the graph is freed.
// detach, not view: a view made here would keep the output alive as its base, and the memory would
// look shared to `scaled` for good.
at::Tensor own_handle(const at::Tensor& t) { return t.detach(); }

class AuxHeadLossFunction : public torch::autograd::Function<AuxHeadLossFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& features, const at::Tensor& weight,
                               const std::optional<at::Tensor>& bias, const at::Tensor& target, int64_t ignore_index,
                               double label_smoothing, c10::string_view reduction, bool with_grad,
                               bool low_memory) {
    auto [loss, correct, grad_rows, grad_weight, grad_bias] =
        call_kernel(features, weight, bias, target, ignore_index, label_smoothing, reduction, with_grad, low_memory);
    ctx->mark_non_differentiable({correct, grad_rows, grad_weight, grad_bias});
    ctx->set_materialize_grads(false);
    ctx->saved_data["with_grad"] = with_grad;
    ctx->saved_data["low_memory"] = low_memory;
    ctx->saved_data["hooked"] = at::SavedTensorDefaultHooks::get_hooks().has_value();
    ctx->saved_data["sizes"] = features.sizes().vec();
    ctx->saved_data["dtype"] = features.scalar_type();
    ctx->saved_data["weight_dtype"] = weight.scalar_type();
    ctx->saved_data["has_bias"] = bias.has_value();
    ctx->saved_data["channels_last"] = features.dim() == 4 && !features.is_contiguous() &&
                                       features.is_contiguous(at::MemoryFormat::ChannelsLast);
    if (with_grad) {
      // Rows of 2-D/3-D features are shaped like the features now, so the backward can hand over
      // this very tensor.
      at::Tensor rows = own_handle(features.dim() < 4 ? grad_rows.view(features.sizes()) : grad_rows);
      ctx->save_for_backward({rows, own_handle(grad_weight), own_handle(grad_bias)});
    } else {
      ctx->save_for_backward({features, weight, bias.has_value() ? *bias : undefined(), target});
      ctx->saved_data["ignore_index"] = ignore_index;
      ctx->saved_data["label_smoothing"] = label_smoothing;
      ctx->saved_data["reduction"] = std::string(reduction);
    }
    return {loss, correct, grad_rows, grad_weight, grad_bias};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    TORCH_CHECK_NOT_IMPLEMENTED(!at::GradMode::is_enabled(),
                                "llkern.aux_head_loss: double backward (create_graph=True) is not supported by "
                                "the kernel; use impl='reference'");
    const at::Tensor& grad = grads[0];
    variable_list out(9);
    if (!grad.defined() || !(ctx->needs_input_grad(0) || ctx->needs_input_grad(1) || ctx->needs_input_grad(2))) {
      return out;
    }
    const std::vector<int64_t> sizes = ctx->saved_data["sizes"].toIntVector();
    const auto saved = ctx->get_saved_variables();
    at::Tensor grad_rows, grad_weight, grad_bias;
    if (ctx->saved_data["with_grad"].toBool()) {
      grad_rows = saved[0];
      grad_weight = saved[1];
      grad_bias = saved[2];
    } else {
      const std::optional<at::Tensor> bias = saved[2].defined() ? std::optional<at::Tensor>(saved[2]) : std::nullopt;
      const std::string reduction = ctx->saved_data["reduction"].toStringRef();
      auto results = call_kernel(saved[0], saved[1], bias, saved[3], ctx->saved_data["ignore_index"].toInt(),
                                 ctx->saved_data["label_smoothing"].toDouble(), reduction, true,
                                 ctx->saved_data["low_memory"].toBool());
      grad_rows = std::get<2>(results);
      if (sizes.size() < 4) grad_rows = grad_rows.view(sizes);
      grad_weight = std::get<3>(results);
      grad_bias = std::get<4>(results);
    }
    const bool unit = is_plain_cpu_one(grad);
    // (a recomputing backward's gradients are its own: no hook saw them)
    const bool hooked = ctx->saved_data["hooked"].toBool() && ctx->saved_data["with_grad"].toBool();
    // (the loss's dtype, float32 or float64: bfloat16 gradients are scaled in float32, not by a rounded grad)
    const at::Tensor g = unit ? at::Tensor() : grad.to(grad_bias.scalar_type());
    const auto weight_dtype = ctx->saved_data["weight_dtype"].toScalarType();
    if (ctx->needs_input_grad(0)) {
      const auto dtype = ctx->saved_data["dtype"].toScalarType();
      if (sizes.size() == 4) {
        out[0] = call_broadcast(grad, grad_rows, sizes, ctx->saved_data["channels_last"].toBool(), dtype);
      } else {
        out[0] = (unit ? grad_rows : scaled(grad_rows, g, hooked)).to(dtype);
      }
    }
    if (ctx->needs_input_grad(1)) out[1] = (unit ? grad_weight : scaled(grad_weight, g, hooked)).to(weight_dtype);
    if (ctx->needs_input_grad(2) && ctx->saved_data["has_bias"].toBool()) {
      out[2] = (unit ? grad_bias : scaled(grad_bias, g, hooked)).to(weight_dtype);
    }
    return out;
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> aux_head_loss_autograd(
    const at::Tensor& features, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& target, int64_t ignore_index, double label_smoothing, c10::string_view reduction,
    bool with_grad, bool low_memory) {
  const variable_list out = AuxHeadLossFunction::apply(features, weight, bias, target, ignore_index, label_smoothing,
                                                       reduction, with_grad, low_memory);
  return {out[0], out[1], out[2], out[3], out[4]};
}

}  // namespace

TORCH_LIBRARY_IMPL(llkern, Autograd, m) { m.impl("aux_head_loss", &aux_head_loss_autograd); }

}  // namespace llkern

"""``torch.compile`` and routing hooks.

Code compiled by dynamo does not guard on module hooks (``skip_nnmodule_hook_guards``), so code
compiled before a method was applied keeps running without the hooks added later: the method
would silently not apply. Three rules keep that from happening:

* an ``OptimizedModule`` (``torch.compile(model)``) is unwrapped: the hooks go on the model it
  wraps, whose own ``__call__`` (and so its model-level hooks) runs outside dynamo;
* a model compiled in place (``model.compile()``) is refused when the method is applied: its
  whole call, model-level hooks included, may be compiled code;
* every routed call counts the layer hooks that ran and raises if any was skipped (see
  ``RoutingExecutor._after_call``), whatever compiled code skipped it.

Compiling inside the block works: the hooks are ``torch.compiler.disable``-d, so dynamo calls
them eagerly (graph breaks) and routing stays exact.
"""

from __future__ import annotations

from torch import nn

SKIPPED_HOOKS = (
    "{model} ran this {mode} call without vlm-reroute's layer hooks ({ran} of {layers} ran), so the "
    "method did not apply: the call went through code compiled (torch.compile) before the method was "
    "applied, which ignores hooks added later. Apply the method to the uncompiled model and compile "
    "inside the `with` block, or drop the compiled code first (torch._dynamo.reset())"
)


def unwrap(model: nn.Module) -> nn.Module:
    """The model an ``OptimizedModule`` wraps (``torch.compile(model)``), else ``model``."""
    from torch._dynamo.eval_frame import OptimizedModule

    while isinstance(model, OptimizedModule):
        model = model._orig_mod
    return model


def refuse_compiled_in_place(model: nn.Module) -> None:
    if getattr(model, "_compiled_call_impl", None) is not None:
        raise RuntimeError(
            f"{type(model).__name__} was compiled in place (model.compile()) before the method was "
            "applied: its compiled call may skip the routing hooks. Apply the method to an uncompiled "
            "model and compile inside the `with` block (torch.compile(model) there)"
        )

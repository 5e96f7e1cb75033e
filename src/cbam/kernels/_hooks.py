"""Whether a hook would fire inside a module: the fused path runs a module's submodules as one
function, so it may run only where no hook would see them."""

from torch import nn
from torch.nn.modules import module as _module

_GLOBAL_HOOKS = (
    "_global_forward_hooks", "_global_forward_pre_hooks",
    "_global_backward_hooks", "_global_backward_pre_hooks",
)  # fmt: skip


def has_hooks(*modules: nn.Module) -> bool:
    """Whether any hook would fire inside `modules` (or their submodules): module hooks, or
    global ones from `torch.nn.modules.module.register_module_forward_hook` and friends.
    A plain loop over `_modules`: it runs on every forward, so it must cost microseconds."""
    if any(getattr(_module, name, None) for name in _GLOBAL_HOOKS):
        return True
    stack = list(modules)
    for m in stack:  # the list grows with the children as it goes
        if m is None:  # an empty slot in a parent's _modules
            continue
        if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks:
            return True
        if m._backward_pre_hooks:
            return True
        stack += m._modules.values()
    return False

"""The two wrappers `attach` puts into a network, keeping the wrapped module's state-dict names.

`Attached(module, attention)` computes attention(module(x)); it takes the place of `module`
in its parent. `Swapped(old, new)` computes old(x) + alpha * (new(x) - old(x)), alpha a
learnable scalar at 0: an SE layer that turns into CBAM as training moves alpha to 1.

Both keep the wrapped module's weights under its own names (`layer1.0.bn3.weight`, not
`layer1.0.bn3.module.weight`), so a checkpoint of the plain network loads into the attached
one (attention keys missing) and an attached one's backbone keys match the plain network.
Only `state_dict`/`load_state_dict` see the short names; `named_parameters` shows the
modules as they are.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from cbam.interop.identity_blend import IdentityBlend


class _KeepsInnerNames(nn.Module):
    inner = "module"  # the child whose keys appear without its own prefix

    def __init__(self) -> None:
        super().__init__()
        self._register_state_dict_hook(_drop_inner_prefix)
        self.register_load_state_dict_pre_hook(_add_inner_prefix)


class Attached(_KeepsInnerNames):
    """`attention(module(x))`, in place of `module`."""

    def __init__(self, module: nn.Module, attention: nn.Module) -> None:
        super().__init__()
        self.module = module
        self.attention = attention

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.attention(self.module(*args, **kwargs))


class Swapped(_KeepsInnerNames):
    """`old(x) + alpha * (new(x) - old(x))` with alpha from 0: exactly `old` at first."""

    def __init__(self, module: nn.Module, attention: nn.Module) -> None:
        super().__init__()
        self.module = module
        self.attention = IdentityBlend(attention)  # holds alpha; its forward is not used

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        old = self.module(x)
        return old + self.attention.alpha * (self.attention.layer(x) - old)


def unwrap(wrapper: nn.Module) -> nn.Module:
    return wrapper.module if isinstance(wrapper, Attached | Swapped) else wrapper


def _drop_inner_prefix(
    module: _KeepsInnerNames, state: dict[str, Any], prefix: str, metadata: Any
) -> None:
    inner = f"{prefix}{module.inner}."
    for key in [k for k in state if k.startswith(inner)]:
        state[prefix + key[len(inner) :]] = state.pop(key)


def _add_inner_prefix(
    module: _KeepsInnerNames, state: dict[str, Any], prefix: str, *args: Any
) -> None:
    own = (f"{prefix}{module.inner}.", f"{prefix}attention.")
    for key in [k for k in state if k.startswith(prefix) and not k.startswith(own)]:
        state[f"{prefix}{module.inner}.{key[len(prefix) :]}"] = state.pop(key)

"""The router registry: a router is one class, registered by name, that declares which token graph it needs.

A MoE block reads :func:`router_graph` to decide what to hand its router, so a new router plugs into V-MoE and
Swin-MoE (and train.py / evaluate.py, which validate names against this registry) without touching them::

    @register_router('my_router')
    class MyRouter(GraphRouter):
        graph = 'tokens'   # 'none' (gate only), 'tokens' (built from the tokens) or 'attention' (the block's)
        ...
"""
from __future__ import annotations

import inspect
from typing import Callable, Dict, Type, TypeVar

from .router import GRAPH_SOURCES, Router

__all__ = ['ROUTERS', 'register_router', 'create_router', 'router_graph', 'router_kwarg_names', 'check_router_name']

ROUTERS: Dict[str, Type[Router]] = {}
R = TypeVar('R', bound=Type[Router])


def register_router(name: str) -> Callable[[R], R]:
    """Class decorator: register a :class:`Router` subclass under ``name`` (names are unique)."""
    def register(cls: R) -> R:
        if not (isinstance(cls, type) and issubclass(cls, Router)):
            raise TypeError(f'register_router({name!r}) needs a Router subclass, got {cls!r}')
        if cls.graph not in GRAPH_SOURCES:
            raise ValueError(f'{cls.__name__}.graph must be one of {", ".join(GRAPH_SOURCES)}, got {cls.graph!r}')
        if name in ROUTERS and ROUTERS[name] is not cls:
            raise ValueError(f'router {name!r} is already registered ({ROUTERS[name].__name__})')
        ROUTERS[name] = cls
        return cls
    return register


def check_router_name(name: str) -> str:
    """``name`` if it is a registered router, else ValueError listing the valid ones."""
    if name not in ROUTERS:
        raise ValueError(f'unknown router {name!r}; valid routers: {", ".join(ROUTERS)}')
    return name


def router_graph(name: str) -> str:
    """The token graph router ``name`` needs: 'none', 'tokens' or 'attention'."""
    return ROUTERS[check_router_name(name)].graph


def router_kwarg_names(name: str) -> list[str]:
    """The keyword arguments router ``name`` accepts (besides dim and num_experts)."""
    names: list[str] = []
    for cls in ROUTERS[check_router_name(name)].__mro__:
        if issubclass(cls, Router):
            for p in inspect.signature(cls.__init__).parameters.values():
                if p.name not in ('self', 'dim', 'num_experts', 'kwargs') and p.name not in names:
                    names.append(p.name)
    return names


def create_router(name: str, dim: int, num_experts: int, **kwargs) -> Router:
    """Build the registered router ``name``; unknown names or keywords raise ValueError."""
    valid = router_kwarg_names(name)
    unknown = sorted(set(kwargs) - set(valid))
    if unknown:
        raise ValueError(f'router {name!r} got unknown keyword(s) {", ".join(unknown)}; valid: {", ".join(valid)}')
    return ROUTERS[name](dim, num_experts, **kwargs)

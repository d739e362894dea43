"""lstmwatch's forward hook on a watched module, kept out of what copies and pickles of the module carry.

`copy.deepcopy(model)` and `torch.save(model)` copy each module's `_forward_hooks` with everything in it: a hook
bound to a probe would take the probe, the tensors it captured and lstmwatch itself into the copy, and a pickle
would need lstmwatch to load (or fail on the probe's closures).

When the module has no forward hook yet (the usual case), its `_forward_hooks` and `_forward_hooks_with_kwargs`
become `HookTable`s: OrderedDicts that copy and pickle as plain OrderedDicts of the user's entries alone.
nn.Module's call path reads them with the dict's own methods, so a forward costs what it cost. On removal,
plain OrderedDicts come back (unless the user registered hooks meanwhile: their handles point at the table,
which then stays, emptied of lstmwatch's entries).

When the module already has forward hooks, the user may hold handles to that dict, and replacing it would
break them: the hook then goes into the dict as it is, a `ForwardHook` whose copy or pickle is an inert no-op
made of builtins (a copy carries one entry that does nothing, and loads without lstmwatch).

Under torch.compile, lstmwatch's hooks are never compiled (`eager_only`): an nn.LSTM is not traced by Dynamo, so
its call, hooks included, runs as plain Python in the middle of a compiled model (and a backward run inside a
compiled function calls the gradient hooks the same way), where Dynamo would otherwise compile every lstmwatch
function a hook calls, guard on the clock's step and logging flag, and recompile as they change. A forward
Dynamo does trace (a module it compiles into a graph, such as an nn.LSTMCell in a compiled loop) passes the
forward hook by: no guard, no graph break, nothing added to the graph, and that call goes unseen.
"""

from __future__ import annotations

import copy
import functools
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

Hook = Callable[[nn.Module, tuple[Any, ...], dict[str, Any], Any], None]  # (module, args, kwargs, output)
F = TypeVar("F", bound=Callable[..., Any])


def eager_only(fn: F) -> F:
    """Have torch.compile run `fn` as plain Python, with every function it calls, whenever Dynamo meets a call of
    it as a frame of its own (a hook called by code that runs eagerly inside a compiled region: an nn.LSTM's call,
    a backward pass): never compiled, no guard on what it reads, nothing to recompile. Returns `fn` itself: no
    wrapper, nothing on the call path. A call Dynamo traces inline, as part of a function it compiles, ignores
    this: the forward hook checks `torch.compiler.is_compiling()` for those. A no-op on torch without per-code
    frame strategies (torch._C._dynamo.eval_frame.set_code_exec_strategy)."""
    ef = getattr(getattr(torch._C, "_dynamo", None), "eval_frame", None)
    set_strategy = getattr(ef, "set_code_exec_strategy", None)
    action, strategy = getattr(ef, "_FrameAction", None), getattr(ef, "_FrameExecStrategy", None)
    code = getattr(fn, "__code__", None)
    if set_strategy is not None and action is not None and strategy is not None and code is not None:
        # SKIP this frame and, recursively, the frames it calls: Dynamo's callback is off while it runs.
        set_strategy(code, strategy(action.SKIP, action.SKIP))
    return fn

# A forward hook that does nothing, made of builtins alone: object.__init__ of a tuple accepts and ignores any
# arguments (tuple leaves __init__ to object) and returns None, so the module's output is left as it is.
INERT = functools.partial(object.__init__, ())

_TABLES = ("_forward_hooks", "_forward_hooks_with_kwargs")  # the dicts register_forward_hook(with_kwargs=True) fills


class HookTable(OrderedDict[int, Any]):
    """A module's hook dict with lstmwatch's entries (keys in `hidden`) among the user's: copies and pickles of
    it are plain OrderedDicts of the user's entries alone."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.hidden: set[int] = set()

    def _visible(self) -> list[tuple[Any, Any]]:
        return [(k, v) for k, v in self.items() if k not in self.hidden]

    def __reduce__(self) -> Any:
        # pickle, torch.save and copy.copy: a plain OrderedDict, built from collections alone when loaded.
        return OrderedDict, (), None, None, iter(self._visible())

    def __deepcopy__(self, memo: dict[int, Any]) -> OrderedDict[Any, Any]:
        out: OrderedDict[Any, Any] = OrderedDict()
        memo[id(self)] = out  # before the values: a hook may refer back to its module
        for k, v in self._visible():
            out[k] = copy.deepcopy(v, memo)
        return out

    def copy(self) -> HookTable:
        """The same hooks, lstmwatch's still hidden."""
        out = HookTable(self)
        out.hidden = set(self.hidden)
        return out


class ForwardHook:
    """lstmwatch's forward hook: calls `fn`. Its copy and its pickle are `INERT`."""

    __slots__ = ("fn", "traced")

    def __init__(self, fn: Hook):
        self.fn = fn
        self.traced = False  # a call was traced into a torch.compile graph, unseen

    @eager_only
    def __call__(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        if torch.compiler.is_compiling():
            # Traced into a graph: nothing added to it, nothing guarded. The flag is a side effect Dynamo replays
            # after each run of the graph, without a graph break.
            self.traced = True
            return
        self.fn(module, args, kwargs, output)

    def __deepcopy__(self, memo: dict[int, Any]) -> Any:
        return INERT

    def __reduce__(self) -> Any:
        return functools.partial, (object.__init__, ())


class ForwardHookHandle:
    """A forward hook (with kwargs, before the module's other hooks) on a module, kept out of its copies."""

    def __init__(self, module: nn.Module, fn: Hook):
        self.module = module
        hooks = module._forward_hooks
        if type(hooks) is OrderedDict and not hooks:  # nobody holds a handle to it: replace it
            for name in _TABLES:
                setattr(module, name, HookTable(getattr(module, name)))
        # First: lstmwatch sees the module's own output, before a user's hook changes it (out[0]).
        self.hook = ForwardHook(fn)
        self.handle: RemovableHandle = module.register_forward_hook(self.hook, with_kwargs=True, prepend=True)
        for name in _TABLES:
            table = getattr(module, name)
            if isinstance(table, HookTable):
                table.hidden.add(self.handle.id)

    @property
    def traced(self) -> bool:
        """Whether torch.compile traced a call of the module into a graph, where the hook does not run."""
        return self.hook.traced

    def remove(self) -> None:
        """Remove the hook; give the module plain hook dicts back when nothing else is in them. Safe twice."""
        self.handle.remove()
        m = self.module
        tables = [getattr(m, name) for name in _TABLES]
        for table in tables:
            if isinstance(table, HookTable):
                table.hidden.discard(self.handle.id)
        if isinstance(tables[0], HookTable) and not tables[0]:
            for name, table in zip(_TABLES, tables):
                if isinstance(table, HookTable):
                    setattr(m, name, OrderedDict(table))


# --- the recurrent kernel's own call, seen inside an nn.LSTM / nn.GRU subclass's forward
#
# A subclass's forward (`forward(x, lengths)` that packs, one returning only the output or a dict) reaches the
# kernel through `super().forward(...)`, which resolves on the class: an instance attribute cannot see it. While
# a watched module's class overrides forward, nn.LSTM.forward (nn.GRU.forward) is wrapped on the class: the
# wrapper runs the original, then hands (module, args, kwargs, output) of that inner call, which has nn.LSTM's
# own signature and return, to the hooks registered for that module. Modules not registered (every plain
# nn.LSTM, watched or not) cost one dict lookup. The original comes back when the last registration goes: at
# `remove()`, or when the module is collected (a watcher never closed). Registrations are replaced whole under
# a lock and read without it; the hooks are held weakly, so the registry keeps neither probe nor module alive.

_LOCK = threading.RLock()  # reentrant: a finalizer may run in a collection that starts while it is held
_KERNEL_HOOKS: dict[int, tuple[weakref.WeakMethod[Any], ...]] = {}  # id(module) -> its kernel-call hooks
_WRAPPED: dict[type, tuple[Any, Any, int]] = {}  # class -> (original forward, wrapper, registrations)


def _wrap(original: Any) -> Any:
    @eager_only  # run eagerly inside a compiled region (a subclass's forward Dynamo did not trace): never compiled
    def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        if torch.compiler.is_compiling():  # traced: the outer hook reads the call as it always did
            return original(self, *args, **kwargs)
        output = original(self, *args, **kwargs)
        refs = _KERNEL_HOOKS.get(id(self))
        if refs:
            for ref in refs:
                fn = ref()
                if fn is not None:  # each hook guards itself: nothing it raises reaches the training loop
                    fn(self, args, kwargs, output)
        return output

    functools.update_wrapper(forward, original)
    return forward


def original_forward(cls: type) -> Any:
    """cls.forward as torch defines it, wrapped or not."""
    with _LOCK:
        wrapped = _WRAPPED.get(cls)
        return wrapped[0] if wrapped is not None else cls.__dict__["forward"]


def overrides_forward(module: nn.Module, cls: type) -> bool:
    """Whether the module's class (a subclass of cls) has a forward of its own, which may call cls's."""
    fwd = type(module).forward
    with _LOCK:
        wrapped = _WRAPPED.get(cls)
        return fwd is not cls.__dict__["forward"] and (wrapped is None or fwd is not wrapped[0])


def _unregister(key: int, cls: type, ref: weakref.WeakMethod[Any]) -> None:
    with _LOCK:
        refs = tuple(r for r in _KERNEL_HOOKS.get(key, ()) if r is not ref)
        if len(refs) == len(_KERNEL_HOOKS.get(key, ())):
            return  # removed before
        if refs:
            _KERNEL_HOOKS[key] = refs
        else:
            _KERNEL_HOOKS.pop(key, None)
        original, wrapper, count = _WRAPPED[cls]
        if count > 1:
            _WRAPPED[cls] = (original, wrapper, count - 1)
            return
        del _WRAPPED[cls]
        if cls.__dict__.get("forward") is wrapper:  # not if someone wrapped it after us: theirs calls ours
            setattr(cls, "forward", original)  # noqa: B010


class KernelCallHook:
    """`fn(module, args, kwargs, output)` called for each call of cls.forward (nn.LSTM.forward) on `module` made
    from inside the module's own forward (a subclass's `super().forward(...)`), after it returns."""

    def __init__(self, module: nn.Module, cls: type, fn: Hook):
        ref: weakref.WeakMethod[Any] = weakref.WeakMethod(fn)
        key = id(module)
        with _LOCK:
            wrapped = _WRAPPED.get(cls)
            if wrapped is None:
                original = cls.__dict__["forward"]
                wrapped = (original, _wrap(original), 0)
                setattr(cls, "forward", wrapped[1])  # noqa: B010
            _WRAPPED[cls] = (wrapped[0], wrapped[1], wrapped[2] + 1)
            _KERNEL_HOOKS[key] = (*_KERNEL_HOOKS.get(key, ()), ref)
        # Removed with the module if never removed by hand (a watcher dropped without close()).
        self._finalizer = weakref.finalize(module, _unregister, key, cls, ref)
        self._finalizer.atexit = False

    def remove(self) -> None:
        """Unregister; restore cls.forward with the last registration. Safe twice."""
        self._finalizer()

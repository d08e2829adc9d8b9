"""Models rebuilt from stored weights without running their initialisers: one template per architecture.

Constructing a model runs every layer's parameter initialiser (random draws over every weight) and, in
``nn.TransformerEncoder``, deep-copies the first layer into the others; a load then overwrites all of it with the
stored weights. Here each architecture (the model type plus the config fields that shape the module) is built
once per process, on CPU, and its parameters are swapped for meta tensors (shape and dtype, no memory). A load
clones the template's module tree (new module objects; immutable attributes shared) and sets the stored tensors
as its parameters as they are: no initialiser runs and no weight is copied (safetensors' ``load_file`` maps the
file, so the weights stay in the page cache, private to this process once written to).

Non-persistent buffers (functions of the config, such as the enhanced transformer's sinusoid table) are not in the
stored weights; each clone gets its own copy of the template's.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from typing import Any, Mapping

import torch
from pydantic import BaseModel
from torch import nn

from shared.schemas import ModelType
from workers.models.registry import MODEL_CLASSES

#: Config fields that shape a module only through their length: a sentiment model's words are the tokenizer's
#: business, only their count sizes its embedding, so models trained on different headlines share a template.
SIZED_BY_LENGTH = frozenset({"vocab"})
#: Templates kept per process (least recently used dropped first): a fleet serves a few architectures.
MAX_TEMPLATES = 64
_REGISTRIES = ("_parameters", "_buffers", "_modules")


def architecture_key(model_type: ModelType | str, typed: BaseModel) -> str:
    """What identifies a module's structure: the model type and every config field (lists by their length)."""
    fields = typed.model_dump(mode="json", exclude=set(SIZED_BY_LENGTH))
    for name in SIZED_BY_LENGTH:
        if hasattr(typed, name):
            fields[name] = len(getattr(typed, name))
    return json.dumps([ModelType(model_type).value, fields], sort_keys=True)


class Template:
    """The module tree of one architecture, parameters on the meta device, and the weights it expects."""

    def __init__(self, model_type: ModelType | str, typed: BaseModel) -> None:
        module = MODEL_CLASSES[ModelType(model_type)](typed).eval()
        self.expected: dict[str, tuple[torch.Size, torch.dtype]] = {
            key: (t.shape, t.dtype) for key, t in module.state_dict().items()}
        self.clonable = _clonable(module)
        if self.clonable:
            for mod in module.modules():
                for name, p in mod._parameters.items():
                    if p is not None:
                        mod._parameters[name] = nn.Parameter(p.to("meta"), requires_grad=p.requires_grad)
                for name, b in mod._buffers.items():
                    if b is not None and name not in mod._non_persistent_buffers_set:
                        mod._buffers[name] = b.to("meta")
        self.module = module
        self.model_type = ModelType(model_type)
        self.typed = typed

    def restore(self, state: Mapping[str, torch.Tensor]) -> nn.Module:
        """A model of this architecture holding ``state`` (strict: the same keys and shapes as the model's).

        Raises:
            RuntimeError: missing, unexpected or mis-shaped weights (as ``load_state_dict(strict=True)``).
        """
        self._check(state)
        if not self.clonable:  # NOTE: hooks or tensors outside the registries: build it the ordinary way
            module = MODEL_CLASSES[self.model_type](self.typed).eval()
            module.load_state_dict(state, strict=True, assign=True)
            return module
        return _clone(self.module, state, "", self.expected)

    def _check(self, state: Mapping[str, torch.Tensor]) -> None:
        problems = []
        missing = sorted(self.expected.keys() - state.keys())
        unexpected = sorted(state.keys() - self.expected.keys())
        if missing:
            problems.append(f"missing keys {missing}")
        if unexpected:
            problems.append(f"unexpected keys {unexpected}")
        for key, (shape, _) in self.expected.items():
            if key in state and state[key].shape != shape:
                problems.append(f"size mismatch for {key}: stored {list(state[key].shape)}, model {list(shape)}")
        if problems:
            raise RuntimeError(f"Error(s) in loading state_dict for {type(self.module).__name__}: "
                               + "; ".join(problems))


def _clonable(module: nn.Module) -> bool:
    """True when a structural copy is exact: no hooks, no tensor or module outside the registries, no sharing."""
    for mod in module.modules():
        for name, value in vars(mod).items():
            if name in _REGISTRIES:
                continue
            if isinstance(value, (torch.Tensor, nn.Module)) or ("hook" in name and value):
                return False
    shared = len(list(module.named_parameters(remove_duplicate=False))) != len(list(module.parameters()))
    return not shared and len(list(module.modules())) == len(list(module.named_modules(remove_duplicate=False)))


def _clone(mod: nn.Module, state: Mapping[str, torch.Tensor], prefix: str,
           expected: Mapping[str, tuple[torch.Size, torch.dtype]]) -> nn.Module:
    new = object.__new__(type(mod))
    # NOTE: containers (hook dicts, the non-persistent buffer names) are copied, everything else is immutable.
    attrs: dict[str, Any] = {k: (v.copy() if isinstance(v, (dict, list, set)) else v)
                             for k, v in vars(mod).items() if k not in _REGISTRIES}
    params: dict[str, nn.Parameter | None] = {}
    for name, p in mod._parameters.items():
        params[name] = None if p is None else nn.Parameter(_stored(state, prefix + name, expected),
                                                           requires_grad=p.requires_grad)
    buffers: dict[str, torch.Tensor | None] = {}
    for name, b in mod._buffers.items():
        if b is None:
            buffers[name] = None
        elif name in mod._non_persistent_buffers_set:
            buffers[name] = b.clone()
        else:
            buffers[name] = _stored(state, prefix + name, expected)
    attrs["_parameters"], attrs["_buffers"] = params, buffers
    attrs["_modules"] = {name: None if child is None else _clone(child, state, f"{prefix}{name}.", expected)
                         for name, child in mod._modules.items()}
    object.__setattr__(new, "__dict__", attrs)
    return new


def _stored(state: Mapping[str, torch.Tensor], key: str,
            expected: Mapping[str, tuple[torch.Size, torch.dtype]]) -> torch.Tensor:
    tensor = state[key].detach()
    dtype = expected[key][1]
    return tensor if tensor.dtype == dtype else tensor.to(dtype)  # load_state_dict would cast on copy too


_templates: OrderedDict[str, Template] = OrderedDict()
_lock = threading.Lock()


def template(model_type: ModelType | str, typed: BaseModel) -> Template:
    """This process's template of the architecture of ``typed`` (built on first use)."""
    key = architecture_key(model_type, typed)
    with _lock:
        found = _templates.get(key)
        if found is not None:
            _templates.move_to_end(key)
            return found
    built = Template(model_type, typed)  # NOTE: outside the lock: a big one takes milliseconds to build
    with _lock:
        found = _templates.setdefault(key, built)
        _templates.move_to_end(key)
        while len(_templates) > MAX_TEMPLATES:
            _templates.popitem(last=False)
        return found


def restore(model_type: ModelType | str, typed: BaseModel, state: Mapping[str, torch.Tensor]) -> nn.Module:
    """A model of ``model_type`` with config ``typed`` holding the stored weights ``state``, in eval mode."""
    return template(model_type, typed).restore(state)


def clear() -> None:
    """Forget every template (a benchmark measuring the first load of an architecture)."""
    with _lock:
        _templates.clear()

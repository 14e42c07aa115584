"""The optimizer's state as torch.optim keeps it: a state dict that notices entries set, deleted
or emptied, and saved states brought back in."""

from __future__ import annotations

import math
import weakref
from collections import defaultdict

import torch

from . import quant8, quant8_dtensor
from .buckets import moment_dtype
from .precision import MASTER_KEY
from .tensor_checks import is_dtensor


class TrackedState(defaultdict):
    """torch.optim's state (a defaultdict(dict)) that counts entries set, deleted or emptied, so
    that a step notices `del opt.state[p]`, `opt.state[p] = {...}` or `opt.state[p].clear()` and
    lays the state out anew. Reading a missing entry inserts an empty one, as a defaultdict
    does, and counts as no change. (A tensor replaced inside an entry,
    `opt.state[p]["exp_avg"] = t`, is not seen: modify state tensors in place.)"""

    def __init__(self, items=()):
        super().__init__(dict, items)
        self.version = 0

    def __missing__(self, key):
        entry = ParamState(self)
        dict.__setitem__(self, key, entry)  # an empty entry lays out nothing: not counted
        return entry

    def laid_out_entry(self, key) -> "ParamState":
        """key's entry, about to hold views of the flat buffers: a ParamState of this state,
        so that emptying it later is counted (a dict set by the user is replaced by one)."""
        entry = self[key]
        if not (isinstance(entry, ParamState) and entry.owner is self):
            entry = ParamState(self, entry)
            dict.__setitem__(self, key, entry)  # the same items: not counted
        return entry

    def __setitem__(self, key, value):
        self.version += 1
        super().__setitem__(key, value)

    def __delitem__(self, key):
        self.version += 1
        super().__delitem__(key)

    def pop(self, *args):
        self.version += 1
        return super().pop(*args)

    def popitem(self):
        self.version += 1
        return super().popitem()

    def clear(self):
        self.version += 1
        super().clear()

    def update(self, *args, **kwargs):
        self.version += 1
        super().update(*args, **kwargs)

    def setdefault(self, key, default=None):
        self.version += 1
        return super().setdefault(key, default)

    def __reduce__(self):  # pickles as the defaultdict torch.optim expects
        return (defaultdict, (dict,), None, None, iter(self.items()))

    def __deepcopy__(self, memo):
        import copy

        out = TrackedState()
        memo[id(self)] = out
        for k, v in self.items():
            dict.__setitem__(out, copy.deepcopy(k, memo), copy.deepcopy(v, memo))
        return out


class ParamState(dict):
    """One parameter's entry of a TrackedState: removing keys from it (clear(), pop(), del)
    counts as a change of its state, so that the next step starts that parameter afresh, as
    torch.optim.Adam does with an emptied entry. Saved, pickled and copied as a plain dict."""

    __slots__ = ("_owner",)

    def __init__(self, owner: TrackedState, items=()):
        super().__init__(items)
        self._owner = weakref.ref(owner)  # no cycle: the state's buffers go with the optimizer

    @property
    def owner(self) -> TrackedState | None:
        return self._owner()

    def _changed(self) -> None:
        owner = self._owner()
        if owner is not None:
            owner.version += 1

    def __delitem__(self, key):
        self._changed()
        super().__delitem__(key)

    def pop(self, key, *default):
        if key in self:
            self._changed()
        return super().pop(key, *default)

    def popitem(self):
        self._changed()
        return super().popitem()

    def clear(self):
        self._changed()
        super().clear()

    def __reduce__(self):
        return dict, (dict(self),)


# The per-parameter state keys AdamL uses; a loaded state's other entries (e.g. AMSGrad's
# max_exp_avg_sq) are dropped: nothing would read them, and they would be saved forever.
STATE_KEYS = ("step", "exp_avg", "exp_avg_sq", MASTER_KEY, "initial_loss", "skipped_steps",
              *quant8.SCALE_KEYS.values())


def import_param_state(p: torch.Tensor, saved, state_dtype=None) -> dict:
    """A saved per-parameter state (AdamL's or torch.optim.Adam's) on p's device, AdamL dtypes.

    8-bit moments (codes and their block scales) are kept as they are when this optimizer has
    8-bit moments for p, and decoded otherwise; float moments for 8-bit ones are kept in
    float32 (the next step encodes them).
    """
    if not isinstance(saved, dict):
        return saved
    mdt = moment_dtype(p.dtype, state_dtype, p.numel())
    out = {}
    for key, value in saved.items():
        if key not in STATE_KEYS:
            continue
        if key in ("exp_avg", "exp_avg_sq", MASTER_KEY) and value.shape != p.shape:
            raise ValueError(
                f"saved {key!r} has shape {tuple(value.shape)}, its parameter {tuple(p.shape)}"
            )
        if key in quant8.SCALE_KEYS.values():
            value = value.to(device=p.device, dtype=torch.float32, copy=True)
        elif key in quant8.SCALE_KEYS and value.dtype == torch.uint8:
            if quant8.SCALE_KEYS[key] not in saved:
                raise ValueError(f"saved 8-bit {key!r} has no {quant8.SCALE_KEYS[key]!r}")
            value = value.to(device=p.device, copy=True)
            if mdt != torch.uint8:
                value = quant8_dtensor.decode_moment(
                    value, saved[quant8.SCALE_KEYS[key]], key).to(mdt)
        elif key in ("exp_avg", "exp_avg_sq", MASTER_KEY):
            dtype = torch.float32 if key == MASTER_KEY or mdt == torch.uint8 else mdt
            value = value.to(device=p.device, dtype=dtype, copy=True)
            if key == MASTER_KEY:
                value = master_consistent_with(value, p)
        elif key == "step":
            value = torch.as_tensor(value, dtype=torch.float32).to(p.device, copy=True)
        else:  # f_1, the skip count: numbers in a saved state (see saved_scalar)
            value = torch.as_tensor(value, dtype=torch.float64).to(p.device, copy=True)
        out[key] = value
    if mdt != torch.uint8:
        for key in quant8.SCALE_KEYS.values():
            out.pop(key, None)
    return out


def master_consistent_with(master: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """The loaded master weight where it still rounds to the parameter (to nearest, or
    stochastically: p is one of the two fp16/bf16 values around it), else the parameter's
    value. A checkpoint trained elsewhere (torch.optim.Adam carries master_param along without
    updating it) must not undo that training. Element by element, no host sync."""
    if is_dtensor(master) or is_dtensor(p):
        return master  # (DTensor checkpoints come from AdamL itself)
    value = p.detach()
    up = torch.nextafter(value, torch.full_like(value, math.inf)).float()
    down = torch.nextafter(value, torch.full_like(value, -math.inf)).float()
    rounds_to_p = (master > down) & (master < up)
    return torch.where(rounds_to_p, master, value.float())


def saved_scalar(value: torch.Tensor) -> float:
    """f_1 or the skip count as state_dict() saves them: a Python number, which
    torch.optim.Adam's loader keeps as it is (it casts every saved tensor to its parameter's
    dtype, and bf16 would round f_1 and the count). Reading it syncs, once per state_dict()."""
    return float(value)


def first_value(states, key: str, device: torch.device) -> torch.Tensor | None:
    """An optimizer-wide value (f_1, the skip count) from loaded per-parameter states: the
    first that is set (every AdamL state holds the same one; older checkpoints kept f_1 per
    parameter)."""
    found = None
    for st in states:
        if isinstance(st, dict) and key in st:
            value = float(st[key])
            if found is None or (math.isnan(found) and not math.isnan(value)):
                found = value
    return None if found is None else torch.tensor(found, dtype=torch.float64).to(device)


def dequantized_state_dict(state_dict: dict) -> dict:
    """An AdamL state dict with 8-bit moments decoded to float32 and their scales dropped, for
    torch.optim.Adam (or any optimizer that reads float exp_avg and exp_avg_sq). Everything
    else is shared with `state_dict`, not copied."""
    out = dict(state_dict)
    out["state"] = {}
    for key, st in state_dict["state"].items():
        st = dict(st)
        for name, scale_key in quant8.SCALE_KEYS.items():
            if scale_key in st:
                st[name] = quant8_dtensor.decode_moment(st[name], st.pop(scale_key), name)
        out["state"][key] = st
    return out

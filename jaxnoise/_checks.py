"""Shared argument validators (private): one rule and one message style per kind of argument.

Every public entry point of the library validates its arguments with these helpers, so that a misuse is a
``ValueError`` at the call that names the argument, the problem and the fix, raised before anything is traced.

* :func:`positive_int` / :func:`integer`: counts (``n_chips``, ``batch_size``, ...): Python or numpy integers, never
  ``bool`` and never floats (``2.5`` chips is a mistake, not 2 chips).
* :func:`number`: a finite plain number (float hyperparameters).
* :func:`scale` / :func:`nonnegative` / :func:`positive`: scale *data* (noise scales, conductances, times): a
  number or a numeric array (a 0-d array, a stacked array of a sweep, a tracer under ``jit``), finite and in range;
  strings, bools, lists, tuples and dicts are rejected with the fix. Tracers and unknown objects pass unchecked:
  JAX rebuilds pytrees with placeholder leaves (``None``, sentinels) when it maps over them.
* :func:`choice`: one of a fixed set of options.
* :func:`names`: a sequence of names or patterns, never a bare ``str`` (which Python iterates per character).
* :func:`mapping`: a ``{name: value}`` mapping with string keys.
* :func:`listing`: a shortened, readable list of valid names for error messages.
* :func:`renamed_kwargs`: a keyword argument's old name still works, with a ``DeprecationWarning`` naming the new one.
"""

from __future__ import annotations

import functools
import math
import numbers
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["abstract_variables", "as_key", "choice", "key_name", "integer", "is_concrete_number", "is_tracer", "listing", "mapping",
           "names", "nonnegative", "number", "object_cache", "positive", "positive_int", "renamed_kwargs", "scale"]


def is_tracer(x: Any) -> bool:
    return isinstance(x, jax.core.Tracer)


def is_concrete_number(x: Any) -> bool:
    """A concrete number or numeric array (not None, not a tracer, not a bool, not a pytree placeholder)."""
    if is_tracer(x) or x is None or isinstance(x, (bool, np.bool_)):
        return False
    return isinstance(x, (int, float, np.ndarray, np.number, jax.Array))


def as_key(key: Any) -> jax.Array:
    """A PRNG key from a key (typed, or raw uint32 as from ``jax.random.PRNGKey``) or an int seed.

    Raises:
      ValueError: anything else (None, a float, a string, a bool, a batch of keys), naming the fix.
    """
    if isinstance(key, (int, np.integer)) and not isinstance(key, (bool, np.bool_)):
        return jax.random.key(int(key))
    if is_tracer(key):
        return key
    if isinstance(key, (jax.Array, np.ndarray)):
        if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
            if key.ndim == 0:
                return key
            raise ValueError(f"key is an array of {key.shape} keys: pass one PRNG key (jax.random.key(0)) or an int "
                             f"seed; the chips' keys are derived from it (robustness.chip_keys).")
        if key.dtype == np.uint32 and key.ndim == 1:
            return key  # a raw key (jax.random.PRNGKey)
    raise ValueError(f"key={key!r:.80} is neither a PRNG key nor an int seed: pass jax.random.key(0) or an int "
                     f"(e.g. key=0).")


def key_name(key: Any) -> str:
    """The name of one entry of a pytree path (``jax.tree_util`` ``DictKey``/``GetAttrKey``/``SequenceKey``)."""
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _suffix(fix: str) -> str:
    return f" ({fix})" if fix else ""


def integer(value: Any, name: str, *, minimum: int = 1, fix: str = "") -> int:
    """``value`` as an int after checking it is an integer (not a bool, not a float) ``>= minimum``."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (numbers.Integral, np.integer)):
        raise ValueError(f"{name}={value!r} must be an integer >= {minimum}, got a {type(value).__name__}"
                         f"{_suffix(fix)}.")
    if value < minimum:
        raise ValueError(f"{name}={value!r} must be an integer >= {minimum}{_suffix(fix)}.")
    return int(value)


def positive_int(value: Any, name: str, fix: str = "") -> int:
    """``value`` as an int after checking it is an integer >= 1 (not a bool, not a float)."""
    return integer(value, name, minimum=1, fix=fix)


def number(value: Any, name: str, *, minimum: float | None = 0.0, fix: str = "") -> float:
    """A finite plain number (int/float, or a 0-d numeric array) ``>= minimum``, as a float."""
    if isinstance(value, (np.ndarray, jax.Array)) and not is_tracer(value) and np.ndim(value) == 0 \
            and np.issubdtype(np.asarray(value).dtype, np.number):
        value = np.asarray(value).item()
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name}={value!r}: must be a finite number"
                         f"{'' if minimum is None else f' >= {minimum:g}'}{_suffix(fix)}.")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name}={value!r}: must be a finite number >= {minimum:g}{_suffix(fix)}.")
    return float(value)


def _check_scale_type(value: Any, name: str, hint: str | None) -> bool:
    """Raises on values that cannot be scale data; returns True when ``value`` is a concrete number to range-check."""
    if value is None or is_tracer(value):
        return False
    if isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name}={value!r} is a bool, not a number: pass a float such as 0.1 (0 for none).")
    if isinstance(value, (str, bytes)):
        raise ValueError(f"{name}={value!r} is a string, not a number: pass a float, e.g. {name}=0.1.")
    if isinstance(value, (list, tuple)):
        more = f"; {hint}" if hint else ""
        raise ValueError(f"{name}={value!r} is a {type(value).__name__}: it must be one number (or an array of "
                         f"scale data){more}.")
    if isinstance(value, (Mapping, set, frozenset)):
        raise ValueError(f"{name} is a {type(value).__name__}, not a number: pass a float, e.g. {name}=0.1.")
    if isinstance(value, (np.ndarray, np.generic, jax.Array)):
        dtype = np.asarray(value).dtype if not isinstance(value, jax.Array) else value.dtype
        if not (np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating)) \
                or np.issubdtype(dtype, np.bool_):
            raise ValueError(f"{name} is an array of dtype {dtype}: scale data must be real numbers (float32).")
        return True
    if isinstance(value, complex):
        raise ValueError(f"{name}={value!r} is complex: pass a real number.")
    return isinstance(value, numbers.Real)


def scale(value: Any, name: str, *, meaning: str = "noise scales are standard deviations",
          fix: str = "use 0 for no noise", hint: str | None = None) -> None:
    """Raises ValueError unless ``value`` is scale data: a finite number (or numeric array) >= 0.

    Tracers, None and JAX's pytree placeholders pass unchecked. ``hint`` is added to the message of a list/tuple
    (e.g. where to go for several values).
    """
    if not _check_scale_type(value, name, hint):
        return
    arr = np.asarray(value, dtype=np.float64)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name}={value!r} is not finite: {meaning}, finite numbers >= 0.")
    if np.any(arr < 0):
        raise ValueError(f"{name}={value!r} is negative: {meaning} and must be >= 0 ({fix}).")


def nonnegative(value: Any, name: str, meaning: str, fix: str) -> None:
    """Raises ValueError when a concrete number (or array) is not a number, negative, NaN or infinite."""
    scale(value, name, meaning=meaning, fix=fix)


def positive(value: Any, name: str, fix: str = "") -> None:
    """Raises ValueError unless a concrete ``value`` is a finite number (or numeric array) > 0."""
    if not _check_scale_type(value, name, None):
        return
    arr = np.asarray(value, dtype=np.float64)
    if not np.all(np.isfinite(arr)) or np.any(arr <= 0):
        raise ValueError(f"{name}={value!r} must be a finite number > 0{': ' + fix if fix else '.'}")


def choice(value: Any, options: Iterable[Any], name: str) -> None:
    """Raises ValueError unless ``value`` is one of ``options``."""
    options = tuple(options)
    try:
        ok = value in options
    except TypeError:  # unhashable/uncomparable value
        ok = False
    if not ok:
        raise ValueError(f"unknown {name} {value!r}; choose one of {list(options)}.")


def names(value: Any, field: str, *, example: str | None = None, allow_empty: bool = True) -> tuple[str, ...]:
    """``value`` as a tuple of strings: a list/tuple (any iterable) of names or patterns, never a bare string.

    Raises:
      ValueError: a bare ``str`` (which would be iterated per character: the message gives
        ``field=('value',)``), a mapping, a non-iterable, an element that is not a string, or an empty sequence
        when ``allow_empty`` is False.
    """
    if isinstance(value, (str, bytes)):
        raise ValueError(f"{field}={value!r} is a bare string, which would be read as one name per character: pass a "
                         f"tuple, {field}=({value!r},).")
    if isinstance(value, Mapping):
        first = example or next(iter(value), "name")
        raise ValueError(f"{field} is a {type(value).__name__}: pass a tuple of names, e.g. {field}=({first!r},).")
    try:
        out = tuple(value)
    except TypeError:
        raise ValueError(f"{field}={value!r} must be a tuple of names, e.g. {field}=({example or 'name'!r},)."
                         ) from None
    for i, v in enumerate(out):
        if not isinstance(v, str):
            raise ValueError(f"{field}[{i}]={v!r} is a {type(v).__name__}, not a string: {field} holds names.")
    if not out and not allow_empty:
        raise ValueError(f"{field} is empty: give at least one name, e.g. {field}=({example or 'name'!r},).")
    return out


def mapping(value: Any, field: str, what: str = "name") -> None:
    """Raises ValueError unless ``value`` is None or a mapping with string keys (``{name: value}``)."""
    if value is None:
        return
    if not isinstance(value, Mapping):
        raise ValueError(f"{field} must be a mapping {{{what}: value}} (or None), got a {type(value).__name__} "
                         f"{value!r:.60}: e.g. {field}={{'fc1/kernel': 0.0}}.")
    for k in value:
        if not isinstance(k, str):
            raise ValueError(f"{field} has the key {k!r} ({type(k).__name__}): its keys are {what}s (strings).")


def listing(items: Iterable[Any], limit: int = 12) -> str:
    """``"a, b, c"``, shortened to the first ``limit`` items plus ``"... (N more)"``."""
    items = [str(i) for i in items]
    if not items:
        return "(none)"
    if len(items) <= limit:
        return ", ".join(items)
    return ", ".join(items[:limit]) + f", ... ({len(items) - limit} more)"


def object_cache(obj: Any, name: str) -> dict:
    """A dict named ``name`` kept on ``obj`` itself (in its ``__dict__``, frozen dataclasses included): what is
    cached for a model lives and dies with the model, instead of in a module-global table keyed by ``id()`` that
    keeps every model alive. ``dataclasses.replace`` makes a new object with empty caches."""
    caches = vars(obj).setdefault("_jaxnoise_caches", {})
    return caches.setdefault(name, {})


def abstract_variables(model: Any) -> Any:
    """``jax.eval_shape(model.init, key)``: the model's variables as shapes (nothing computed), cached on the
    model (:func:`object_cache`)."""
    cache = object_cache(model, "abstract_variables")
    if "value" not in cache:
        cache["value"] = jax.eval_shape(model.init, jax.random.key(0))
    return cache["value"]


def renamed_kwargs(**old_to_new: str):
    """Decorator: calls with an old keyword name (``num_draws=``) go on under the new one (``n_draws=``).

    The old name warns (``DeprecationWarning``) and passing both names is an error; recorded files keep their keys.
    """
    def wrap(fn):
        @functools.wraps(fn)
        def inner(*args, **kwargs):
            for old, new in old_to_new.items():
                if old in kwargs:
                    if new in kwargs:
                        raise TypeError(f"{fn.__name__}() got both {old}= and {new}=: pass only {new}= "
                                        f"({old}= is its old name).")
                    warnings.warn(f"{fn.__name__}({old}=...) is deprecated: use {new}=.", DeprecationWarning,
                                  stacklevel=2)
                    kwargs[new] = kwargs.pop(old)
            return fn(*args, **kwargs)
        return inner
    return wrap

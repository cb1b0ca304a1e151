"""Save a learned loss to a file and load it back safely (``torch.load(weights_only=True)``).

The file holds only tensors and plain values: the class path, its constructor arguments
and the state dict. A file is data from somewhere else, so loading trusts none of it:

* **Imports.** The class path names a module, and importing a module runs its top-level
  code. Only modules inside ``metaloss`` are imported, plus those the caller lists in
  ``trusted_modules`` (whole dotted prefixes: ``"my_losses"`` allows ``my_losses.mlp``
  but not ``my_losses_evil``). The class must then be a :class:`ParametricLoss`.
* **Sizes.** The constructor arguments decide how much memory the constructor allocates
  (``hidden=[10**9]`` for an MLP loss). They must be plain values, and the class is first
  built on the ``meta`` device (shapes, no memory) to check its size against ``max_numel``
  and its parameter shapes against the saved state dict, before the real build. The file
  itself is a zip archive: the uncompressed sizes its directory declares are checked
  against the same limit before ``torch.load`` decompresses (allocates) anything.
* **Values.** The file holds values only, checked before anything is built: the keys
  ``format, target, init_kwargs, state_dict, meta`` and, in ``meta``, :data:`META_KEYS`
  (anything else is refused, naming the file and the key); numbers are finite; no Hydra
  keys (``_target_``, ``_partial_``, ...) or ``${...}`` interpolations anywhere; constructor
  arguments are ones the class's constructor takes, in the ranges metaloss.schema
  declares for it. Tensors are dense CPU tensors of a real dtype (not meta, sparse,
  quantized or complex), floating point wherever the class holds floats.

A W&B artifact reference (``wandb-artifact://[entity/]project/name:version-or-alias``, as
``metaloss-meta`` logs it) is fetched with W&B's public API into a temporary directory and
its ``.pt`` file loaded exactly like a local one: the same checks, nothing trusted for
coming from W&B.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import math
import re
import tempfile
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import torch

from metaloss.losses.base import ParametricLoss
from metaloss.runs import atomic_write
from metaloss.schema import LOSS_RULES  # the loss settings' schema, owned in one place

FORMAT = "metaloss.learned_loss/1"
MAX_NUMEL = 50_000_000  # elements in all parameters and buffers: 200 MB of float32
_MAX_ELEMENT_BYTES = 8  # float64, the widest dtype a loss's tensors may have
_MAX_PICKLE_BYTES = 16 * 2**20  # the archive's data.pkl: constructor arguments and meta only
_MAX_ARCHIVE_OVERHEAD = 1 * 2**20  # version records, storage alignment, ...
_MAX_ARCHIVE_ENTRIES = 10_000
FILE_KEYS = frozenset({"format", "target", "init_kwargs", "state_dict", "meta"})
# What metaloss-meta records about a learned loss (save_learned_loss refuses other keys):
# the training task's name, the loss option, the run fingerprint, outer steps done, whether
# the run finished (else why it stopped), and the training setup (metaloss.config.training_setup:
# task / model / optimizer configs as values, which metaloss-eval takes when not given).
META_KEYS = frozenset(
    {"task", "loss_name", "fingerprint", "steps", "complete", "stopped", "setup", "inner_lr"}
)
HYDRA_KEYS = frozenset({"_target_", "_partial_", "_args_", "_recursive_", "_convert_"})
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_OTHER_DTYPES = (
    torch.bool,
    torch.uint8,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
)  # buffers only
_MAX_KWARG_ITEMS = 10_000  # constructors loop over lists (one layer per `hidden` entry)
_MAX_KWARG_DEPTH = 8
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")  # ASCII only: no look-alike letters
_PLAIN_SCALARS = (bool, int, float, str, type(None))
ARTIFACT_SCHEME = "wandb-artifact://"
ARTIFACT_TYPE = "learned-loss"
ARTIFACT_TIMEOUT_S = 30
_ARTIFACT_NAME = re.compile(
    r"(?:[^/:\s]+/){1,2}[^/:\s]+:[^/:\s]+\Z"
)  # [entity/]project/name:version

log = logging.getLogger("metaloss")


class CorruptLossFile(ValueError):
    """The file is not a readable metaloss learned-loss file."""


class UntrustedLossClass(CorruptLossFile):
    """The file names a loss class in a module the caller has not trusted."""


class LossArtifactUnavailable(RuntimeError):
    """A W&B artifact reference that cannot be fetched (no key, no server, no such artifact)."""


def is_artifact_ref(path: Any) -> bool:
    return isinstance(path, str) and path.startswith(ARTIFACT_SCHEME)


def atomic_save(obj, path: str | Path) -> Path:
    """torch.save to a unique temporary file, then rename: a crash never leaves a half file
    and two writers never collide on one temporary name."""
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def save_learned_loss(loss: ParametricLoss, path: str | Path, **meta) -> Path:
    """Write ``loss`` (class path, constructor arguments, state dict) and ``meta`` (keys from
    :data:`META_KEYS`, plain values) to ``path``, atomically. The file is checked exactly as
    :func:`load_learned_loss` checks it, so a file this writes is one it reads."""
    unknown = sorted(set(meta) - META_KEYS)
    if unknown:
        raise ValueError(
            f"save_learned_loss: unknown meta keys {unknown}; valid: {sorted(META_KEYS)}"
        )
    problems = (
        _value_problems(meta, "meta")
        + _inner_lr_problems(meta)
        + _value_problems(dict(loss.init_kwargs), "init_kwargs")
    )
    if problems:
        raise ValueError(f"save_learned_loss({type(loss).__qualname__}): " + "; ".join(problems))
    cls = type(loss)
    return atomic_save(
        {
            "format": FORMAT,
            "target": f"{cls.__module__}.{cls.__qualname__}",
            "init_kwargs": dict(loss.init_kwargs),
            "state_dict": {k: v.detach().cpu() for k, v in loss.state_dict().items()},
            "meta": meta,
        },
        path,
    )


def load_learned_loss(
    path: str | Path,
    frozen: bool = True,
    *,
    trusted_modules: Sequence[str] = (),
    max_numel: int = MAX_NUMEL,
    allow_other_task: bool = False,
) -> ParametricLoss:
    """Rebuild a saved learned loss; ``frozen`` turns off gradients for its parameters.

    ``trusted_modules``: module names or dotted prefixes, besides ``metaloss``, whose loss
    classes a file may name (they are imported). ``max_numel``: the most elements the
    loss's parameters and buffers may hold. A file that breaks either rule, or whose
    parameters do not fit its class, raises :class:`CorruptLossFile` before anything is
    imported or allocated.

    ``allow_other_task``: kept on the loss (``loss.allow_other_task``) for the run that uses
    it: :func:`metaloss.config.check_loss` refuses a learned loss on a task other than the
    one its file records unless this is true (this function does not know the run's task).
    """
    if not isinstance(allow_other_task, bool):
        raise ValueError(f"allow_other_task must be true or false, got {allow_other_task!r}")
    if is_artifact_ref(path):
        with tempfile.TemporaryDirectory(prefix="metaloss-artifact-") as root:
            loss = load_learned_loss(
                fetch_artifact(str(path), Path(root)),
                frozen,
                trusted_modules=trusted_modules,
                max_numel=max_numel,
                allow_other_task=allow_other_task,
            )
        loss.meta = {**loss.meta, "source": str(path)}
        loss.source = str(path)
        return loss
    path = Path(path)
    trusted = _trusted_prefixes(trusted_modules)
    blob = _read_blob(path, max_numel)
    target = blob.get("target")
    init_kwargs, state_dict = _checked_contents(path, blob, max_numel)
    cls = _resolve_loss_class(path, target, trusted)
    _check_arguments(path, cls, init_kwargs)
    module = _check_size_before_building(path, cls, init_kwargs, state_dict, max_numel)
    _check_dtypes(path, cls, state_dict, module)
    bad = [
        k
        for k, v in state_dict.items()
        if v.is_floating_point() and not bool(torch.isfinite(v).all())
    ]
    if bad:
        raise CorruptLossFile(
            f"{path}: parameters {bad} hold NaN/inf values; this loss cannot train anything "
            "(a diverged run saves learned_loss_last_good.pt instead)"
        )
    try:
        loss = cls.from_saved(init_kwargs, state_dict)
    except (RuntimeError, TypeError, ValueError, MemoryError) as e:
        raise CorruptLossFile(
            f"{path}: parameters do not match {target}: {type(e).__name__}: {e}"
        ) from e
    if frozen:
        loss.requires_grad_(False)
    loss.meta = blob.get("meta", {})
    loss.allow_other_task = allow_other_task
    loss.source = str(path)
    return loss


# --- W&B artifacts: fetched, then loaded like any file ------------------------------------


def fetch_artifact(ref: str, root: Path, timeout: int = ARTIFACT_TIMEOUT_S) -> Path:
    """Download the ``learned-loss`` artifact ``ref`` (``wandb-artifact://...``) into ``root``
    with ``wandb.Api().artifact(name).download()``; return its one ``.pt`` file, unread."""
    name = ref[len(ARTIFACT_SCHEME) :]
    if not _ARTIFACT_NAME.match(name):
        raise ValueError(
            f"{ref!r} is not an artifact reference of the form "
            f"{ARTIFACT_SCHEME}[entity/]project/name:version (e.g. :v3, :latest, :run-<id>)"
        )
    import wandb  # only for a reference: W&B's public API, over the network

    try:
        art = wandb.Api(timeout=timeout).artifact(name, type=ARTIFACT_TYPE)
        folder = Path(art.download(root=str(root / re.sub(r"[^A-Za-z0-9_.-]+", "_", name))))
    except (
        Exception
    ) as e:  # UsageError (no key), CommError (no server), ValueError (wrong type), ...
        first = (str(e).strip().splitlines() or [""])[0]
        raise LossArtifactUnavailable(
            f"cannot fetch W&B artifact {name!r} ({type(e).__name__}: {first}). It needs a W&B "
            "server and an API key; an artifact logged offline exists on the server only after "
            "`wandb sync <run dir>/wandb/offline-run-*`. The same file is "
            "<run dir>/learned_loss.pt: pass that path instead."
        ) from e
    if getattr(art, "type", ARTIFACT_TYPE) != ARTIFACT_TYPE:
        raise CorruptLossFile(
            f"W&B artifact {name!r} is of type {art.type!r}, not {ARTIFACT_TYPE!r}"
        )
    files = sorted(folder.rglob("*.pt"))
    if len(files) != 1:
        raise CorruptLossFile(
            f"W&B artifact {name!r} holds {len(files)} .pt files "
            f"({[f.name for f in files]}); a learned-loss artifact holds exactly one"
        )
    if (getattr(art, "metadata", None) or {}).get("complete") is False:
        log.warning(
            "W&B artifact %s is the last good φ of a run that stopped early (%s), not a finished "
            "learned loss",
            name,
            art.metadata.get("stopped", "incomplete"),
        )
    return files[0]


# --- reading -----------------------------------------------------------------------------


def max_file_bytes(max_numel: int = MAX_NUMEL) -> int:
    """The most bytes a learned-loss file may unpack to: ``max_numel`` float64 elements, its
    pickled values and the archive's small records."""
    return max_numel * _MAX_ELEMENT_BYTES + _MAX_PICKLE_BYTES + _MAX_ARCHIVE_OVERHEAD


def _check_archive(path: Path, max_numel: int) -> None:
    """Refuse a file whose unpacked size exceeds the limit, from the zip archive's central
    directory (the sizes it declares, which torch's reader allocates and then holds the data
    to), before ``torch.load`` decompresses anything: a few kB of deflated zeros can declare
    gigabytes. A file that is not a zip archive (torch's legacy format) is bounded by its size
    on disk."""
    limit = max_file_bytes(max_numel)
    if not zipfile.is_zipfile(path):
        size = path.stat().st_size
        if size > limit:
            raise CorruptLossFile(
                f"{path}: {size:,} bytes, over the limit of {limit:,} bytes for a "
                f"learned-loss file (max_numel={max_numel:,})"
            )
        return
    try:
        with zipfile.ZipFile(path) as archive:
            entries = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise CorruptLossFile(
            f"{path} is not a readable learned-loss file (its zip directory: "
            f"{type(e).__name__}: {e})"
        ) from e
    if len(entries) > _MAX_ARCHIVE_ENTRIES:
        raise CorruptLossFile(
            f"{path}: {len(entries):,} archive entries, over the limit of {_MAX_ARCHIVE_ENTRIES:,}"
        )
    total = sum(e.file_size for e in entries)
    if total > limit:
        raise CorruptLossFile(
            f"{path}: unpacks to {total:,} bytes ({len(entries)} entries), over the limit of "
            f"{limit:,} bytes for a learned-loss file (max_numel={max_numel:,} elements); "
            "refused before decompressing anything"
        )
    pickles = [e for e in entries if e.filename.endswith(".pkl")]
    big = [e for e in pickles if e.file_size > _MAX_PICKLE_BYTES]
    if big:
        raise CorruptLossFile(
            f"{path}: its pickled values {big[0].filename!r} unpack to {big[0].file_size:,} "
            f"bytes, over the limit of {_MAX_PICKLE_BYTES:,} (constructor arguments and meta "
            "are small)"
        )


def _read_blob(path: Path, max_numel: int = MAX_NUMEL) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"learned loss file not found: {path}")
    _check_archive(path, max_numel)
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors, truncated zip archives, foreign objects
        raise CorruptLossFile(
            f"{path} is not a readable learned-loss file ({type(e).__name__}: {e})"
        ) from e
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise CorruptLossFile(
            f"{path} is not a metaloss learned-loss file (format {FORMAT!r} expected)"
        )
    unknown = [k for k in blob if k not in FILE_KEYS]
    if unknown:
        raise CorruptLossFile(
            f"{path}: unknown key {unknown[0]!r} in the file; a learned-loss file holds "
            f"only {sorted(FILE_KEYS)}"
        )
    meta = blob.get("meta", {})
    if not isinstance(meta, dict):
        raise CorruptLossFile(f"{path}: meta must be a dict, got {type(meta).__name__}")
    unknown = [k for k in meta if k not in META_KEYS]
    if unknown:
        raise CorruptLossFile(
            f"{path}: unknown key {'meta.' + str(unknown[0])!r} in the file; "
            f"meta holds only {sorted(META_KEYS)}"
        )
    return blob


def _checked_contents(path: Path, blob: dict, max_numel: int) -> tuple[dict, dict]:
    """The constructor arguments and state dict, checked to be plain and of bounded size."""
    init_kwargs, state_dict = blob.get("init_kwargs"), blob.get("state_dict")
    if not isinstance(init_kwargs, dict) or not isinstance(state_dict, dict):
        raise CorruptLossFile(f"{path}: init_kwargs and state_dict must both be dicts")
    for name, value in (("init_kwargs", init_kwargs), ("meta", blob.get("meta", {}))):
        try:
            _count_plain(value, depth=0)
        except ValueError as e:
            raise CorruptLossFile(f"{path}: {name} {e}") from None
        problems = _value_problems(value, name)
        if name == "meta" and isinstance(value, dict):
            problems += _inner_lr_problems(value)
        if problems:
            raise CorruptLossFile(f"{path}: " + "; ".join(problems[:5]))
    bad = [
        k for k, v in state_dict.items() if not (isinstance(k, str) and isinstance(v, torch.Tensor))
    ]
    if bad:
        raise CorruptLossFile(f"{path}: state_dict entries {bad[:5]} are not named tensors")
    for k, v in state_dict.items():
        why = _unsupported_tensor(v)
        if why:
            raise CorruptLossFile(
                f"{path}: state_dict[{k!r}] is {why}; a learned loss holds dense CPU tensors of "
                f"dtype {', '.join(str(d).replace('torch.', '') for d in _FLOAT_DTYPES)} "
                "(integer or bool buffers where its class has them)"
            )
    numel = sum(v.numel() for v in state_dict.values())
    if numel > max_numel:
        raise CorruptLossFile(
            f"{path}: the saved parameters hold {numel:,} elements, over the "
            f"limit of {max_numel:,} (max_numel)"
        )
    return init_kwargs, state_dict


def _inner_lr_problems(meta: dict) -> list[str]:
    """``meta.inner_lr`` (a meta-learned inner learning rate, meta.learn_inner_lr): the
    meta-test trains the loss with it, so it must be a finite number > 0."""
    lr = meta.get("inner_lr")
    if lr is None or (isinstance(lr, (int, float)) and not isinstance(lr, bool) and lr > 0):
        return []
    return [f"meta.inner_lr = {lr!r}: must be a number > 0 (the loss's meta-learned inner lr)"]


def _value_problems(value: Any, where: str) -> list[str]:
    """Values that are plain types but not data: non-finite numbers, Hydra keys (a
    ``_target_`` would be called by whoever instantiates a config built from the file) and
    ``${...}`` interpolations (resolvers run when a config built from the file is read)."""
    out: list[str] = []
    if isinstance(value, float) and not math.isfinite(value):
        out.append(f"{where} = {value!r}: must be a finite number")
    elif isinstance(value, str) and "${" in value:
        out.append(f"{where} = {value!r}: interpolations (${{...}}) are not values")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            out += _value_problems(item, f"{where}[{i}]")
    elif isinstance(value, dict):
        for k, item in value.items():
            if k in HYDRA_KEYS:
                out.append(
                    f"{where}.{k}: Hydra key {k!r} refused "
                    "(a file holds values, never what to call)"
                )
            else:
                out += _value_problems(item, f"{where}.{k}")
    return out


def _unsupported_tensor(v: torch.Tensor) -> str | None:
    """Why a saved tensor cannot be a loss parameter or buffer; None if it can."""
    if v.is_meta or v.device.type == "meta":
        return "a meta-device tensor (shape only, no values)"
    if v.layout != torch.strided:
        return f"a {str(v.layout).replace('torch.', '')} tensor"
    if v.is_quantized:
        return f"a quantized tensor ({str(v.dtype).replace('torch.', '')})"
    if v.is_complex():
        return f"complex ({str(v.dtype).replace('torch.', '')})"
    if type(v) not in (torch.Tensor, torch.nn.Parameter):
        return f"a {type(v).__name__}"
    if v.device.type != "cpu":
        return f"on device {v.device}"
    if v.dtype not in _FLOAT_DTYPES + _OTHER_DTYPES:
        return f"of dtype {str(v.dtype).replace('torch.', '')}"
    return None


def _count_plain(value: Any, depth: int) -> int:
    """Number of items in a nest of plain values; ValueError on anything else or too much."""
    if isinstance(value, _PLAIN_SCALARS):
        return 1
    if depth >= _MAX_KWARG_DEPTH:
        raise ValueError(f"nest deeper than {_MAX_KWARG_DEPTH} levels")
    if isinstance(value, (list, tuple)):
        items: Iterable = value
    elif isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise ValueError("have a dict with non-string keys")
        items = value.values()
    else:
        raise ValueError(
            f"hold a {type(value).__name__}; only int, float, str, bool, None "
            "and lists, tuples and dicts of them are accepted"
        )
    total = 1
    for item in items:
        total += _count_plain(item, depth + 1)
        if total > _MAX_KWARG_ITEMS:
            raise ValueError(f"hold more than {_MAX_KWARG_ITEMS:,} values")
    return total


# --- which class: the trust rule ---------------------------------------------------------


def _trusted_prefixes(trusted_modules: Sequence[str] | str) -> tuple[str, ...]:
    if isinstance(trusted_modules, str):  # a bare name, not its characters
        trusted_modules = (trusted_modules,)
    names = tuple(trusted_modules)
    for name in names:
        if not (isinstance(name, str) and _is_dotted_name(name)):
            raise ValueError(
                f"trusted_modules entries must be module names like 'my_losses' "
                f"or 'my_losses.mlp', got {name!r}"
            )
    return ("metaloss", *names)


def _is_dotted_name(name: str) -> bool:
    return all(_IDENTIFIER.match(part) for part in name.split("."))


def _is_trusted(module: str, trusted: tuple[str, ...]) -> bool:
    """Whole dotted components: 'metaloss_evil' is not inside 'metaloss'."""
    return any(module == p or module.startswith(p + ".") for p in trusted)


def _resolve_loss_class(path: Path, target: Any, trusted: tuple[str, ...]) -> type[ParametricLoss]:
    parts = _target_parts(path, target)
    module_path = ".".join(parts[:-1])  # every module the lookup may import lies on this path
    if not _is_trusted(module_path, trusted):
        top = parts[0]
        raise UntrustedLossClass(
            f"{path}: the loss class {target!r} lives in module {module_path!r}, which is not "
            f"trusted: loading it would import (run) that module. Only modules inside "
            f"'metaloss' are imported by default. If you trust this file and its code, allow "
            f"it with the config key `trusted_modules=[{top}]` "
            f"(or load_learned_loss(..., trusted_modules=[{top!r}]))"
        )
    try:
        obj = _locate(parts)
    except Exception as e:
        raise CorruptLossFile(f"{path}: loss class {target!r} cannot be imported: {e}") from e
    if not (isinstance(obj, type) and issubclass(obj, ParametricLoss)):
        raise CorruptLossFile(f"{path}: {target!r} is not a ParametricLoss")
    if not _is_trusted(obj.__module__, trusted):  # reached through an attribute of a trusted module
        raise UntrustedLossClass(
            f"{path}: {target!r} is defined in {obj.__module__!r}, "
            "which is not trusted (see trusted_modules)"
        )
    return obj


def _target_parts(path: Path, target: Any) -> list[str]:
    """A plain dotted path ``module.Class``; no dunders, which only lead to internals."""
    parts = target.split(".") if isinstance(target, str) else []
    if len(parts) < 2 or not all(_IDENTIFIER.match(p) and not p.startswith("__") for p in parts):
        raise CorruptLossFile(
            f"{path}: the loss class {target!r} is not a dotted name "
            "like 'package.module.ClassName'"
        )
    return parts


def _locate(parts: list[str]) -> Any:
    """Import exactly the module ``parts[:-1]`` and take the class ``parts[-1]`` from it.

    Called only after the module path was checked against the trusted prefixes. No
    attribute walk through other objects: a trusted module that re-exports ``torch`` or
    ``numpy`` must not become a path into their lazily imported submodules.
    """
    module = importlib.import_module(".".join(parts[:-1]))
    obj = vars(module).get(parts[-1])  # no getattr: no module-level __getattr__ hooks either
    if obj is None:
        raise ImportError(f"module {module.__name__!r} has no class {parts[-1]!r}")
    return obj


# --- how big: a shape-only build before the real one -------------------------------------


class _Built(Exception):  # a control-flow signal carrying the probe's module
    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__("built")
        self.module = module


def _meta_build(
    cls: type[ParametricLoss], init_kwargs: dict, state_dict: dict
) -> torch.nn.Module | None:
    """The loss as ``cls.from_saved`` builds it, on the meta device (shapes, no memory),
    stopped before it loads the state dict; None if the class cannot be built there.

    A throwaway subclass catches the module at ``load_state_dict``: ``from_saved`` stays
    the one construction path (ML3 skips its fitting there), and a shape mismatch is
    reported by us rather than by a failed load we could not tell from a failed build.
    """

    def capture(self, *_args, **_kwargs):
        raise _Built(self)

    meta_state = {
        k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in state_dict.items()
    }
    try:
        probe = cast(
            type[ParametricLoss],  # a subclass of cls
            type(cls.__name__, (cls,), {"load_state_dict": capture, "__module__": cls.__module__}),
        )
        with torch.device("meta"):
            built = probe.from_saved(dict(init_kwargs), meta_state)
    except _Built as b:
        return b.module
    except Exception as e:  # e.g. a constructor that reads a tensor value (`float(t)`)
        log.debug(
            "%s cannot be built on the meta device (%s: %s); checking saved sizes only",
            cls.__qualname__,
            type(e).__name__,
            e,
        )
        return None
    return built if isinstance(built, torch.nn.Module) else None


def _check_arguments(path: Path, cls: type[ParametricLoss], init_kwargs: dict) -> None:
    """Constructor arguments the class takes, in the ranges ``metaloss.schema`` declares for
    it (the same rules as ``loss.<key>=...`` on the command line), before any build."""

    params = inspect.signature(cls.__init__).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        takes = [
            n
            for n, p in params.items()
            if n != "self"
            and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        ]
        unknown = [k for k in init_kwargs if k not in takes]
        if unknown:
            raise CorruptLossFile(
                f"{path}: unknown key {'init_kwargs.' + unknown[0]!r}: "
                f"{cls.__qualname__} takes {takes}"
            )
    rules = LOSS_RULES.get(cls.__name__, {}) if _is_trusted(cls.__module__, ("metaloss",)) else {}
    problems = []
    for key, check in rules.items():
        if key in init_kwargs:
            value = init_kwargs[key]
            msg = check(list(value) if isinstance(value, tuple) else value)
            if msg:
                problems.append(f"init_kwargs.{key} = {value!r}: must be {msg}")
    if problems:
        raise CorruptLossFile(f"{path}: " + "; ".join(problems))


def _check_dtypes(
    path: Path, cls: type[ParametricLoss], state_dict: dict, module: torch.nn.Module | None
) -> None:
    """φ is floating point: a parameter (or any entry the class builds as floats) saved as
    integers or bools would be cast silently by ``load_state_dict``."""
    if module is not None:
        expected = module.state_dict()
        floats = {k for k, v in expected.items() if v.is_floating_point()}
    else:  # not buildable on meta: its parameters are what the file must hold as floats
        floats = set(state_dict)
    bad = [k for k in state_dict if k in floats and not state_dict[k].is_floating_point()]
    if bad:
        k = bad[0]
        raise CorruptLossFile(
            f"{path}: state_dict[{k!r}] has dtype "
            f"{str(state_dict[k].dtype).replace('torch.', '')}, "
            f"but {cls.__qualname__} holds it as floats (φ is one of "
            f"{', '.join(str(d).replace('torch.', '') for d in _FLOAT_DTYPES)})"
        )


def _check_size_before_building(
    path: Path, cls: type[ParametricLoss], init_kwargs: dict, state_dict: dict, max_numel: int
) -> torch.nn.Module | None:
    """The meta-device build (None if the class cannot be built there), checked for size
    and for its parameter shapes against the saved ones."""
    module = _meta_build(cls, init_kwargs, state_dict)
    if module is None:
        return None  # only the saved state dict's size (checked on reading) bounds this class
    numel = sum(t.numel() for t in (*module.parameters(), *module.buffers()))
    if numel > max_numel:
        raise CorruptLossFile(
            f"{path}: {cls.__qualname__}(**{_short(init_kwargs)}) would hold "
            f"{numel:,} elements, over the limit of {max_numel:,} (max_numel)"
        )
    problems = _state_dict_mismatch(module.state_dict(), state_dict)
    if problems:
        raise CorruptLossFile(
            f"{path}: parameters do not match {cls.__qualname__}"
            f"(**{_short(init_kwargs)}): " + "; ".join(problems)
        )
    return module


def _state_dict_mismatch(
    expected: Mapping[str, torch.Tensor], saved: Mapping[str, torch.Tensor]
) -> list[str]:
    missing = [k for k in expected if k not in saved]
    unexpected = [k for k in saved if k not in expected]
    shapes = [
        f"{k}: saved {tuple(saved[k].shape)}, class builds {tuple(v.shape)}"
        for k, v in expected.items()
        if k in saved and saved[k].shape != v.shape
    ]
    problems = []
    if missing:
        problems.append(f"missing {missing[:5]}")
    if unexpected:
        problems.append(f"unexpected {unexpected[:5]}")
    return problems + shapes[:5]


def _short(value: Any, limit: int = 200) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."

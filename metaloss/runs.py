"""Run identity: every run owns its directory and never picks up state that is not its own.

* :func:`identity` — the resolved config minus the keys that may legitimately change
  between a run and its continuation (``VOLATILE``: step budget, logging, progress,
  resume pointer, the meta-test, ...). Its hash is the run's *fingerprint*.
* :class:`RunDir` — claims an output directory for one process: an exclusive ``flock``
  (released by the OS even on SIGKILL, so never stale) refuses a second process, and
  ``run.json`` records the owner's identity so a later run with a different config is
  refused with the differing keys named, instead of silently resuming or overwriting.
* :func:`atomic_write` — temp file + ``os.replace`` with a unique temp name, so a crash
  never leaves a half file and two writers never share a temp file.
* Hydra resolvers ``${metaloss.uid:}`` and ``${metaloss.slug:...}`` make run directories
  unique (two runs started in the same second get different directories) and multirun
  subdirectories distinct for every job.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from metaloss import keys

log = logging.getLogger("metaloss")

# Keys that may change when a run is continued (they do not change what φ becomes): the one
# table, metaloss.keys.
VOLATILE = keys.VOLATILE
# Keys that an explicit ``meta.resume_from`` may change: they are applied from the resumed
# step on (and logged). Anything else that differs is refused.
APPLIED_ON_RESUME = (
    "meta_optim.lr",
    "meta_optim.betas",
    "meta_optim.eps",
    "meta_optim.weight_decay",
    "meta_optim.momentum",
    "meta.clip_grad_norm",
    "meta.max_bad_steps",
    "device",
)  # moving a run to another device: same trajectory up to float rounding


class RunDirConflict(RuntimeError):
    """The output directory belongs to another run (other config) or is in use right now."""


class ResumeMismatch(RuntimeError):
    """A checkpoint was made by a run with another configuration."""


# ---------------------------------------------------------------- identity


def _flat(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for k, v in node.items():
            out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
        return out or {prefix: {}}
    return {prefix: node}


def _skipped(key: str, prefixes: Iterable[str]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def identity(cfg: DictConfig | dict, ignore: Iterable[str] = VOLATILE) -> dict[str, Any]:
    """Flat ``{dotted key: value}`` of the resolved config, without the ``ignore`` keys."""
    container = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    ignore = tuple(ignore)
    return {k: v for k, v in sorted(_flat(container).items()) if not _skipped(k, ignore)}


def fingerprint(ident: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:16]


# Settings added after runs were made, with the default that reproduces the old behaviour:
# a run recorded before the key existed matches a config that has it at this default.
NEW_KEY_DEFAULTS: dict[str, Any] = {
    "device": "auto",
    "dtype": "float32",
    "seeds": 1,
    "hypergrad.chunk": None,
    "hypergrad.vectorize": True,
    "loss.allow_other_task": False,
    "allow_other_task": False,
    "meta.selection.frac": 0.0,
    "meta.selection.every": 10,
    "meta.selection.seeds": 5,
    "meta.selection.margin": 0.0,
    "loss.start_at_base": False,
    "loss.tau": 0.0,
}


def differences(old: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{key: (old, new)}`` for every key whose value differs (missing: ``<unset>``)."""
    unset = "<unset>"
    out = {}
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k, unset), new.get(k, unset)
        if a == b or (a == unset and k in NEW_KEY_DEFAULTS and b == NEW_KEY_DEFAULTS[k]):
            continue
        out[k] = (a, b)
    return out


def hydra_record(cfg: Any) -> dict[str, str]:
    """This run's ``.hydra/config.yaml`` and ``overrides.yaml`` from memory (empty outside a
    Hydra app), the way Hydra writes them."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return {}
    hc = HydraConfig.get()
    return {
        "config.yaml": OmegaConf.to_yaml(cfg),
        "overrides.yaml": OmegaConf.to_yaml(OmegaConf.create(list(hc.overrides.task))),
        "hydra.yaml": OmegaConf.to_yaml(OmegaConf.create({"hydra": OmegaConf.to_container(hc)})),
    }


def describe(diff: dict[str, tuple[Any, Any]], limit: int = 12) -> str:
    lines = [f"{k}: {a!r} -> {b!r}" for k, (a, b) in list(diff.items())[:limit]]
    if len(diff) > limit:
        lines.append(f"... and {len(diff) - limit} more")
    return "; ".join(lines)


def split_applied(diff: dict[str, tuple[Any, Any]]) -> tuple[dict, dict]:
    """(changes that may be applied on an explicit resume, changes that must be refused)."""
    applied = {k: v for k, v in diff.items() if _skipped(k, APPLIED_ON_RESUME)}
    return applied, {k: v for k, v in diff.items() if k not in applied}


# ---------------------------------------------------------------- files


def atomic_write(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp)`` on a unique temporary file beside ``path``, fsync, then rename
    (what ``write`` returns is ignored)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600: results stay readable by collaborators
    os.close(fd)
    try:
        write(Path(tmp))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, content: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(content))


def stored_archive_problem(path: Path) -> str | None:
    """Why ``path`` is not an archive as ``torch.save`` writes it, judged from its zip
    directory alone (before anything is decompressed): torch stores its entries uncompressed,
    so entries declaring more bytes than the file holds are a decompression bomb (a few kB of
    deflated zeros can declare gigabytes, which ``torch.load`` would allocate). None: fine."""
    import zipfile

    if not zipfile.is_zipfile(path):
        return None  # torch's legacy format: bounded by its size on disk
    try:
        with zipfile.ZipFile(path) as archive:
            declared = sum(e.file_size for e in archive.infolist())
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        return f"its zip directory is unreadable ({type(e).__name__}: {e})"
    on_disk = path.stat().st_size
    if declared > on_disk + 2**20:
        return (
            f"its entries unpack to {declared:,} bytes from {on_disk:,} on disk, but torch.save "
            "stores them uncompressed: refused before decompressing anything"
        )
    return None


MAX_NESTING = 32  # no file metaloss writes nests deeper than ~8


def nesting_depth(obj: Any) -> int:
    """How deep JSON-like ``obj`` nests (a scalar: 0), walked without recursion, so a
    hand-made file nested thousands deep is measured, not a RecursionError."""
    depth, stack = 0, [(obj, 0)]
    while stack:
        node, d = stack.pop()
        if isinstance(node, dict | list | tuple):
            d += 1
            depth = max(depth, d)
            stack.extend((v, d) for v in (node.values() if isinstance(node, dict) else node))
    return depth


def replace_all(files: dict[Path, Path]) -> None:
    """Copy every ``source`` to its ``destination`` (``{destination: source}``) all or nothing:
    each is first copied to a temporary file beside its destination and fsynced; only when every
    copy succeeded are they renamed into place (a rename needs no space). A copy that fails (a
    full disk, Ctrl-C) removes the temporary files and leaves every destination as it was."""
    staged: list[tuple[Path, Path]] = []
    try:
        for dest, src in files.items():
            dest = Path(dest)
            fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
            os.fchmod(fd, 0o666 & ~_UMASK)
            os.close(fd)
            staged.append((Path(tmp_name), dest))
            shutil.copyfile(src, tmp_name)
            with open(tmp_name, "rb") as f:
                os.fsync(f.fileno())
    except BaseException:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
        raise
    # renames need no space and take microseconds: a Ctrl-C / SIGTERM arriving now is held
    # until every file is in place, so the destination is never half old, half new
    import signal

    held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        for tmp, dest in staged:
            os.replace(tmp, dest)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


# ---------------------------------------------------------------- the run directory

RUN_FILE = "run.json"
LOCK_FILE = ".metaloss.lock"


class RunDir:
    """Exclusive ownership of an output directory for the lifetime of this object.

    ``RunDir(out_dir, app, ident)`` locks the directory (a second process gets
    :class:`RunDirConflict` naming the holder), then compares ``ident`` with the owner
    recorded in ``run.json``. ``allow`` is a predicate over the differences that may be
    accepted (an explicit resume into the same directory with a new meta learning rate).
    :meth:`record` writes ``run.json`` once the run is about to produce results, so a run
    refused during setup (a typo) does not claim the directory.
    """

    def __init__(
        self,
        out_dir: str | Path,
        app: str,
        ident: dict[str, Any],
        allow: Callable[[dict], bool] | None = None,
    ) -> None:
        self.path = Path(out_dir)
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock = open(self.path / LOCK_FILE, "a+")  # noqa: SIM115 (held until close)
        try:
            fcntl.flock(self._lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.seek(0)
            holder = self._lock.read().strip() or "another process"
            self._lock.close()
            # Hydra already wrote this launch's .hydra/ over the owner's
            self._restore_owner_record()
            raise RunDirConflict(
                f"run directory {self.path} is in use by {holder}; two runs never "
                "share a directory: wait for it, or choose another hydra.run.dir"
            ) from None
        self._lock.seek(0)
        self._lock.truncate()
        self._lock.write(f"pid {os.getpid()} on {socket.gethostname()}")
        self._lock.flush()
        for stale in self.path.glob(
            ".*.tmp"
        ):  # half-written files of a killed writer (we hold the lock)
            stale.unlink(missing_ok=True)
        try:
            self._claim(app, ident, allow)
        except BaseException:
            self.close()
            raise

    def _claim(self, app: str, ident: dict[str, Any], allow) -> None:
        run_file = self.path / RUN_FILE
        if run_file.is_file():
            try:
                owner = json.loads(run_file.read_text())
            except (OSError, ValueError) as e:
                raise RunDirConflict(
                    f"{run_file} is unreadable ({e}); this directory's owner is unknown, "
                    "choose another hydra.run.dir"
                ) from e
            if owner.get("app") != app:
                self._restore_hydra_record(owner)
                raise RunDirConflict(
                    f"{self.path} holds a {owner.get('app')} run; metaloss-{app} will "
                    "not write into it: choose another hydra.run.dir"
                )
            diff = differences(owner.get("identity", {}), ident)
            if diff and not (allow and allow(diff)):
                self._restore_hydra_record(owner)
                applied, refused = split_applied(diff)
                hint = (
                    f"To continue that run with the new value(s), pass meta.resume_from={self.path}"
                    if not refused
                    else "Nothing was run: choose another hydra.run.dir (the default is "
                    "unique per run)"
                )
                raise RunDirConflict(
                    f"{self.path} belongs to another run "
                    f"(fingerprint {owner.get('fingerprint')}); this "
                    f"config differs in: {describe(diff)}. {hint}"
                )
        self.app, self.ident = app, ident

    def record(self, hydra_files: dict[str, str] | None = None) -> None:
        """Write ``run.json``: from now on this directory belongs to this run's identity.

        ``hydra_files`` (:func:`hydra_record`) is this run's own ``.hydra/*.yaml``, made from
        its config in memory: it is written over whatever a concurrent, refused launch left
        there, and kept in run.json so that later refused launches can put it back."""
        saved = dict(hydra_files or {})
        for name, content in saved.items():
            atomic_write_text(self.path / ".hydra" / name, content)
        atomic_write_text(
            self.path / RUN_FILE,
            json.dumps(
                {
                    "app": self.app,
                    "fingerprint": fingerprint(self.ident),
                    "identity": self.ident,
                    "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
                    "pid": os.getpid(),
                    "host": socket.gethostname(),
                    "hydra_record": saved,
                },
                indent=1,
                sort_keys=True,
                default=str,
            ),
        )

    def _restore_owner_record(self) -> None:
        try:
            self._restore_hydra_record(json.loads((self.path / RUN_FILE).read_text()))
        except (OSError, ValueError):
            pass  # the owner has not recorded yet: it writes its own record when it does

    def _restore_hydra_record(self, owner: dict) -> None:
        """Hydra writes ``.hydra/config.yaml`` etc. before the app runs, so a refused launch
        has already overwritten the owner's record: put the owner's copy back."""
        for name, content in (owner.get("hydra_record") or {}).items():
            if "/" not in name and name.endswith(".yaml"):
                atomic_write_text(self.path / ".hydra" / name, content)

    def close(self) -> None:
        if not self._lock.closed:
            fcntl.flock(self._lock.fileno(), fcntl.LOCK_UN)
            self._lock.close()

    def __enter__(self) -> RunDir:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---------------------------------------------------------------- Hydra resolvers


def _uid() -> str:
    """This launch's id: the process id (unique on the machine) plus random bits. Under
    torchrun every rank must agree on the run directory, so the ranks share the id of their
    common parent, the torchrun agent."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and "TORCHELASTIC_RUN_ID" in os.environ:
        return f"{os.getppid():x}-tr"
    return f"{os.getpid():x}{secrets.token_hex(2)}"


_UID = _uid()
_UMASK = os.umask(0)
os.umask(_UMASK)


def _stamp() -> str:
    """Launch time for directory names; under torchrun the agent's start time (from
    /proc, Linux), so that ranks started a second apart still agree."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and "TORCHELASTIC_RUN_ID" in os.environ:
        try:
            ticks = int(
                Path(f"/proc/{os.getppid()}/stat").read_text().rsplit(")", 1)[1].split()[19]
            )
            boot = next(
                float(line.split()[1])
                for line in Path("/proc/stat").read_text().splitlines()
                if line.startswith("btime")
            )
            return time.strftime(
                "%Y-%m-%d_%H-%M-%S", time.localtime(boot + ticks / os.sysconf("SC_CLK_TCK"))
            )
        except (OSError, ValueError, IndexError, StopIteration):
            pass
    return time.strftime("%Y-%m-%d_%H-%M-%S")


def _slug(text: Any, limit: int = 96) -> str:
    """A filesystem-safe, bounded directory name from a Hydra override string."""
    s = re.sub(r"[^A-Za-z0-9._=,+\-\[\]]+", "_", str(text)).strip("._")
    if len(s) > limit:
        s = s[: limit - 9] + "~" + hashlib.sha1(s.encode()).hexdigest()[:8]
    return s or "default"


def register_resolvers() -> None:
    """``${metaloss.uid:}``: one id per launching process (cached, so every reference —
    and every multirun job, whose config Hydra copies with its cache — sees the same one);
    ``${metaloss.slug:x}``: a safe directory name."""
    if not OmegaConf.has_resolver("metaloss.uid"):
        OmegaConf.register_new_resolver("metaloss.uid", lambda: _UID, use_cache=True)
    if not OmegaConf.has_resolver("metaloss.stamp"):
        OmegaConf.register_new_resolver("metaloss.stamp", _stamp, use_cache=True)
    if not OmegaConf.has_resolver("metaloss.slug"):
        OmegaConf.register_new_resolver("metaloss.slug", _slug)

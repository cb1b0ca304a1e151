"""Run logging for the entry points: Weights & Biases (offline by default) or nothing.

The library returns metric dicts; only entry points hand them to a logger. The W&B run
lives inside the Hydra output directory, so `wandb sync <outdir>/wandb/offline-run-*`
uploads it later.

Online mode never costs a run: when the W&B server cannot be reached (a quick TCP probe,
then ``wandb.init`` under ``logger.init_timeout`` seconds) or no API key is configured,
the run logs offline instead, with a warning, and can be synced later.

What researchers look for in W&B: the seeds of one setting in one *group*
(:func:`default_group`), ``meta/*`` and ``meta_test/*`` plotted against the outer step
(``meta/step``), and the learned loss as a versioned ``learned-loss`` artifact
(:meth:`WandbLogger.learned_loss`) that ``metaloss-eval loss_path=wandb-artifact://...``
fetches back.
"""

from __future__ import annotations

import hashlib
import json
import logging
import netrc
import os
import re
import socket
import threading
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal, TypedDict
from urllib.parse import urlsplit

from omegaconf import DictConfig, OmegaConf

from metaloss import keys
from metaloss.runs import atomic_write_text

log = logging.getLogger("metaloss")

DEFAULT_BASE_URL = "https://api.wandb.ai"
DEFAULT_INIT_TIMEOUT_S = 10.0  # W&B's own default (90 s) stalls every run of a sweep when offline
FALLBACK_TAG = "offline-fallback"
_LOCAL_MODES = frozenset({"offline", "dryrun", "disabled"})  # modes that need no server
GROUP_MAXLEN = 128  # W&B's limit for group (and artifact) names
# Overrides that do not change what a run computes: never part of a group name.
_NOT_SETTINGS = keys.NOT_SETTINGS  # the one table, metaloss.keys
# Seed-like keys: replicates of one setting (seed, seeds=N, task.seed, task.data_seed,
# hypergrad.seed), but not meta_test.seeds (how many seeds the meta-test uses is part of the
# protocol).
_SEED_KEY = re.compile(r"(?:^seeds|(?:^|[._])seed)\Z")
# step axis per key prefix: define_metric plots these against the outer step, not W&B's _step
_STEP_AXES = {"meta/": "meta/step", "meta_test/": "meta/step"}
LOSS_ARTIFACT_TYPE = "learned-loss"


class NullLogger:
    run_dir: Path | None = None

    def learned_loss(self, path: Path, meta: dict[str, Any]) -> str | None:
        return None

    def log(self, metrics: dict[str, Any], step: int | None = None) -> None:
        pass

    def image(self, key: str, path: Path, step: int | None = None) -> None:
        pass

    def table(self, key: str, columns: list[str], rows: list[list[Any]]) -> None:
        pass

    def summary(self, metrics: dict[str, Any]) -> None:
        pass


class WandbLogger(NullLogger):
    def __init__(self, run) -> None:
        self.run = run
        self.run_dir = Path(run.dir).parent if run.dir else None

    def log(self, metrics, step=None):
        metrics = dict(metrics)
        if step is not None:  # the step axis rides along in the row that W&B plots against it
            for prefix, axis in _STEP_AXES.items():
                if any(k.startswith(prefix) for k in metrics):
                    metrics.setdefault(axis, step)
        self.run.log(metrics, step=step)

    def image(self, key, path, step=None):
        import wandb

        self.log({key: wandb.Image(str(path))}, step=step)

    def table(self, key, columns, rows):
        import wandb

        self.run.log({key: wandb.Table(columns=columns, data=rows)})

    def summary(self, metrics):
        for k, v in metrics.items():
            self.run.summary[k] = v

    def learned_loss(self, path, meta):
        """Log a learned-loss file (and its picture ``learned_loss.png`` beside it, when drawn)
        as a ``learned-loss`` artifact; return the reference that fetches it back once the
        run is on a server (offline: after ``wandb sync``). Never fails the run: the file is
        already saved; a logging problem is a warning."""
        import wandb

        path = Path(path)
        complete = bool(meta.get("complete", True))
        name = _slug(
            f"learned-loss-{meta.get('loss_name') or 'loss'}-{meta.get('task') or 'task'}"
            + ("" if complete else "-last-good")
        )
        alias = f"run-{self.run.id}"  # exactly this run's file, whatever version W&B gives it
        try:
            art = wandb.Artifact(
                name, type=LOSS_ARTIFACT_TYPE, metadata=json.loads(json.dumps(meta, default=str))
            )
            art.add_file(str(path), name=path.name)
            png = path.parent / "learned_loss.png"
            if png.is_file():
                art.add_file(str(png), name=png.name)
            self.run.log_artifact(
                art, aliases=["latest", alias]
            )  # the last good φ has its own name
        except Exception as e:
            log.warning(
                "could not log %s as a W&B artifact (%s: %s); the file itself is saved",
                path,
                type(e).__name__,
                e,
            )
            return None
        entity = f"{self.run.entity}/" if getattr(self.run, "entity", "") else ""
        ref = f"wandb-artifact://{entity}{self.run.project}/{name}:{alias}"
        log.info(
            "%s logged as W&B artifact %s (%s)",
            path.name,
            ref,
            "upload it with `wandb sync` to use it elsewhere"
            if getattr(self.run, "offline", True)
            else "usable as loss_path",
        )
        return ref


@contextmanager
def open_logger(cfg: DictConfig, out_dir: Path, *, job_type: str, name: str | None = None):
    """Yield a logger for this run and always finish it (also on error)."""
    lcfg = cfg.get("logger") or {"kind": "none"}
    if lcfg.get("kind", "none") == "none":
        yield NullLogger()
        return
    run = _init_wandb(
        lcfg,
        out_dir,
        dict(
            project=_setting(lcfg, "project"),
            entity=_setting(lcfg, "entity"),
            group=lcfg.get("group") or default_group(cfg, _hydra_runtime(out_dir)),
            tags=list(lcfg.get("tags") or []),
            dir=str(wandb_root(lcfg, out_dir)),
            name=name,
            job_type=job_type,
            config=OmegaConf.to_container(cfg, resolve=True),
        ),
    )
    exit_code = 0
    try:
        _define_metrics(run)
        yield WandbLogger(run)
    except BaseException:
        exit_code = 1
        raise
    finally:
        run.finish(exit_code=exit_code)


def _define_metrics(run) -> None:
    for axis in sorted(set(_STEP_AXES.values())):
        run.define_metric(axis)
    for prefix, axis in _STEP_AXES.items():
        run.define_metric(prefix + "*", step_metric=axis)


def default_group(cfg: DictConfig, hydra: tuple[list[str], dict[str, Any]] | None = None) -> str:
    """The W&B group of a run: the seeds of one setting share it, different settings do not.

    With Hydra's runtime (``hydra``: the job's command-line overrides and its config-group
    choices): the experiment name, if any, then the overrides that are settings, sorted
    (``ml3_sine,meta.steps=50``; ``loss=huber,task=outliers``). Seed-like overrides and those
    that do not change the result (logger, progress, threads, ...) are left out, so
    ``-m seed=0,1,2`` puts its jobs in one group. With no such overrides, or without Hydra's
    runtime (a config composed in a test), a name from the config: the loss and task
    targets plus a hash of every setting but the seeds. ``logger.group`` overrides both."""
    if hydra is not None:
        overrides, choices = hydra
        experiment = choices.get("experiment")
        kept = sorted(
            o
            for o in overrides
            if _is_setting(_override_key(o)) and _override_key(o) != "experiment"
        )
        parts = ([str(experiment)] if experiment else []) + kept
        if parts:
            return _fit(",".join(parts))
    from metaloss.runs import fingerprint, identity

    ident = {k: v for k, v in identity(cfg, ignore=_NOT_SETTINGS).items() if _is_setting(k)}

    def short(node: str) -> str:
        return str((cfg.get(node) or {}).get("_target_", node)).rsplit(".", 1)[-1]

    return _fit(f"{short('loss')}-{short('task')}-{fingerprint(ident)[:8]}")


def _override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def _is_setting(key: str) -> bool:
    return not _SEED_KEY.search(key) and not any(
        key == p or key.startswith(p + ".") or key.startswith(p + "/") for p in _NOT_SETTINGS
    )


def _fit(name: str, limit: int = GROUP_MAXLEN) -> str:
    """``name``, or a prefix of it plus a hash of the whole when it is too long for W&B."""
    if len(name) <= limit:
        return name
    return f"{name[: limit - 9]}~{hashlib.sha256(name.encode()).hexdigest()[:8]}"


def _slug(name: str) -> str:
    return _fit(re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-"))


def _hydra_runtime(out_dir: Path) -> tuple[list[str], dict[str, Any]] | None:
    """(overrides, choices) of the Hydra job writing to ``out_dir``; None without Hydra's
    runtime, or when the runtime left in this process belongs to another job's directory."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    hc = HydraConfig.get()
    try:
        if Path(hc.runtime.output_dir).resolve() != Path(out_dir).resolve():
            return None
        return list(hc.overrides.task), dict(hc.runtime.choices)
    except Exception:  # a partial runtime (e.g. composed with return_hydra_config)
        return None


class _Quiet(TypedDict):
    """The ``wandb.Settings`` that keep W&B's own output out of the run's console."""

    silent: bool
    console: Literal["off"]


class _Url(TypedDict, total=False):
    """``wandb.Settings(base_url=...)``, passed only when the config or environment chose it."""

    base_url: str


def _init_wandb(lcfg, out_dir: Path, init_args: dict):
    """``wandb.init`` in the configured mode; online falls back to offline rather than
    failing or hanging the run when the server or the credentials are missing."""
    import wandb

    quiet: _Quiet = {"silent": True, "console": "off"}
    mode, timeout = _mode(lcfg), _init_timeout(lcfg)
    if mode in _LOCAL_MODES:
        # W&B accepts any mode its Settings does ("dryrun" too); its annotation of
        # init(mode=) lists fewer, and the mode here is a config string it validates.
        return wandb.init(
            mode=mode,  # type: ignore[arg-type]
            settings=wandb.Settings(**quiet),
            **init_args,
        )
    base_url, explicit = _base_url(lcfg)
    reason = _why_not_online(base_url, timeout)
    if reason is None:
        # Pass the URL we probed: W&B reads WANDB_BASE_URL only once per process.
        url: _Url = {"base_url": base_url} if explicit else {}
        try:
            return wandb.init(
                mode=mode,  # type: ignore[arg-type]  # a config string W&B validates (above)
                settings=wandb.Settings(init_timeout=timeout, **url, **quiet),
                **init_args,
            )
        except Exception as e:  # CommError on timeout, AuthenticationError, UsageError, ...
            first_line = (str(e).strip().splitlines() or [""])[0]
            reason = f"wandb.init failed: {type(e).__name__}: {first_line}"
    log.warning(
        "W&B %s mode is unavailable (%s); logging this run offline instead. "
        "Upload it later with `wandb sync %s/wandb/offline-run-*`.",
        mode,
        reason,
        init_args.get("dir", out_dir),
    )
    tags = [*init_args["tags"], FALLBACK_TAG]
    return wandb.init(
        mode="offline", settings=wandb.Settings(**quiet), **{**init_args, "tags": tags}
    )


# W&B's own environment variables for the settings of conf/logger/wandb.yaml, and metaloss's
# defaults where W&B's differ (offline: no account needed; runs inside the run's directory).
# The YAML reads them with ${oc.env:...}; _setting applies the same precedence to a logger
# config that lacks the key (one composed in code, or a user's own logger YAML):
#   explicit config value  >  environment variable  >  default.
ENV_SETTINGS = {
    "mode": ("WANDB_MODE", "offline"),
    "project": ("WANDB_PROJECT", "metaloss"),
    "entity": ("WANDB_ENTITY", None),
    "dir": ("WANDB_DIR", None),
}


def _setting(lcfg, key: str) -> Any:
    value = lcfg.get(key)
    if value is not None and value != "":
        return value
    var, default = ENV_SETTINGS[key]
    return os.environ.get(var) or default


def wandb_root(lcfg, out_dir: Path) -> Path:
    """The directory whose ``wandb/`` subdirectory holds this run's W&B files: ``logger.dir``
    (default $WANDB_DIR, W&B's meaning), else the run's own output directory."""
    chosen = _setting(lcfg, "dir")
    if not chosen:
        return Path(out_dir)
    root = Path(str(chosen)).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)  # W&B expects it to exist
    return root


_MODE_ALIASES = {
    "dryrun": "offline",
    "run": "online",
}  # what W&B itself takes them for (WANDB_MODE)


def _mode(lcfg) -> str:
    mode = str(_setting(lcfg, "mode"))
    return _MODE_ALIASES.get(mode, mode)


def _init_timeout(lcfg) -> float:
    value = lcfg.get("init_timeout", DEFAULT_INIT_TIMEOUT_S)
    try:
        timeout = float(DEFAULT_INIT_TIMEOUT_S if value is None else value)
    except (TypeError, ValueError):
        timeout = -1.0
    if not timeout > 0:
        raise ValueError(f"logger.init_timeout must be a positive number of seconds, got {value!r}")
    return timeout


def _base_url(lcfg) -> tuple[str, bool]:
    """(server URL, whether the config or environment chose it): config key ``base_url``,
    then WANDB_BASE_URL, then what W&B itself resolved (its settings files)."""
    chosen = lcfg.get("base_url") or os.environ.get("WANDB_BASE_URL")
    if chosen:
        return str(chosen).rstrip("/"), True
    try:  # private API: a `wandb login --host` saved in W&B's settings file
        from wandb.sdk import wandb_setup

        return str(wandb_setup.singleton().settings.base_url or DEFAULT_BASE_URL), False
    except Exception:
        return DEFAULT_BASE_URL, False


def _why_not_online(base_url: str, timeout: float) -> str | None:
    """Why an online run cannot start (None: it may). Checked before ``wandb.init``,
    which would prompt for a missing key on a terminal and retry an unreachable server."""
    if not _has_credentials(base_url):
        return f"no W&B API key for {base_url} (set WANDB_API_KEY or run `wandb login`)"
    return _unreachable(base_url, timeout)


def _has_credentials(base_url: str) -> bool:
    """The places W&B reads a key from, looked up without prompting and without writing
    W&B's settings (``wandb.login`` would save the host there)."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    if _netrc_password(urlsplit(base_url).netloc):
        return True
    try:  # private API: a key from wandb.login(key=...) in this process or a settings file
        from wandb.sdk import wandb_setup
        from wandb.sdk.lib import wbauth

        if wbauth.session_credentials(host=base_url) is not None:
            return True
        settings = wandb_setup.singleton().settings
        return bool(settings.api_key) and settings.base_url.rstrip("/") == base_url
    except Exception:
        return False


def _netrc_password(machine: str) -> str | None:
    path = os.environ.get("NETRC") or next(
        (p for p in ("~/.netrc", "~/_netrc") if Path(p).expanduser().exists()), None
    )
    if not path or not machine:
        return None
    try:
        entry = netrc.netrc(str(Path(path).expanduser())).authenticators(machine)
    except (OSError, netrc.NetrcParseError):
        return None
    return entry[2] if entry else None


def _unreachable(base_url: str, timeout: float) -> str | None:
    """Why a TCP connection to the server (or to the proxy W&B would use) fails, or None.

    The connect runs in a daemon thread because name resolution ignores socket timeouts:
    a dead DNS server could otherwise hold the run longer than ``timeout``.
    """
    host, port = _connect_target(base_url)
    if not host:
        return f"cannot parse the W&B server address {base_url!r}"
    outcome: list[BaseException | None] = []

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            outcome.append(None)
        except Exception as e:  # OSError, or a host name the IDNA codec rejects
            outcome.append(e)

    probe = threading.Thread(target=connect, name="wandb-probe", daemon=True)
    probe.start()
    probe.join(timeout)
    if not outcome:
        return f"no answer from {host}:{port} within {timeout:g} s"
    if outcome[0] is not None:
        return f"cannot connect to {host}:{port}: {outcome[0]}"
    return None


def _connect_target(base_url: str) -> tuple[str | None, int]:
    """(host, port) a connection to ``base_url`` opens first: the proxy if one applies."""
    parts = urlsplit(base_url)
    proxy = urllib.request.getproxies().get(parts.scheme)
    if proxy and parts.hostname and not urllib.request.proxy_bypass(parts.hostname):
        parts = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:  # a port outside 0-65535
        return None, 0
    return parts.hostname, port


def write_json(path: Path, obj: Any) -> None:
    """Atomic, strict JSON write (NaN/inf as null): readers never see a half-written file,
    writers never share a temp file."""
    from metaloss.report import jsonable

    atomic_write_text(path, json.dumps(jsonable(obj), indent=2, sort_keys=True, allow_nan=False))

"""Run logging for the entry points: Weights & Biases (offline by default) or nothing.

The library returns metric dicts; only entry points hand them to a logger. The W&B run
lives inside the Hydra output directory, so `wandb sync <outdir>/wandb/offline-run-*`
uploads it later.

Online mode never costs a run: when the W&B server cannot be reached (a quick TCP probe,
then ``wandb.init`` under ``logger.init_timeout`` seconds) or no API key is configured,
the run logs offline instead, with a warning, and can be synced later.
"""

from __future__ import annotations

import json
import logging
import netrc
import os
import socket
import threading
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from omegaconf import DictConfig, OmegaConf

from metaloss.runs import atomic_write_text

log = logging.getLogger("metaloss")

DEFAULT_BASE_URL = "https://api.wandb.ai"
DEFAULT_INIT_TIMEOUT_S = 10.0  # W&B's own default (90 s) stalls every run of a sweep when offline
FALLBACK_TAG = "offline-fallback"
_LOCAL_MODES = frozenset({"offline", "dryrun", "disabled"})  # modes that need no server


class NullLogger:
    run_dir: Path | None = None

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
        self.run.log(dict(metrics), step=step)

    def image(self, key, path, step=None):
        import wandb

        self.run.log({key: wandb.Image(str(path))}, step=step)

    def table(self, key, columns, rows):
        import wandb

        self.run.log({key: wandb.Table(columns=columns, data=rows)})

    def summary(self, metrics):
        for k, v in metrics.items():
            self.run.summary[k] = v


@contextmanager
def open_logger(cfg: DictConfig, out_dir: Path, *, job_type: str, name: str | None = None):
    """Yield a logger for this run and always finish it (also on error)."""
    lcfg = cfg.get("logger") or {"kind": "none"}
    if lcfg.get("kind", "none") == "none":
        yield NullLogger()
        return
    run = _init_wandb(lcfg, out_dir, dict(
        project=lcfg.get("project", "metaloss"),
        entity=lcfg.get("entity"),
        group=lcfg.get("group"),
        tags=list(lcfg.get("tags") or []),
        dir=str(out_dir),
        name=name,
        job_type=job_type,
        config=OmegaConf.to_container(cfg, resolve=True),
    ))
    exit_code = 0
    try:
        yield WandbLogger(run)
    except BaseException:
        exit_code = 1
        raise
    finally:
        run.finish(exit_code=exit_code)


def _init_wandb(lcfg, out_dir: Path, init_args: dict):
    """``wandb.init`` in the configured mode; online falls back to offline rather than
    failing or hanging the run when the server or the credentials are missing."""
    import wandb

    quiet = dict(silent=True, console="off")
    mode, timeout = _mode(lcfg), _init_timeout(lcfg)
    if mode in _LOCAL_MODES:
        return wandb.init(mode=mode, settings=wandb.Settings(**quiet), **init_args)
    base_url, explicit = _base_url(lcfg)
    reason = _why_not_online(base_url, timeout)
    if reason is None:
        # Pass the URL we probed: W&B reads WANDB_BASE_URL only once per process.
        url = {"base_url": base_url} if explicit else {}
        try:
            return wandb.init(mode=mode, settings=wandb.Settings(init_timeout=timeout, **url, **quiet),
                              **init_args)
        except Exception as e:  # CommError on timeout, AuthenticationError, UsageError, ...
            first_line = (str(e).strip().splitlines() or [""])[0]
            reason = f"wandb.init failed: {type(e).__name__}: {first_line}"
    log.warning("W&B %s mode is unavailable (%s); logging this run offline instead. "
                "Upload it later with `wandb sync %s/wandb/offline-run-*`.",
                mode, reason, out_dir)
    tags = [*init_args["tags"], FALLBACK_TAG]
    return wandb.init(mode="offline", settings=wandb.Settings(**quiet), **{**init_args, "tags": tags})


def _mode(lcfg) -> str:
    mode = lcfg.get("mode", "offline")
    return mode if mode is not None else os.environ.get("WANDB_MODE", "online")


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
        (p for p in ("~/.netrc", "~/_netrc") if Path(p).expanduser().exists()), None)
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
    """Atomic JSON write: readers never see a half-written file, writers never share a temp file."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True))

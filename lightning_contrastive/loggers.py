"""Weights & Biases logging that works on a machine with no W&B account and no network: offline, not failing."""

from __future__ import annotations

import netrc
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pytorch_lightning.loggers import WandbLogger
from pytorch_lightning.utilities import rank_zero_info

DEFAULT_WANDB_HOST = "https://api.wandb.ai"


def wandb_credentials_found() -> bool:
    """Whether ``wandb.init`` would find credentials for its server without prompting, checked without network.

    Looks where wandb looks: ``WANDB_API_KEY`` or ``WANDB_IDENTITY_TOKEN_FILE`` in the environment, then the
    netrc entry that ``wandb login`` writes for the host of ``WANDB_BASE_URL`` (default ``api.wandb.ai``), in
    ``$NETRC``, else ``~/.netrc`` (``~/_netrc`` on Windows). An unreadable netrc counts as no credentials, as in wandb.
    """
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlsplit(os.environ.get("WANDB_BASE_URL", DEFAULT_WANDB_HOST)).netloc
    try:
        entry = netrc.netrc(_netrc_path()).authenticators(host)
    except (OSError, netrc.NetrcParseError):
        return False
    return entry is not None and bool(entry[2])


def _netrc_path() -> Path:
    """The netrc file wandb reads: ``$NETRC``, else ``~/.netrc``, else ``~/_netrc``, else the platform's usual one."""
    if explicit := os.environ.get("NETRC"):
        return Path(explicit).expanduser()
    unix, windows = Path("~/.netrc").expanduser(), Path("~/_netrc").expanduser()
    if unix.exists():
        return unix
    if windows.exists():
        return windows
    return windows if os.name == "nt" else unix


class OfflineFallbackWandbLogger(WandbLogger):
    """Lightning's ``WandbLogger`` that logs offline, instead of failing, when W&B has no credentials.

    Online ``wandb.init`` stops at once without an API key, and a fresh machine without network cannot
    log in. This logger picks the mode just before the run starts:

    - ``WANDB_MODE`` set in the environment (``online``, ``offline``, ``disabled``, ...) is obeyed as is: the user's
      choice always wins; so are ``offline=True`` and an explicit ``mode=...`` argument;
    - otherwise the run is online when :func:`wandb_credentials_found`, and offline when not; the fallback is
      announced once, on rank zero, in one line that gives the ``wandb sync <dir>`` command that uploads the run later.

    The check needs no network. Every argument is ``WandbLogger``'s (``project``, ``name``, ``save_dir``, ...).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self._wandb_init.get("anonymous") is None:  # wandb 0.31 warns about the key even when None
            del self._wandb_init["anonymous"]
        self.fell_back_to_offline = False

    @property
    def experiment(self) -> Any:
        """The wandb run, started offline when nobody chose a mode and no credentials are found."""
        starting = self._experiment is None
        if starting and not self._mode_chosen_by_user() and not wandb_credentials_found():
            self._wandb_init["mode"] = "offline"
            self.fell_back_to_offline = True
        if starting and self._save_dir is not None:  # wandb would create it too, after warning that it is missing
            Path(self._save_dir).mkdir(parents=True, exist_ok=True)
        run = super().experiment
        if starting and self.fell_back_to_offline and self._experiment is not None:
            rank_zero_info(
                "wandb: no API key found (WANDB_API_KEY or `wandb login`), so this run logs offline; "
                f"upload it later with: wandb sync {run.settings.sync_dir}"
            )
        return run

    def _mode_chosen_by_user(self) -> bool:
        return "WANDB_MODE" in os.environ or self._offline or self._wandb_init.get("mode") is not None

"""Hugging Face hub ids and bucket URLs where a model or tokenizer directory is expected: ``org/name``
(``org/name@revision``) that is not a local path is downloaded with ``huggingface_hub`` into its cache
(``$HF_HOME``) and read from there; ``gs://bucket/model`` is downloaded into fusion_jax's cache
(:func:`fusion_jax.files.local_copy`), again only what changed.

Offline (``HF_HUB_OFFLINE=1``), a snapshot already in the cache is used; anything else fails at once with an error
that names the setting, ``HF_HUB_OFFLINE`` and how to pass a local directory instead. An unreachable hub fails the
same way (huggingface_hub gives up on a refused or unresolvable connection at once; ``HF_HUB_ETAG_TIMEOUT`` bounds a
silent one).
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

from fusion_jax.errors import ConfigError
from fusion_jax.files import check_url, is_url, local_copy

# The config fields that name a model or tokenizer directory (in any section, lists of sections included).
MODEL_FIELDS = ("target", "target_tokenizer", "checkpoint", "tokenizer", "source")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")


def is_hub_id(spec: str) -> bool:
    """`spec` names a hub repository: ``org/name`` or ``org/name@revision``, and no local file or directory."""
    return bool(_HUB_ID.match(spec)) and not Path(spec).expanduser().exists() and ".." not in spec


def resolve(spec: str, setting: str) -> str:
    """A local path for `spec`: itself when it is a local path, the hub snapshot's directory for a hub id (downloaded
    when online; from the cache when offline), a local copy for a bucket URL. `setting` names the config key for the
    error."""
    if spec and is_url(spec):
        check_url(setting, spec)
        try:
            return str(local_copy(spec))
        except FileNotFoundError:
            raise ConfigError(f"{setting}={spec!r}: no such file or directory in the bucket; check the path") from None
    if not spec or not is_hub_id(spec):
        return spec
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError, \
        RevisionNotFoundError

    repo, _, revision = spec.partition("@")
    offline = constants.is_offline_mode()  # HF_HUB_OFFLINE, read when huggingface_hub was imported
    try:
        return snapshot_download(repo, revision=revision or None)
    except (RepositoryNotFoundError, RevisionNotFoundError) as e:
        raise ConfigError(f"{setting}={spec!r}: no such model on the Hugging Face hub, and no such local file or "
                          f"directory ({type(e).__name__}); check the id, or give a local directory") from None
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as e:
        why = ("HF_HUB_OFFLINE is set and the model is not in the hub cache" if offline else
               f"the hub could not be reached ({str(e).splitlines()[0][:160]})")
        raise ConfigError(
            f"{setting}={spec!r} is not a local file or directory, so it was taken as a Hugging Face hub id, but "
            f"{why}. Either download it where the hub is reachable (unset HF_HUB_OFFLINE; `huggingface-cli download "
            f"{repo}` fills the cache that offline runs read), or pass a local directory: {setting}=/path/to/model"
        ) from None


def resolve_config(cfg: Any, prefix: str = "") -> Any:
    """`cfg` (a config dataclass) with every hub id or bucket URL in a :data:`MODEL_FIELDS` field, in any section or
    list of sections, replaced by its local directory."""
    if not dataclasses.is_dataclass(cfg):
        return cfg
    changes = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        key = f"{prefix}{f.name}"
        if f.name in MODEL_FIELDS and isinstance(value, str):
            resolved = resolve(value, key)
        elif dataclasses.is_dataclass(value):
            resolved = resolve_config(value, key + ".")
        elif isinstance(value, tuple) and any(dataclasses.is_dataclass(v) for v in value):
            resolved = tuple(resolve_config(v, f"{key}[{i}].") for i, v in enumerate(value))
        else:
            continue
        if resolved is not value and resolved != value:
            changes[f.name] = resolved
    return dataclasses.replace(cfg, **changes) if changes else cfg

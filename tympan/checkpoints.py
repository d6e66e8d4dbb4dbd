"""Reading, converting, saving and downloading checkpoints.

Two layouts load:

* official checkpoints as their repos release them (``torch.save`` files): a plain state dict, one wrapped
  in ``{"model": ..., "config": ...}`` / ``{"state_dict": ...}``, with or without DataParallel's ``module.``
  prefix; each family's ``convert_checkpoint`` maps their key names onto ours;
* tympan's own ``*.safetensors`` with a ``*.json`` sidecar (``{"model_id": ..., "config": {...}}``).

Pickles are always read with ``torch.load(weights_only=True)``: no code is ever unpickled. A container that also
pickles other Python objects (SSAM's ``args``: an ``argparse.Namespace`` holding an ``ml_collections`` config),
which weights-only loading refuses, is read again by an unpickler that resolves the same allow-list and turns every
other class into an inert placeholder: its tensors load, and still nothing from the file runs. The records torch
reads around the data of a legacy (non-zip) file go through an unpickler that resolves no global at all.

Sidecars are validated (:func:`read_sidecar`, :func:`validate_config`): a stored config can only set the registered
model's own keys, with values of their type, at sizes checked on the meta device before anything is allocated.
Weights shipped inside the package (``package://``) resolve offline with their SHA-256 checked.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import tempfile
import types
import urllib.request
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from tympan.errors import CheckpointError
from tympan.labels import LabelSet
from tympan.models.registry import DEFAULT_MODEL, StateDict, Weights, create_model, get_model_entry

logger = logging.getLogger(__name__)

SAFETENSORS_SUFFIX = ".safetensors"
PACKAGE_SCHEME = "package://"  # weights shipped as package data: package://tympan/assets/NAME
_CONTAINER_KEYS = ("model", "state_dict", "model_state_dict", "module", "net")




def cache_dir() -> Path:
    """Where downloaded weights live: :func:`tympan.files.cache_root` (``$TYMPAN_CACHE`` or ``~/.cache/tympan``)."""
    from tympan.files import cache_root

    return cache_root()


def sidecar_path(path: str | os.PathLike) -> Path:
    """The JSON config written beside one of our safetensors files."""
    return Path(path).with_suffix(".json")


def read_checkpoint(path: str | os.PathLike) -> tuple[StateDict, dict[str, Any]]:
    """Load the tensors of a checkpoint file and any metadata found beside them.

    Returns ``(state_dict, meta)``: the state dict has containers and ``module.`` prefixes removed; ``meta``
    holds our sidecar's ``model_id``/``config`` for safetensors files, or an official container's non-tensor
    entries (e.g. Dasheng's ``config``) under ``"container"``.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    meta: dict[str, Any] = {}
    if path.suffix == SAFETENSORS_SUFFIX:
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except Exception as err:  # safetensors raises its own error types
            raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from None
        side = sidecar_path(path)
        if side.is_file():
            meta = read_sidecar(side)
        return state, meta
    unreadable = f"{path}: cannot be read as a weights-only torch checkpoint"
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "Unsupported global" not in str(err):
            raise CheckpointError(f"{unreadable} ({_first_line(err)})") from None
        obj = load_tensors_only(path)  # other pickled objects beside the tensors: read them as inert placeholders
    except Exception as err:
        raise CheckpointError(f"{unreadable} ({_first_line(err)})") from None
    state, container = unwrap_state_dict(obj, path)
    if container:
        meta["container"] = container
    return state, meta


_SIDECAR_TYPES: dict[str, type | tuple[type, ...]] = {"model_id": str, "config": dict, "labels": dict, "extra": dict}


def read_sidecar(path: str | os.PathLike) -> dict[str, Any]:
    """Our JSON sidecar: ``model_id``, ``config`` and optionally ``labels`` (``{"mids": [...], "names": [...]}``)
    and ``extra`` (what a trained model needs besides weights: frontend settings, clip length, its recipe).

    Anything malformed is one :class:`CheckpointError` naming the file and the key; keys this version does not know
    are ignored with a warning, so newer files still load.
    """
    try:
        meta = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: not a readable JSON sidecar ({_first_line(err)})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: the sidecar must be a JSON object, not {type(meta).__name__}")
    for key, value in meta.items():
        expected = _SIDECAR_TYPES.get(key)
        if expected is None:
            logger.warning("%s: unknown sidecar key %r ignored", path, key)
        elif not isinstance(value, expected):
            raise CheckpointError(f"{path}: sidecar key {key!r} must be a {expected.__name__}, not {type(value).__name__}")
    if "labels" in meta:
        labels = meta["labels"]
        mids, names = labels.get("mids"), labels.get("names")
        if not (isinstance(mids, list) and isinstance(names, list) and len(mids) == len(names)
                and all(isinstance(x, str) for x in mids + names)):
            raise CheckpointError(f"{path}: sidecar key 'labels' must hold equally long string lists 'mids' and 'names'")
    return meta


def validate_config(model_id: str, config: Mapping[str, Any], source: str) -> None:
    """Refuse a stored config the registered model does not take (unknown keys, values unlike the registered ones,
    sizes past the limit counted on the meta device): :func:`tympan.models.registry.check_config`, as one
    :class:`CheckpointError` naming the file."""
    from tympan.errors import ConfigError
    from tympan.models.registry import check_config

    try:
        check_config(model_id, config, "config")
    except ConfigError as err:
        raise CheckpointError(f"{source}: {err}") from None


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


class _Inert(dict):
    """Stands in for any pickled object outside torch's weights-only allow-list: holds nothing, runs nothing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__()

    def __setitem__(self, key: Any, value: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass

    def __call__(self, *args: Any, **kwargs: Any) -> "_Inert":  # a placeholder function's result is one too
        return _Inert()

    def append(self, value: Any) -> None:
        pass

    def extend(self, values: Any) -> None:
        pass


def _tensors_only_unpickler(skipped: set[str]) -> type[pickle.Unpickler]:
    """An unpickler resolving only the globals ``torch.load(weights_only=True)`` allows; every other class becomes
    inert (its name recorded in `skipped`)."""
    from torch._weights_only_unpickler import _get_allowed_globals

    allowed = _get_allowed_globals()

    class TensorsOnlyUnpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            if f"{module}.{name}" in allowed:
                return super().find_class(module, name)
            skipped.add(f"{module}.{name}")
            return type(name, (_Inert,), {})

    return TensorsOnlyUnpickler


class _PlainDataUnpickler(pickle.Unpickler):
    """Reads pickles of plain data only (numbers, strings, lists, dicts): any global at all is refused."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"a checkpoint header record names {module}.{name}")


def _plain_data_load(file: Any, **kwargs: Any) -> Any:
    """What torch reads with ``pickle_module.load``: the records around the data of a legacy (non-zip) file (magic
    number, protocol, system info, storage keys). They hold plain data, so none may name a class or function;
    an inert placeholder there would silently leave storages unread."""
    return _PlainDataUnpickler(file, **kwargs).load()


def load_tensors_only(path: str | os.PathLike) -> Any:
    """``torch.load`` of a checkpoint whose extra pickled objects weights-only loading refuses: the objects it
    allows load as usual, every other one becomes an empty placeholder, so no class or function of the file is
    ever imported or called."""
    skipped: set[str] = set()
    unpickler = _tensors_only_unpickler(skipped)

    pickle_module = types.SimpleNamespace(Unpickler=unpickler, load=_plain_data_load, __name__="tensors_only")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False, pickle_module=pickle_module)
    except Exception as err:  # any unreadable file: one line naming it
        raise CheckpointError(f"{path}: cannot be read as a torch checkpoint ({_first_line(err)})") from None
    logger.info("%s: pickled objects left out (tensors only): %s", path, ", ".join(sorted(skipped)))
    return obj


def unwrap_state_dict(obj: Any, path: str | os.PathLike = "<checkpoint>") -> tuple[StateDict, dict[str, Any]]:
    """Find the state dict inside an official container and strip DataParallel/DDP prefixes."""
    container: dict[str, Any] = {}
    while isinstance(obj, Mapping) and not _is_state_dict(obj):
        key = next((k for k in _CONTAINER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if key is None:
            raise CheckpointError(f"{path}: no state dict found (top-level keys: {', '.join(map(str, list(obj)[:8]))})")
        container.update({k: v for k, v in obj.items() if k != key and not isinstance(v, torch.Tensor)})
        obj = obj[key]
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a state dict, found {type(obj).__name__}")
    state = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    return strip_prefix(state, "module."), container


def _is_state_dict(obj: Mapping) -> bool:
    return len(obj) > 0 and all(isinstance(v, torch.Tensor) for v in obj.values())


def strip_prefix(state: StateDict, prefix: str) -> StateDict:
    """Remove ``prefix`` from every key when all keys carry it (DataParallel, DDP, torch.compile)."""
    if state and all(k.startswith(prefix) for k in state):
        return {k[len(prefix):]: v for k, v in state.items()}
    return state


def load_state_dict_strict(model: nn.Module, state: StateDict, source: str = "checkpoint") -> None:
    """Load ``state`` into ``model``; every missing, unexpected or mis-shaped key is named in the error."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = sorted(
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in set(own) & set(state)
        if own[k].shape != state[k].shape
    )
    if missing or unexpected or mismatched:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", mismatched)):
            if keys:
                shown = ", ".join(keys[:12]) + (f", ... ({len(keys)} in all)" if len(keys) > 12 else "")
                parts.append(f"{label} keys: {shown}")
        raise CheckpointError(f"{source} does not fit {type(model).__name__}: " + "; ".join(parts))
    model.load_state_dict(state, strict=True)


def load(model_id: str | None = None, checkpoint: str | os.PathLike | None = None, **overrides: Any) -> nn.Module:
    """Build ``model_id`` and load weights into it; returns the model in eval mode.

    Without arguments: the shipped default model (:data:`tympan.models.DEFAULT_MODEL`), offline.

    ``checkpoint`` is a local file in an official layout or our safetensors; without it the registered
    official weights are downloaded (once) into :func:`cache_dir`. ``model_id`` may also be the path of
    one of our safetensors files, whose sidecar names the model. ``overrides`` change the config
    (e.g. ``num_classes=10``, ``input_tdim=512``); the family's converter adapts official weights to it
    the way the original code does (positional-embedding cuts and interpolation, for instance).
    """
    if model_id is None and checkpoint is None:
        model_id = DEFAULT_MODEL
    if checkpoint is None and str(model_id).endswith(SAFETENSORS_SUFFIX):
        checkpoint, model_id = model_id, None
    if checkpoint is None:
        entry = get_model_entry(model_id)
        if entry.weights is None:
            raise CheckpointError(f"{model_id} has no official weights: give a checkpoint (--checkpoint PATH on the "
                                  "command line, checkpoint=PATH in Python), or train one with 'tympan train'")
        checkpoint = download(entry.weights)
    state, meta = read_checkpoint(checkpoint)
    if model_id is None:
        model_id = meta.get("model_id")
        if model_id is None:
            raise CheckpointError(f"{checkpoint}: no sidecar {sidecar_path(checkpoint).name} naming the model id")
    entry = get_model_entry(model_id)
    stored = dict(meta.get("config", {})) if meta.get("model_id") == model_id else {}
    if not stored and not meta.get("model_id"):  # an official container's own config (Dasheng.from_pretrained's)
        stored = _container_config(entry, meta.get("container", {}).get("config"))
    if stored:
        validate_config(model_id, stored, str(sidecar_path(checkpoint)))
    config = {**stored, **overrides}
    model = create_model(model_id, **config)
    if "labels" in meta:
        model.labels = LabelSet(tuple(meta["labels"]["mids"]), tuple(meta["labels"]["names"]))
    if "extra" in meta:
        model.tympan_extra = dict(meta["extra"])
        _restore_frontend(model, model.tympan_extra.get("frontend"))
    if entry.convert_checkpoint is not None and not meta.get("model_id"):
        try:
            state = entry.convert_checkpoint(state, model)
        except KeyError as err:
            raise CheckpointError(f"{checkpoint}: not a {entry.family} checkpoint (no key {err})") from None
    load_state_dict_strict(model, state, source=str(checkpoint))
    return model.eval()


def _container_config(entry: Any, config: Any) -> dict[str, Any]:
    """The entries of an official checkpoint's stored constructor config that the family's builder takes (the others,
    e.g. Dasheng's fixed patch size, are not settings of ours)."""
    from tympan.models.registry import builder_settings

    if not isinstance(config, dict):
        return {}
    settings = builder_settings(entry)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in config.items() if k in settings}


def _restore_frontend(model: nn.Module, settings: Any) -> None:
    """Put back the scalar frontend settings a training run stored (``extra.frontend``: fbank mean/std...)."""
    frontend = getattr(model, "frontend", None)
    if not isinstance(settings, dict) or frontend is None:
        return
    for key, value in settings.items():
        current = getattr(frontend, key, None)
        if isinstance(value, (bool, int, float, str)) and isinstance(current, (bool, int, float, str)):
            setattr(frontend, key, type(current)(value) if not isinstance(current, bool) else bool(value))


def save(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write ``model``'s weights as safetensors plus a JSON sidecar that lets :func:`load` rebuild it."""
    from tympan.files import write_safetensors

    model_id = getattr(model, "tympan_id", None)
    if model_id is None:
        raise ValueError("only models built by tympan.create_model/tympan.load can be saved with their config")
    path = Path(path)
    if path.suffix != SAFETENSORS_SUFFIX:
        path = path.with_suffix(SAFETENSORS_SUFFIX)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    write_safetensors(path, state)
    meta: dict[str, Any] = {"model_id": model_id, "config": _jsonable(model.tympan_config)}
    labels = getattr(model, "labels", None)
    if isinstance(labels, LabelSet):
        meta["labels"] = {"mids": list(labels.mids), "names": list(labels.names)}
    if getattr(model, "tympan_extra", None):
        meta["extra"] = _jsonable(model.tympan_extra)
    _atomic_write(sidecar_path(path), lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=2)))
    return path


def _jsonable(config: Mapping[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}


def _atomic_write(path: Path, write) -> None:
    """Atomic replace with the mode of a plain open(), stale temporaries swept, OutputError when the disk is full."""
    from tympan.files import atomic_write

    atomic_write(path, write)


def sha256sum(path: str | os.PathLike, block: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def packaged_weights(weights: Weights) -> Path:
    """The file of weights shipped inside the package (``package://tympan/assets/NAME``), its SHA-256 checked.

    Never touches the network; a file whose checksum differs from the registered one (a damaged or swapped install)
    is refused rather than loaded.
    """
    from importlib import resources

    package, _, relative = weights.url[len(PACKAGE_SCHEME):].partition("/")
    try:
        resource = resources.files(package).joinpath(relative)
        path = Path(str(resource))
    except (ModuleNotFoundError, TypeError) as err:
        raise CheckpointError(f"{weights.url}: not a file of an installed package ({err})") from None
    if not path.is_file():
        raise CheckpointError(f"{weights.url}: missing from the installed package ({path}); reinstall tympan")
    if weights.sha256 is None:
        raise CheckpointError(f"{weights.url}: packaged weights must carry a SHA-256")
    if (got := sha256sum(path)) != weights.sha256:
        raise CheckpointError(f"{path}: checksum mismatch (expected {weights.sha256}, got {got}); reinstall tympan")
    return path


def download(weights: Weights, directory: str | os.PathLike | None = None, progress: bool = True) -> Path:
    """Fetch ``weights`` into the cache (once), verifying the SHA-256 when it is known.

    A cached file whose checksum does not match is fetched again; a download that does not match raises.
    Works for any URL scheme urllib knows (``https://``, ``file://``); ``package://`` weights are shipped with tympan
    and resolved offline (:func:`packaged_weights`).
    """
    from tqdm.auto import tqdm

    if weights.url.startswith(PACKAGE_SCHEME):
        return packaged_weights(weights)
    directory = Path(directory) if directory is not None else cache_dir()
    name = weights.filename or Path(urllib.request.urlparse(weights.url).path).name
    target = directory / name
    if target.is_file() and (weights.sha256 is None or sha256sum(target) == weights.sha256):
        return target
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(weights.url) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=name, disable=not progress) as bar:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    bar.update(len(chunk))
        if weights.sha256 is not None and (got := sha256sum(tmp)) != weights.sha256:
            raise CheckpointError(f"{weights.url}: checksum mismatch (expected {weights.sha256}, got {got})")
        os.replace(tmp, target)
    except OSError as err:
        raise CheckpointError(
            f"{weights.url}: download failed ({err}); offline, put the file at {target} or pass a local "
            "checkpoint (--checkpoint PATH); the default model needs no download"
        ) from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target

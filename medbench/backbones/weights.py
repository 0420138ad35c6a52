"""Finding and reading pre-trained weights, with or without network.

Order of lookup for a backbone's pre-trained weights:

1. ``--weights FILE`` (``.safetensors``, ``.pth``/``.pt``/``.bin`` read with
   ``torch.load(weights_only=True)``, or Google's BiT ``.npz``);
2. the local weights folder (``MEDBENCH_WEIGHTS``, default
   ``~/.cache/medbench/weights``): ``<backbone-name>.<suffix>``;
3. the Hugging Face cache (files downloaded earlier), without network;
4. a hub download, only after a network probe of at most a few seconds.

When none works the error says, in one line, which file to get and where to
put it, or to use ``--init random``.

Where the file came from (``file``, ``local weights folder``, ``hub cache``,
``hub download``) is recorded in the run's provenance. The CLI resolves the
weights once before any run and hands the runs the file's path, so a path
given back to :func:`resolve_weights_file` keeps the origin it was found
with in this process; in another process (a dispatched job) the origin is
read from where the file lies: the backbone's file in the local weights
folder, or the backbone's repository in the Hugging Face cache layout
(``models--ORG--NAME/snapshots/...``: ``hub cache``, also for a file a
preflight downloaded); any other path is ``file``.
"""

from __future__ import annotations

import json
import os
import socket
import threading
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

from medbench.errors import BackboneError
from medbench.paths import cache_dir, weights_dir
from medbench.utils import atomic_write_json, sha256_file

if TYPE_CHECKING:
    import torch
    from torch import nn

    from medbench.backbones.backbone import Backbone

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".npz")
HUB_FILENAMES = ("model.safetensors", "pytorch_model.bin")  # the default of Backbone.hub_filenames
NETWORK_PROBE_SECONDS = 3.0


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in {"1", "true", "yes", "on"}


def hub_offline() -> bool:
    return _truthy(os.environ.get("HF_HUB_OFFLINE")) or _truthy(os.environ.get("MEDBENCH_OFFLINE"))


def network_reachable(timeout: float = NETWORK_PROBE_SECONDS) -> bool:
    """Whether the hub's host accepts a TCP connection within ``timeout`` seconds (DNS included)."""
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    parsed = urlparse(endpoint)
    host = parsed.hostname or "huggingface.co"
    port = parsed.port or (443 if parsed.scheme != "http" else 80)
    result: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout + 0.5)  # getaddrinfo has no timeout of its own
    return bool(result and result[0])


def _cached_hub_file(hub_id: str, filenames: tuple[str, ...] = HUB_FILENAMES) -> Path | None:
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError:  # pragma: no cover - timm depends on huggingface_hub
        return None
    for filename in filenames:
        try:
            return Path(hf_hub_download(hub_id, filename, local_files_only=True))
        except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError):
            continue
        except Exception:  # an unexpected cache state is not worth a crash: try the next source
            continue
    return None


def _download_hub_file(hub_id: str, filenames: tuple[str, ...] = HUB_FILENAMES) -> Path:
    from huggingface_hub import hf_hub_download

    last: Exception | None = None
    for filename in filenames:
        try:
            return Path(hf_hub_download(hub_id, filename))
        except Exception as err:  # EntryNotFound for the first name is expected for some repos
            last = err
    raise BackboneError(f"download from the Hugging Face hub failed: {last}", where=f"hf-hub:{hub_id}")


def hub_file(hub_id: str, filenames: tuple[str, ...], *, help_line: str, field: str) -> tuple[Path, str]:
    """A file of a hub repository (the first of ``filenames`` it has) and its origin: the Hugging Face cache
    without network, else a download after a network probe of a few seconds. Offline
    (``HF_HUB_OFFLINE``/``MEDBENCH_OFFLINE``) or without network, one line saying what is missing and
    ``help_line`` (what to do), within seconds. Weights and model configurations (``config.json``,
    ``open_clip_config.json``) are found this one way."""
    cached = _cached_hub_file(hub_id, filenames)
    if cached is not None:
        return cached, "hub cache"
    what = f"hf-hub:{hub_id} ({' or '.join(filenames)})"
    if hub_offline():
        raise BackboneError(f"offline (HF_HUB_OFFLINE/MEDBENCH_OFFLINE set) and {what} is not in the local cache; "
                            f"{help_line}", field=field)
    if not network_reachable():
        raise BackboneError(f"no network: cannot download {what}; {help_line}", field=field)
    return _download_hub_file(hub_id, filenames), "hub download"


def hub_json(hub_id: str, filename: str, *, help_line: str, field: str) -> dict:
    """A JSON file of a hub repository (a model configuration), found as :func:`hub_file` finds files."""
    from medbench.utils import read_json

    path, _ = hub_file(hub_id, (filename,), help_line=help_line, field=field)
    data = read_json(Path(path), error=BackboneError, field=field, expected=f"the repository's {filename}")
    if not isinstance(data, dict):
        raise BackboneError(f"{filename} is not a JSON object", where=path, field=field)
    return data


#: files :func:`resolve_weights_file` found itself in this process: absolute path -> origin
_FOUND: dict[str, str] = {}


def _absolute(path: Path) -> str:
    return os.path.abspath(Path(path).expanduser())


def _found(path: Path, origin: str) -> tuple[Path, str]:
    _FOUND[_absolute(path)] = origin
    return path, origin


def _in_hub_cache_layout(path: Path, hub_id: str) -> bool:
    """``path`` is a snapshot file of ``hub_id`` in a Hugging Face cache (``models--ORG--NAME/snapshots/REV/F``)."""
    parts = Path(path).parts
    repo = "models--" + hub_id.replace("/", "--")
    return len(parts) >= 4 and parts[-4] == repo and parts[-3] == "snapshots"


def file_origin(backbone: "Backbone", path: Path) -> str:
    """Where the weights file ``path`` (handed over as a path) came from; see the module docstring."""
    remembered = _FOUND.get(_absolute(path))
    if remembered is not None:
        return remembered
    absolute = Path(_absolute(path))
    if absolute.parent == Path(_absolute(weights_dir())) and \
            absolute.name in {f"{backbone.name}{suffix}" for suffix in WEIGHT_SUFFIXES}:
        return "local weights folder"
    if backbone.hub_id and _in_hub_cache_layout(absolute, backbone.hub_id):
        return "hub cache"
    return "file"


def resolve_weights_file(backbone: "Backbone", explicit: Path | None) -> tuple[Path, str]:
    """The weights file for ``backbone`` and where it came from (:func:`file_origin` for ``explicit``)."""
    if explicit is not None:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise BackboneError("weights file not found", where=path, field="--weights")
        if path.suffix.lower() not in WEIGHT_SUFFIXES:
            raise BackboneError(f"unsupported weights file type {path.suffix!r}; expected one of "
                                f"{', '.join(WEIGHT_SUFFIXES)}", where=path, field="--weights")
        return path, file_origin(backbone, path)
    folder = weights_dir()
    for suffix in WEIGHT_SUFFIXES:
        candidate = folder / f"{backbone.name}{suffix}"
        if candidate.is_file():
            return _found(candidate, "local weights folder")
    help_line = (backbone.weights_help or "get the weights file and pass --weights FILE, or save it as "
                 "{weights_dir}/" + backbone.name + ".safetensors").replace("{weights_dir}", str(folder))
    if backbone.hub_id:
        path, origin = hub_file(backbone.hub_id, backbone.hub_filenames, help_line=f"{help_line}; or use --init random",
                                field=backbone.name)
        return _found(path, origin)
    raise BackboneError(f"no pre-trained weights found; {help_line}; or use --init random", field=backbone.name)


def read_state_dict(path: Path) -> dict[str, "torch.Tensor"]:
    """A state dict from ``.safetensors`` or a PyTorch file (never unpickling arbitrary objects)."""
    import torch

    suffix = path.suffix.lower()
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
                obj = obj["state_dict"]
            if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
                obj = obj["model"]
            sd = obj
    except Exception as err:
        raise BackboneError(f"cannot read weights: {str(err).splitlines()[0]}", where=path, field="--weights") from err
    if not isinstance(sd, dict) or not all(hasattr(v, "shape") for v in sd.values()):
        raise BackboneError("file holds no state dict (name -> tensor)", where=path, field="--weights")
    return {k.removeprefix("module."): v for k, v in sd.items()}


#: what passed :func:`check_weights` in this process: (file, size, mtime) for the contents, plus (backbone,
#: input channels) for loading into an architecture
_CHECKED: set[tuple] = set()


def _named_tensors(path: Path):
    """(name, tensor) of every tensor of a weights file, one at a time (a large file is not held whole)."""
    import numpy as np
    import torch

    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            for key in f.keys():
                yield key, f.get_tensor(key)
    elif suffix == ".npz":
        with np.load(path, allow_pickle=False) as archive:
            for key in archive.files:
                array = archive[key]
                if array.dtype.kind not in "biufc":
                    raise ValueError(f"array {key!r} has dtype {array.dtype}, not numbers")
                yield key, torch.from_numpy(np.ascontiguousarray(array))
    else:
        yield from read_state_dict(path).items()


def check_weights(backbone: "Backbone", path: Path, in_chans: tuple[int, ...] = ()) -> None:
    """Load and check a weights file before any run trains; one :class:`BackboneError` line naming the file
    (field ``--weights``) when it cannot serve.

    Every tensor is read (a truncated, empty or foreign file fails here; ``.pth`` files through
    ``torch.load(weights_only=True)``, ``.npz`` without pickles) and must hold finite numbers only (a NaN or
    infinite value is named with its tensor and count). Then the file is loaded into the architecture
    built on the meta device (no memory, no compute; on the CPU for a builder that cannot build there), for
    each input channel count of ``in_chans`` (the tasks'), by the backbone's own loader, so a missing or
    misshapen tensor is found now, not when a run starts. A file that passed is not checked again in this
    process.
    """
    import warnings

    import torch

    path = Path(path)
    try:
        stat = path.stat()
    except OSError as err:
        raise BackboneError(f"cannot read weights ({err.strerror or err})", where=path, field="--weights") from None
    file_key = (_absolute(path), stat.st_size, stat.st_mtime_ns)
    todo = [c for c in sorted(set(in_chans)) if (*file_key, backbone.name, c) not in _CHECKED]
    if file_key in _CHECKED and not todo:
        return
    if file_key not in _CHECKED:
        _check_contents(path, stat.st_size)
        _CHECKED.add(file_key)
    if backbone.load_weights is None:
        raise BackboneError(f"{backbone.name} cannot load pre-trained weights; use --init random", where=path,
                            field="--weights")
    for channels in todo:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "copying into a meta parameter is a no-op": the point here
            try:
                try:
                    with torch.device("meta"):
                        model = backbone.build(num_classes=1, in_chans=channels)
                except Exception:  # a builder that cannot build on the meta device (a plug-in's): on the CPU
                    model = backbone.build(num_classes=1, in_chans=channels)
                backbone.load_weights(model, path)
            except BackboneError:
                raise
            except Exception as err:
                detail = " ".join(str(err).split()) or type(err).__name__
                raise BackboneError(f"weights do not load into {backbone.name} ({channels} input channels): "
                                    f"{detail[:300]}", where=path, field="--weights") from None
        _CHECKED.add((*file_key, backbone.name, channels))


def _check_contents(path: Path, size: int) -> None:
    """Every tensor of the file read and finite (see :func:`check_weights`)."""
    import torch

    if size == 0:
        raise BackboneError("weights file is empty (0 bytes)", where=path, field="--weights")
    count = 0
    try:
        for name, tensor in _named_tensors(path):
            count += 1
            if not (tensor.is_floating_point() or tensor.is_complex()):
                continue
            bad = int((~torch.isfinite(tensor)).sum())
            if bad:
                raise BackboneError(f"tensor {name!r} holds {bad:,} non-finite values (NaN or infinite) of "
                                    f"{tensor.numel():,}; expected finite weights (the file is broken: get it "
                                    "again)", where=path, field="--weights")
    except BackboneError:
        raise
    except Exception as err:  # truncated, not the suffix's format, pickled objects, ...
        detail = " ".join(str(err).split()) or type(err).__name__
        raise BackboneError(f"cannot read weights: {detail[:300]}", where=path, field="--weights") from None
    if count == 0:
        raise BackboneError("file holds no tensors; expected pre-trained weights", where=path, field="--weights")


def load_state_dict_into(model: "nn.Module", path: Path, *, classifier: str) -> None:
    """Load every non-head tensor of ``path`` into ``model``; refuse a partial match.

    The head (``classifier`` prefix) is skipped: the task has its own. A
    first conv with another number of input channels is adapted (timm's
    ``adapt_input_conv``: summed for one channel, repeated for more).
    """
    from timm.models import adapt_input_conv

    sd = read_state_dict(path)
    own = model.state_dict()
    loaded: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if key.startswith(classifier + "."):
            continue
        if key not in own:
            continue
        target = own[key]
        if value.shape != target.shape and value.ndim == 4 and target.ndim == 4 and value.shape[0] == target.shape[0] \
                and value.shape[2:] == target.shape[2:]:
            value = adapt_input_conv(target.shape[1], value)
        if value.shape != target.shape:
            raise BackboneError(f"tensor {key!r} has shape {tuple(value.shape)}, the network expects "
                                f"{tuple(target.shape)}", where=path, field="--weights")
        loaded[key] = value
    expected = [k for k in own if not k.startswith(classifier + ".") and not k.endswith("num_batches_tracked")]
    missing = [k for k in expected if k not in loaded]
    if missing:
        raise BackboneError(f"weights do not match the architecture: {len(missing)} of {len(expected)} tensors missing "
                            f"(e.g. {missing[0]!r})", where=path, field="--weights")
    model.load_state_dict(loaded, strict=False)


def weights_sha256(path: Path) -> str:
    """sha256 of a weights file, memoised by (path, size, mtime) in the cache folder."""
    stat = path.stat()
    memo_path = cache_dir() / "weights-sha256.json"
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    memo: dict[str, str] = {}
    if memo_path.is_file():
        try:
            memo = json.loads(memo_path.read_text())
        except (OSError, ValueError, RecursionError):
            memo = {}
        if not isinstance(memo, dict):
            memo = {}
    if key not in memo:
        memo[key] = sha256_file(path)
        try:
            atomic_write_json(memo_path, memo)
        except OSError:
            pass  # a read-only cache only costs a recomputation
    return memo[key]

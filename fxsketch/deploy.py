"""Deployment: rewritten modules saved as `torch.export` programs (.pt2) and loaded back."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import threading
import zipfile
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from fxsketch.allocator import tune_allocator as tune_process_allocator
from fxsketch.capture import as_inputs, describe_inputs
from fxsketch.display import progress_wanted, step
from fxsketch.kernels.int8 import int8_linear_reference, int8_lowrank_linear_reference
from fxsketch.version import __version__

__all__ = ["save", "load", "package", "read_metadata", "ArtifactError"]

log = logging.getLogger(__name__)

_META = "fxsketch.json"
FORMAT_VERSION = 1
# every member `save` writes, below the archive's one top-level folder (torch.export's layout)
_MEMBERS = re.compile(r"archive_format|archive_version|byteorder|\.data/version|\.data/serialization_id"
                      r"|models/model\.json|data/weights/model_weights_config\.json|data/weights/weight_\d+"
                      r"|data/constants/model_constants_config\.json|data/constants/tensor_\d+"
                      r"|data/sample_inputs/model\.pt|extra/fxsketch\.json|extra/module_info\.json")
_LOADING = threading.Lock()
_TRUST = "If you wrote this file and trust it, call fxsketch.load(path, trusted=True)."


class ArtifactError(ValueError):
    """A file is not a readable fxsketch artifact."""


def save(
    module: nn.Module,
    path: str | os.PathLike,
    example_inputs: Any,
    dynamic_batch: bool = True,
    dynamic_other_dims: bool = True,
) -> torch.export.ExportedProgram:
    """Export `module` with `torch.export` and write it, with fxsketch metadata, to `path` (.pt2).

    Args:
        module: a rewritten GraphModule (or any module whose ops export).
        path: where to write the program.
        example_inputs: inputs to trace with (a tensor or a tuple of positional tensors).
        dynamic_batch: make dim 0 of every tensor input dynamic, so the artifact runs on other
            batch sizes than the example's (which must then be at least 2).
        dynamic_other_dims: let every other dimension be dynamic where the model allows it (a
            sequence length, an image size); dimensions the model fixes stay static.

    Returns:
        The exported program that was written.
    """
    _check_save_arguments(module, path)
    inputs = as_inputs(example_inputs)
    program = _export(module, inputs, dynamic_batch, dynamic_other_dims)
    meta = {
        "format": FORMAT_VERSION,
        "fxsketch_version": __version__,
        "torch_version": torch.__version__,
        "plan": getattr(module, "meta", {}).get("fxsketch_plan", {}),
        "dynamic_dims": _dynamic_dims(program),
        "example_input_shapes": [list(x.shape) if isinstance(x, torch.Tensor) else None for x in inputs],
    }
    torch.export.save(program, path, extra_files={_META: json.dumps(meta)})
    return program


def _check_save_arguments(module: Any, path: Any) -> None:
    """Refuse, before the (slow) export, a non-module or a path that cannot be written."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"save/package take a torch.nn.Module (e.g. a rewritten GraphModule), got {type(module).__name__}")
    if not isinstance(path, (str, os.PathLike)):
        if hasattr(path, "write"):  # a file object: torch.export.save writes to it
            return
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    parent = os.path.dirname(os.path.abspath(os.fspath(path)))
    if not os.path.isdir(parent):
        raise FileNotFoundError(f"cannot write {os.fspath(path)!r}: the directory {parent!r} does not exist")


def _export(module: nn.Module, inputs: tuple, dynamic_batch: bool, dynamic_other_dims: bool):
    batch = torch.export.Dim("batch")
    other = torch.export.Dim.AUTO if dynamic_other_dims else torch.export.Dim.STATIC
    dynamic = tuple(
        {i: batch if (i == 0 and dynamic_batch) else (other if i else torch.export.Dim.STATIC) for i in range(x.dim())}
        if isinstance(x, torch.Tensor) and x.dim() > 0 else None
        for x in inputs
    )
    try:
        return torch.export.export(module, inputs, dynamic_shapes=dynamic, strict=False)
    except Exception as exc:
        if not dynamic_batch:
            raise
        raise ArtifactError(
            f"exporting with a dynamic batch dimension failed on example_inputs {describe_inputs(inputs)} "
            f"({type(exc).__name__}: {str(exc).splitlines()[0]}). Check that they are what the module's forward "
            "takes; use example inputs with a batch of at least 2 that all share it, or pass dynamic_batch=False."
        ) from exc


def _dynamic_dims(program: torch.export.ExportedProgram) -> list[list[int]]:
    """For each user input, the dimensions that stayed symbolic in the exported program."""
    user_inputs = set(program.graph_signature.user_inputs)
    dims = []
    for node in program.graph.nodes:
        if node.op == "placeholder" and node.name in user_inputs:
            val = node.meta.get("val")
            shape = getattr(val, "shape", ())
            dims.append([i for i, d in enumerate(shape) if isinstance(d, torch.SymInt)])
    return dims


def package(
    module: nn.Module,
    path: str | os.PathLike,
    example_inputs: Any,
    dynamic_batch: bool = True,
    dynamic_other_dims: bool = True,
    progress: bool | None = None,
) -> str:
    """Compile `module` ahead of time into an AOTInductor package (`.pt2`) that runs without Python
    model code: `torch._inductor.aoti_load_package(path)` loads it, fxsketch need not be installed.

    The fxsketch ops are decomposed into their ATen bodies first, so the package is self-contained;
    the plan and version travel in the package metadata (`loader.get_metadata()`). A model whose
    outputs are library types (transformers' `ModelOutput`s) needs their modules imported before
    loading: they are recorded in the metadata (`fxsketch_output_modules`) and logged.
    `progress` shows a spinner while it compiles (None: when standard error is a terminal).
    """

    _check_save_arguments(module, path)
    program = _export(module, as_inputs(example_inputs), dynamic_batch, dynamic_other_dims)
    decompositions = torch.export.default_decompositions()  # the composite fxsketch ops among them
    decompositions[torch.ops.fxsketch.int8_linear.default] = int8_linear_reference
    decompositions[torch.ops.fxsketch.int8_lowrank_linear.default] = int8_lowrank_linear_reference
    program = program.run_decompositions(decompositions)
    types = output_types(program)
    modules = sorted({name.rpartition(".")[0] for name in types})
    metadata = {"fxsketch_version": __version__,
                "fxsketch_plan": json.dumps(getattr(module, "meta", {}).get("fxsketch_plan", {})),
                "fxsketch_output_types": json.dumps(types), "fxsketch_output_modules": json.dumps(modules)}
    if modules:
        log.warning("%s returns %s: a process that loads it must first import %s (torch rebuilds the outputs "
                    "from those types; the package's metadata lists them as fxsketch_output_modules)",
                    os.fspath(path), ", ".join(types), ", ".join(modules))
    with step("compiling the AOTInductor package", progress_wanted(progress)):
        return torch._inductor.aoti_compile_and_package(
            program, package_path=os.fspath(path), inductor_configs={"aot_inductor.metadata": metadata})


def output_types(program: torch.export.ExportedProgram) -> list[str]:
    """The qualified names of the non-builtin container types in an exported program's outputs
    (e.g. `transformers.modeling_outputs.BaseModelOutputWithPooling`): what a loading process must
    have imported for torch to rebuild them."""
    found: set[str] = set()
    pending = [program.call_spec.out_spec]
    while pending:
        spec = pending.pop()
        if spec is None:
            continue
        kind = getattr(spec, "type", None)
        if kind is not None and kind.__module__ not in ("builtins", "collections"):
            found.add(f"{kind.__module__}.{kind.__qualname__}")
        pending.extend(spec.children() if hasattr(spec, "children") else getattr(spec, "children_specs", ()))
    return sorted(found)


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The fxsketch metadata stored in an artifact (raises ArtifactError if there is none)."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"an artifact path is a str or os.PathLike, got {type(path).__name__}")
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such artifact: {path!r}")
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path!r} is a directory, not a .pt2 artifact written by fxsketch.save")
    try:
        with zipfile.ZipFile(path) as archive:
            names = [n for n in archive.namelist() if n.endswith(f"/{_META}") or n == _META]
            size = os.path.getsize(path)
            if any(info.header_offset + info.compress_size > size for info in archive.infolist()):
                raise ArtifactError(f"{path!r} is truncated (its members reach past its {size:,} bytes): copy or "
                                    "save it again")
            if not names and not any(n.rpartition("/")[2] == "archive_format" for n in archive.namelist()):
                # e.g. the file's end cut off: zipfile then finds a zip stored inside it (sample inputs)
                raise ArtifactError(f"{path!r} is not an fxsketch artifact: it holds no torch.export program (a zip "
                                    "of something else, or a .pt2 truncated, its end cut off): save it again with "
                                    "fxsketch.save")
            if not names:
                raise ArtifactError(f"{path!r} is a .pt2 archive but not an fxsketch artifact (no {_META}): "
                                    "load it with torch.export.load, or save it with fxsketch.save")
            meta = json.loads(archive.read(names[0]))
    except (zipfile.BadZipFile, OSError) as exc:  # OSError: offsets that point before the file's start
        raise ArtifactError(f"{path!r} is not a .pt2 archive or is truncated ({exc}): save it again "
                            "with fxsketch.save") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{path!r} has a corrupt {_META} ({exc}): save it again with fxsketch.save") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("format", 0), int):
        raise ArtifactError(f"{path!r} has a malformed {_META} (expected an object with an integer 'format', "
                            f"got {str(meta)[:100]}): save it again with fxsketch.save")
    if meta.get("format", 0) > FORMAT_VERSION:
        raise ArtifactError(f"{path!r} was written by fxsketch {meta.get('fxsketch_version')} (format "
                            f"{meta.get('format')}), newer than this fxsketch reads (format {FORMAT_VERSION}): "
                            "upgrade fxsketch")
    return meta


def load(path: str | os.PathLike, *, trusted: bool = False, tune_allocator: bool = True) -> nn.Module:
    """Load an artifact written by `save` as a callable module (the fxsketch ops are registered on import).

    Args:
        path: the `.pt2` file.
        trusted: also load archives holding pickled Python objects (tensor subclasses, script or
            opaque objects, sample inputs beyond plain tensors). `torch.export.load` unpickles those,
            which runs code stored in the file, so they are refused unless you trust the file;
            `save` never writes them.
        tune_allocator: set the process's glibc malloc to keep freed blocks for the next call
            (`fxsketch.tune_allocator`); in a fresh process the default allocator gives every call's
            activations back to the OS and faults them in again, which cost a saved int8 MiniLM
            13–16% of its speed. False leaves the allocator alone.

    Raises:
        FileNotFoundError: the file does not exist.
        ArtifactError: not an fxsketch artifact, truncated, newer than this fxsketch, holding
            pickled objects while `trusted` is False, or not loadable by this torch.
    """
    meta = read_metadata(path)
    damaged = _damaged_member(os.fspath(path))
    if damaged:
        raise ArtifactError(f"{os.fspath(path)!r} is damaged: member {damaged!r} does not match the checksum "
                            "stored when it was written; copy or save it again")
    if not trusted:
        pickled = _pickled_members(os.fspath(path))
        if pickled:
            raise ArtifactError(
                f"{os.fspath(path)!r} holds pickled Python objects ({', '.join(pickled[:5])}) that torch.export.load "
                "would unpickle; unpickling runs code stored in the file, so fxsketch refuses it by default "
                f"(fxsketch.save never writes such objects). {_TRUST}")
        strangers = _unexpected_members(os.fspath(path))
        if strangers:
            raise ArtifactError(
                f"{os.fspath(path)!r} holds members fxsketch.save never writes ({'; '.join(strangers[:5])}): torch's "
                f"reader may read them in place of the real ones, so the file is refused. {_TRUST}")
    try:
        with contextlib.nullcontext() if trusted else _weights_only(os.fspath(path)):
            program = torch.export.load(path)
    except ArtifactError:
        raise
    except Exception as exc:
        cause = exc.__cause__ or exc.__context__
        detail = f"{type(exc).__name__}: {exc}" + (f" (caused by {type(cause).__name__}: {cause})" if cause else "")
        raise ArtifactError(f"{os.fspath(path)!r} could not be loaded ({detail}); it was written by fxsketch "
                            f"{meta.get('fxsketch_version')} with torch {meta.get('torch_version')} (this is "
                            f"torch {torch.__version__}). If the model returns a library's own output types "
                            "(e.g. transformers' ModelOutput), import that library's module first "
                            "(import transformers.modeling_outputs).") from exc
    module = program.module()
    module.meta["fxsketch"] = meta
    if tune_allocator:
        tune_process_allocator()
    return module


def _damaged_member(path: str) -> str | None:
    """The first member whose bytes no longer match their stored CRC-32 (None: all intact)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise ArtifactError(f"{path!r} cannot be read through ({exc}): copy or save it again") from None


def _unexpected_members(path: str) -> list[str]:
    """Members outside the exact set `save` writes, compared ignoring case (torch's archive reader
    finds a member whatever its case, so `model.PT` would be read as `model.pt`), and second
    members whose names differ from another only in case."""
    problems, seen = [], {}
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    roots = {name.split("/", 1)[0] for name in names}
    for name in names:
        folded = name.casefold()
        if folded in seen:
            problems.append(f"{name!r} repeats {seen[folded]!r}")
            continue
        seen[folded] = name
        root, _, rest = name.partition("/")
        if len(roots) != 1 or not _MEMBERS.fullmatch(rest):
            problems.append(f"{name!r}")
    return problems


@contextlib.contextmanager
def _weights_only(path: str) -> Iterator[None]:
    """While torch.export.load reads `path`, every unpickling is restricted to tensors and plain
    containers: torch falls back to a full unpickle when the restricted one fails, and a full
    unpickle runs code stored in the file. One load at a time (the guard swaps `torch.load`; calls
    from other threads meanwhile pass through unchanged)."""
    real, owner = torch.load, threading.get_ident()

    def restricted(f: Any, *args: Any, weights_only: Any = None, **kwargs: Any) -> Any:
        if threading.get_ident() != owner:
            return real(f, *args, weights_only=weights_only, **kwargs)
        if weights_only is False:
            raise ArtifactError(f"{path!r} holds an object torch can only read by unpickling it in full, which runs "
                                f"code stored in the file: refused. {_TRUST}")
        return real(f, *args, weights_only=True, **kwargs)

    with _LOADING:
        torch.load = restricted
        try:
            yield
        finally:
            torch.load = real


def _pickled_members(path: str) -> list[str]:
    """Members of the archive that torch.export.load would unpickle beyond plain tensors.

    Weights and constants listed with `use_pickle` (tensor subclasses) and non-tensor constants
    (script and opaque objects) are always unpickled with full pickle; `.pt` members (sample inputs,
    legacy weights) are tried with `weights_only=True` first and unpickled in full if that fails, so
    each must load with `weights_only=True` here.
    """
    found = []
    with zipfile.ZipFile(path) as archive:
        for name in archive.namelist():
            if name.endswith("_config.json") and ("/data/weights/" in f"/{name}" or "/data/constants/" in f"/{name}"):
                try:
                    entries = json.loads(archive.read(name)).get("config", {})
                except (ValueError, AttributeError):
                    continue  # malformed: torch.export.load reports it
                for key, entry in entries.items() if isinstance(entries, dict) else ():
                    file = str(entry.get("path_name", "")) if isinstance(entry, dict) else ""
                    constant = "/data/constants/" in f"/{name}"
                    if (isinstance(entry, dict) and entry.get("use_pickle")) or (constant and not file.startswith("tensor_")):
                        found.append(f"{name}:{key}")
            elif name.endswith(".pt"):
                try:
                    torch.load(io.BytesIO(archive.read(name)), weights_only=True)
                except Exception:  # anything the restricted unpickler refuses
                    found.append(name)
    return found

"""The `fxsketch` command line: inspect, optimize, apply, demo."""

from __future__ import annotations

import importlib
import importlib.util
import logging
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional

import torch
import typer
from rich.console import Console
from rich.markup import escape
from rich.tree import Tree

import fxsketch
from fxsketch.capture import other_modules, user_frame
from fxsketch.demo import make_demo_task
from fxsketch.display import progress_wanted
from fxsketch.plan import layer_cost
from fxsketch.select import match_layers

app = typer.Typer(help="fxsketch: faster, smaller PyTorch models by rewriting their FX graphs.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
console = Console()

TARGET_HELP = ("A factory returning (model, example_inputs): path/to/file.py:callable or "
               "package.module:callable.")


_OPTIONS = {"verbose": False}  # the root options, read by the commands
USAGE_ERRORS = (ValueError, TypeError, LookupError, FileNotFoundError, ImportError)


@app.callback()
def _root(verbose: bool = typer.Option(False, "--verbose", "-v",
                                       help="Log fxsketch's debug messages and show tracebacks.")) -> None:
    _OPTIONS["verbose"] = verbose
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    handler.addFilter(lambda record: not hasattr(record, "fxsketch_resume"))  # the CLI words its own, in flags
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, handlers=[handler])


def _resume_hint(storage: Any, study_name: Optional[str]) -> str:
    """How to resume an interrupted `fxsketch optimize`, in the command's own flags."""
    if storage is None:
        return "rerun with --storage sqlite:///study.db --study-name NAME to make the search resumable"
    return f"resume with the same command and --storage {storage} --study-name {study_name or 'NAME'}"


@contextmanager
def _user_code(what: str):
    """Report a failure in `what`. fxsketch's own refusal of a bad argument (a selector that
    matches nothing, an empty range, an unknown method) is the user's to fix from its message: the
    message alone, exit 2. A failure that passed through the user's own code (their model, data
    or accuracy function) shows the traceback, which names their line, and exits 1; so does any
    other error, and every error with -v."""
    try:
        yield
    except (typer.Exit, typer.Abort, typer.TyperException, KeyboardInterrupt):
        raise
    except Exception as exc:
        head, text = f"[bold red]error[/bold red] in {escape(what)}", escape(str(exc) or type(exc).__name__)
        if isinstance(exc, USAGE_ERRORS) and not _OPTIONS["verbose"] and user_frame(exc) is None:
            console.print(f"{head}: {text}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        console.print_exception(max_frames=20)
        console.print(f"{head}: {type(exc).__name__}: {text}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None


_TARGET_FOLDERS: set[str] = set()  # folders of the target files this process has loaded


def load_object(ref: str) -> Any:
    """The object named by `path/to/file.py:name` or `package.module:name`."""
    module_ref, sep, name = ref.rpartition(":")
    if not sep or not module_ref or not name:
        raise typer.BadParameter(f"{ref!r} must look like path/to/file.py:callable or package.module:callable")
    if module_ref.endswith(".py") or "/" in module_ref:
        path = Path(module_ref)
        if not path.exists():
            raise typer.BadParameter(f"no such file: {path}")
        folder = str(path.resolve().parent)
        if not path.stem.isidentifier():
            raise typer.BadParameter(f"{path} cannot be imported as a module (its name {path.stem!r} is not a Python "
                                     "identifier): rename the file, e.g. to models.py")
        existing = sys.modules.get(path.stem)
        taken = existing.__spec__ if existing is not None else importlib.util.find_spec(path.stem)
        origin = getattr(taken, "origin", None)
        if taken is not None and not (origin and str(Path(origin).resolve().parent) in {*_TARGET_FOLDERS, folder}):
            raise typer.BadParameter(f"{path} is named like the module {path.stem!r} Python already imports (from "
                                     f"{origin or 'Python itself'}): loading it would shadow that module; rename "
                                     "the file")
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        # its folder goes last on the path: the file's own imports find its neighbours, but a
        # neighbour never stands in for the standard library or an installed package (a `yaml.py`)
        _TARGET_FOLDERS.add(folder)
        if folder not in sys.path:
            sys.path.append(folder)
        sys.modules[path.stem] = module  # so its functions pickle into worker processes
        spec.loader.exec_module(module)
    else:
        module = importlib.import_module(module_ref)
    if not hasattr(module, name):
        raise typer.BadParameter(f"{module_ref} has no attribute {name!r}")
    return getattr(module, name)


def _load_target(target: str) -> tuple[Any, Any]:
    with _user_code(f"loading {target}"):
        made = load_object(target)()
    if isinstance(made, tuple) and len(made) == 2:
        return made
    if isinstance(made, torch.nn.Module):
        return made, None
    console.print(f"[red]{target} must return (model, example_inputs), got {type(made).__name__}[/red]")
    raise typer.Exit(2)


CALIBRATION_HELP = ("Calibration batches for activation-aware kinds (whitened_svd), refits and the allocation "
                    "warm start: file.py:name or module:name, an iterable of input tuples or a function returning one.")


def _load_calibration(ref: Optional[str]) -> Any:
    """The calibration batches named by `ref` (called first when it is a function), or None."""
    if ref is None:
        return None
    with _user_code(f"loading {ref}"):
        obj = load_object(ref)
        batches = obj() if callable(obj) else obj
        batches = list(batches)
    if not batches:
        console.print(f"[red]{ref} gave no calibration batches: it must be (or return) a non-empty iterable "
                      "of input tuples[/red]")
        raise typer.Exit(2)
    return batches


def _budget(value: Optional[float], option: str) -> float | int | None:
    """A budget option: a fraction in (0, 1] stays a float, a larger whole number is an absolute count."""
    if value is None:
        return None
    if value <= 0:
        raise typer.BadParameter(f"{option} must be a fraction in (0, 1] or an absolute count, got {value}")
    return value if value <= 1 else int(value)


@app.command()
def inspect(
    target: str = typer.Argument(..., help=TARGET_HELP),
    spec: Optional[Path] = typer.Option(None, help="A spec file (.json/.yaml); marks the layers it selects."),
) -> None:
    """Print the module tree with each matchable layer's name, type, shape and cost."""
    model, example_inputs = _load_target(target)
    with _user_code("capturing the model"):
        gm = fxsketch.capture(model, example_inputs)
        records = {r.name: r for r in fxsketch.find_layers(gm)}
        selected: set[str] = set()
        if spec is not None:
            for cfg in fxsketch.load_spec(spec):
                selected.update(match_layers(list(records.values()), cfg.layer_names,
                                             other_modules=other_modules(gm, list(records.values()))))
    tree = Tree(f"[bold]{type(model).__name__}[/bold] ({gm.meta.get('fxsketch_tracer', '?')})")
    nodes = {"": tree}
    for name, module in model.named_modules():
        if not name:
            continue
        parent = nodes.get(name.rpartition(".")[0], tree)
        label = f"{name.rpartition('.')[2]} [dim]({type(module).__name__})[/dim]"
        if name in records:
            r = records[name]
            cost = layer_cost(r, None)
            mark = " [green]✔ selected[/green]" if name in selected else ""
            note = f" [yellow]{r.unsupported}[/yellow]" if r.unsupported else ""
            qualified = f"  {name}" if "." in name else ""
            label += (f"{qualified}  {r.op_type} {'×'.join(map(str, r.weight_shape))}  "
                      f"{cost.params:,} params  {cost.flops_per_token * r.tokens / 1e6:.2f} MFLOPs{mark}{note}")
        nodes[name] = parent.add(label)
    for name in records.keys() - set(nodes):  # functional calls on bare parameters
        r = records[name]
        tree.add(f"{name}  {r.op_type} (functional) {'×'.join(map(str, r.weight_shape))}"
                 + (" [green]✔ selected[/green]" if name in selected else ""))
    console.print(tree)
    if spec is not None:
        console.print(f"{len(selected)} of {len(records)} matchable layers selected")


@app.command()
def optimize(
    target: str = typer.Argument(..., help=TARGET_HELP),
    spec: Path = typer.Option(..., help="The spec file (.json/.yaml): {'layers': [...]}"),
    accuracy: str = typer.Option(..., help="The accuracy function: file.py:fn or module:fn (model -> float)."),
    threshold: Optional[float] = typer.Option(None, help="The accuracy bar; omit to maximize accuracy."),
    trials: int = typer.Option(20, help="Trials in all, split over the tuning units."),
    storage: Optional[str] = typer.Option(None, help="Optuna storage URL, e.g. sqlite:///study.db."),
    study_name: Optional[str] = typer.Option(None, help="Study name in the storage (resumes if it exists)."),
    objective: str = typer.Option("latency", help="latency (measured) or flops (cost model)."),
    seed: Optional[int] = typer.Option(None, help="Seed for the sampler."),
    out: Optional[Path] = typer.Option(None, help="Write the optimized model here (.pt2)."),
    plan_out: Optional[Path] = typer.Option(None, help="Write the plan here (.json)."),
    report: Optional[Path] = typer.Option(None, help="Write the HTML report here."),
    workers: int = typer.Option(1, help="Worker processes sharing the study (a journal file unless --storage)."),
    calibration: Optional[str] = typer.Option(None, help=CALIBRATION_HELP),
    max_flops: Optional[float] = typer.Option(None, help="FLOP budget of the selected layers: a fraction of "
                                              "their dense FLOPs (e.g. 0.5) or an absolute count."),
    max_params: Optional[float] = typer.Option(None, help="Parameter budget of the selected layers: a fraction "
                                               "(e.g. 0.5) or an absolute count."),
    max_bytes: Optional[float] = typer.Option(None, help="Weight-byte budget of the selected layers (int8 weights "
                                              "count 1 byte): a fraction (e.g. 0.3) or an absolute count."),
) -> None:
    """Search for the fastest plan that keeps accuracy above the threshold."""
    model, example_inputs = _load_target(target)
    if example_inputs is None:
        console.print(f"[red]{target} must return (model, example_inputs) for optimize[/red]")
        raise typer.Exit(2)
    with _user_code(f"loading {accuracy}"):
        accuracy_fn = load_object(accuracy)
    calibration_data = _load_calibration(calibration)
    budgets = dict(max_flops=_budget(max_flops, "--max-flops"), max_params=_budget(max_params, "--max-params"),
                   max_bytes=_budget(max_bytes, "--max-bytes"))
    with _user_code("optimize"), _interrupt_before_any_trial(storage):
        result = fxsketch.optimize(
            model, spec, example_inputs=example_inputs, accuracy_fn=accuracy_fn, accuracy_threshold=threshold,
            n_trials=trials, calibration_data=calibration_data,
            search=fxsketch.SearchOptions(objective=objective, seed=seed, **budgets),
            study=fxsketch.StudyOptions(storage=storage, study_name=study_name,
                                        load_if_exists=storage is not None, n_workers=workers))
    typer.echo(result.summary())
    _write_outputs(result, example_inputs, out, plan_out, report)
    if result.interrupted:
        kept = "saved above" if out or plan_out else "shown above"
        console.print(f"[yellow]interrupted[/yellow]: the best plan so far is {kept}; "
                      f"{_resume_hint(storage, result.study.study_name)}", highlight=False, soft_wrap=True)
        raise typer.Exit(130)


@contextmanager
def _interrupt_before_any_trial(storage: Optional[str], resumable: bool = True):
    """Ctrl-C before any trial finished (or before the search began): nothing to keep; say how to
    resume and exit 130."""
    try:
        yield
    except KeyboardInterrupt as exc:
        hint = f"; {_resume_hint(storage, getattr(exc, 'study_name', None))}" if resumable else ""
        console.print(f"[yellow]interrupted[/yellow] before any trial finished{hint}", highlight=False, soft_wrap=True)
        raise typer.Exit(130) from None


def _write_outputs(result, example_inputs, out, plan_out, report) -> None:
    if plan_out is not None:
        result.save_plan(plan_out)
        console.print(f"plan written to {plan_out}")
    if out is not None:
        with _user_code("saving the model"):
            fxsketch.save(result.graph_module, out, example_inputs)
        console.print(f"model written to {out}")
    if report is not None:
        console.print(f"report written to {result.report(report)}")


@app.command()
def apply(
    target: str = typer.Argument(..., help=TARGET_HELP),
    plan: Path = typer.Option(..., help="A plan JSON (from optimize --plan-out or written by hand)."),
    out: Path = typer.Option(..., help="Where to write the rewritten model (.pt2)."),
    calibration: Optional[str] = typer.Option(None, help=CALIBRATION_HELP + " Needed by whitened_svd entries."),
) -> None:
    """Apply a plan without searching and save the rewritten model."""
    model, example_inputs = _load_target(target)
    if example_inputs is None:
        console.print(f"[red]{target} must return (model, example_inputs) for apply[/red]")
        raise typer.Exit(2)
    calibration_data = _load_calibration(calibration)
    with _user_code("applying the plan"):
        gm = fxsketch.rewrite(model, plan, example_inputs, calibration_data=calibration_data)
        fxsketch.save(gm, out, example_inputs)
    console.print(f"applied {len(gm.meta['fxsketch_plan'])} plan entries; model written to {out}")


@app.command()
def demo(
    trials: int = typer.Option(36, help="Trials in all, split over the layers."),
    out: Path = typer.Option(Path("fxsketch-demo.pt2"), help="Where to save the optimized model."),
    objective: str = typer.Option("latency", help="latency (measured) or flops (cost model)."),
    seed: int = typer.Option(0, help="Seed for training and the sampler."),
    method: Optional[str] = typer.Option(None, help="Replacement kind: svd, whitened_svd, sketch "
                                         "(default: svd, or whitened_svd with --calibrate)."),
    calibrate: bool = typer.Option(False, "--calibrate", help="Calibrate on training digits: activation-aware "
                                   "factorizations, refits and an allocation warm start."),
) -> None:
    """Train a small MLP on the bundled digits data, optimize it, and save the result."""
    console.print("[bold]fxsketch demo[/bold]: MLP 64→1024→1024→10 on scikit-learn digits")
    with _user_code("the demo"):
        task = make_demo_task(seed=seed, progress=progress_wanted(None))
    dense = task.accuracy(task.model)
    threshold = dense - 0.01
    console.print(f"trained in {task.train_seconds:.1f}s; dense accuracy {dense:.4f}; "
                  f"threshold {threshold:.4f} (one point below)")
    params = "auto" if method in (None, "svd", "whitened_svd") else {"method": [method]}
    spec = fxsketch.LayerConfig(layer_names={"type": "Linear"}, params=params)
    with _user_code("the demo"), _interrupt_before_any_trial(None, resumable=False):
        result = fxsketch.optimize(task.model, spec, example_inputs=task.example_inputs, accuracy_fn=task.accuracy,
                                   accuracy_threshold=threshold, n_trials=trials, verbose=True,
                                   search=fxsketch.SearchOptions(objective=objective, seed=seed, default_method=method),
                                   calibration_data=task.calibration if calibrate else None)
    typer.echo("")
    typer.echo(result.summary())
    fxsketch.save(result.graph_module, out, task.example_inputs)
    console.print(f"\nsaved the optimized model to {out} (load it with fxsketch.load)")
    if result.interrupted:
        console.print("[yellow]interrupted[/yellow]: the best plan found so far is saved above")
        raise typer.Exit(130)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()

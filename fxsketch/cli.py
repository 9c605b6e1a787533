"""The `fxsketch` command line."""

from __future__ import annotations

import logging
from pathlib import Path

import typer
from rich.console import Console

app = typer.Typer(help="fxsketch: faster, smaller PyTorch models by rewriting their FX graphs.",
                  no_args_is_help=True, add_completion=False)
console = Console()


@app.callback()
def _root(verbose: bool = typer.Option(False, "--verbose", "-v", help="Log fxsketch's debug messages.")) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")


@app.command()
def demo(
    trials: int = typer.Option(36, help="Trials in all, split over the layers."),
    out: Path = typer.Option(Path("fxsketch-demo.pt2"), help="Where to save the optimized model."),
    objective: str = typer.Option("latency", help="latency (measured) or flops (cost model)."),
    seed: int = typer.Option(0, help="Seed for training and the sampler."),
) -> None:
    """Train a small MLP on the bundled digits data, optimize it, and save the result."""
    import fxsketch
    from fxsketch.demo import make_demo_task

    console.print("[bold]fxsketch demo[/bold]: MLP 64→1024→1024→10 on scikit-learn digits")
    task = make_demo_task(seed=seed)
    dense = task.accuracy(task.model)
    threshold = dense - 0.01
    console.print(f"trained in {task.train_seconds:.1f}s; dense accuracy {dense:.4f}; "
                  f"threshold {threshold:.4f} (one point below)")
    spec = fxsketch.LayerConfig(layer_names={"type": "Linear"}, params="auto")
    result = fxsketch.optimize(task.model, spec, example_inputs=task.example_inputs, accuracy_fn=task.accuracy,
                               accuracy_threshold=threshold, objective=objective, n_trials=trials, seed=seed,
                               verbose=True)
    typer.echo("")
    typer.echo(result.summary())
    fxsketch.save(result.graph_module, out, task.example_inputs)
    console.print(f"\nsaved the optimized model to {out} (load it with fxsketch.load)")


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()

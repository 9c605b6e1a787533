"""Panther's `ModelVisualizer`: print a model's module tree to find the names selectors use."""

# ruff: noqa: N999  (the module name is the seed API's import path)
from __future__ import annotations

from torch import nn

__all__ = ["ModelVisualizer"]


class ModelVisualizer:
    """Static helpers for discovering layer names in PyTorch models."""

    @staticmethod
    def module_tree(model: nn.Module, root_name: str = "model") -> str:
        """The module hierarchy as ASCII-tree text (fxsketch extension; `print_module_tree` prints it).

        Each line is `name (Type)`, with a trailing `/` on modules that have children, and
        `├─`, `└─`, `│` connectors indenting the children by four columns.
        """
        lines = [_label(root_name, model)]
        _children(model, "", lines)
        return "\n".join(lines)

    @staticmethod
    def print_module_tree(model: nn.Module, root_name: str = "model") -> None:
        """Print the module hierarchy as an ASCII tree with layer types.

        Args:
            model: the PyTorch model to inspect.
            root_name: display name for the root module.
        """
        print(ModelVisualizer.module_tree(model, root_name))


def _label(name: str, module: nn.Module) -> str:
    container = next(module.named_children(), None) is not None
    return f"{name} ({type(module).__name__})" + ("/" if container else "")


def _children(module: nn.Module, prefix: str, lines: list[str]) -> None:
    children = list(module.named_children())
    for i, (name, child) in enumerate(children):
        last = i == len(children) - 1
        lines.append(prefix + ("└─ " if last else "├─ ") + _label(name, child))
        _children(child, prefix + ("    " if last else "│   "), lines)

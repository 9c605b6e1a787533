"""The checkout's top level holds nothing importable but `fxsketch`: a top-level package there would
shadow a PyPI package of the same name whenever the repository root is on `sys.path` (as under
`python -m pytest`, `python -c` or a notebook started at the root)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_nothing_importable_at_the_top_level_but_fxsketch():
    importable = sorted(p.name for p in ROOT.iterdir()
                        if (p.is_dir() and (p / "__init__.py").exists()) or (p.is_file() and p.suffix == ".py"))
    assert importable == ["fxsketch"]


def test_a_transformers_model_builds_and_runs_with_the_repo_root_first_on_sys_path():
    pytest.importorskip("transformers")
    pytest.importorskip("kernels")  # the PyPI package transformers imports; the op family is fxsketch.kernels
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(ROOT)!r})
        import kernels, torch, transformers
        from pathlib import Path
        assert Path(kernels.__file__).resolve().parent.parent != Path({str(ROOT)!r}), kernels.__file__
        cfg = transformers.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=32, max_position_embeddings=16)
        model = transformers.BertModel(cfg).eval()
        import fxsketch
        with torch.no_grad():
            out = model(torch.randint(0, 64, (2, 8))).last_hidden_state
        assert out.shape == (2, 8, 16)
        assert fxsketch.kernels.__name__ == "fxsketch.kernels"
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("ok")


def test_importing_fxsketch_loads_neither_optuna_nor_pandas_until_a_search_is_asked_for():
    script = textwrap.dedent("""
        import sys
        import fxsketch
        assert "optuna" not in sys.modules and "pandas" not in sys.modules, "eager"
        fxsketch.capture, fxsketch.LayerConfig, fxsketch.load  # the rest of the API is there at once
        assert "optuna" not in sys.modules and "pandas" not in sys.modules, "capture"
        assert callable(fxsketch.optimize) and fxsketch.Result.__name__ == "Result"
        assert "optuna" in sys.modules and "pandas" in sys.modules
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

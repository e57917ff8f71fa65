"""The code stays one a newcomer can hold in their head (issue 24): sizes checked, the longest printed."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("code_shape", ROOT / "scripts" / "code_shape.py")
code_shape = importlib.util.module_from_spec(spec)
spec.loader.exec_module(code_shape)


def test_no_function_in_nrexp_is_over_100_lines():
    sizes = code_shape.function_sizes()
    assert sizes and sizes[0][0] <= 100, f"longest functions: {sizes[:5]}"


def test_the_training_loop_fits_on_a_screen_and_fused_py_keeps_only_the_fused_parts():
    sizes = dict((name, lines) for lines, name in code_shape.function_sizes())
    assert sizes["train.py:run_loop"] <= 80, sizes["train.py:run_loop"]
    assert len((ROOT / "nrexp" / "fused.py").read_text().splitlines()) <= 450


def test_the_measure_sees_nested_functions_and_methods(tmp_path):
    (tmp_path / "m.py").write_text("class A:\n    def f(self):\n        def g():\n            pass\n        return g\n")
    assert code_shape.function_sizes(tmp_path) == [(4, "m.py:A.f"), (2, "m.py:A.f.g")]

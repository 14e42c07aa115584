"""The constants the kernels share have one source of truth per language, and the copies agree:
adaml_kernels/layout.py (Python and Triton) and csrc/adaml_update.h (C++ and CUDA)."""

import ast
import inspect
import re

import pytest

from adaml_kernels import available_backends, layout, precision


@pytest.mark.skipif("cpu" not in available_backends("cpu"), reason="needs adaml_kernels._C")
def test_the_cpp_copy_agrees_with_layout_py():
    from adaml_kernels._extension import layout_constants

    assert layout_constants() == layout.constants()


def test_the_table_columns_and_launch_fields_are_numbered_in_order():
    assert [int(c) for c in layout.Column] == list(range(layout.TABLE_COLUMNS))
    assert len(layout.Hyper._fields) == 11 and len(layout.Config._fields) == 6


def test_precision_hashes_with_layout_py_constants():
    assert (precision.MIX_1, precision.MIX_2, precision.SEED_SALT, precision.SQ_STREAM) == (
        layout.MIX_1, layout.MIX_2, layout.SEED_SALT, layout.SQ_STREAM)


def test_no_module_spells_a_shared_constant_itself():
    # The hash constants and the chunk size are written once, in layout.py.
    import adaml_kernels

    root = inspect.getfile(adaml_kernels).rsplit("/", 1)[0]
    literals = {hex(v) for v in (layout.MIX_1, layout.MIX_2, layout.SEED_SALT, layout.SQ_STREAM)}
    for name in ("buckets", "precision", "triton_kernel", "fast_path", "reference", "loss"):
        tree = ast.parse(open(f"{root}/{name}.py").read())
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, int) and not isinstance(
                    node.value, bool):
                assert hex(node.value) not in literals, (name, hex(node.value))


try:
    from adaml_kernels import triton_kernel
except ImportError:  # no triton
    triton_kernel = None


@pytest.mark.skipif(triton_kernel is None, reason="needs triton")
def test_the_triton_kernel_reads_the_table_by_column_name():
    tk = triton_kernel
    for column in layout.Column:
        assert getattr(tk, f"{column.name}_COLUMN").value == int(column)
    for name in ("MIX_1", "MIX_2", "SEED_SALT", "SQ_STREAM"):
        assert getattr(tk, name).value == getattr(layout, name)
    source = inspect.getsource(tk)
    assert "tl.load(row + PARAM_COLUMN)" in source
    assert not re.search(r"row \+ \d", source), "a bare column offset in the Triton kernel"

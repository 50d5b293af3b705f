"""On a free-threaded CPython (3.13t, 3.14t), loopwatch must not run without the GIL: the hook's
per-thread state, the code-tag cache in `co_extra` and the struct reads all assume it. The
extension says so in its module definition (the `Py_mod_gil` slot), so that importing it turns
the GIL back on, with CPython's warning, instead of racing."""

from __future__ import annotations

import ctypes
import subprocess
import sys
import sysconfig

import pytest
from loopwatch import _native

PY_MOD_GIL = 4  # Include/moduleobject.h
PY_MOD_GIL_PEP_793 = 87  # 3.15's Include/slots_generated.h: the id in a PySlot array
PY_MOD_GIL_USED = 0


def slot_array(module: object) -> tuple[int, bool]:
    """Where the module's slots are, and whether they are PEP 793 `PySlot`s: its PyModuleDef's
    `m_slots`, or from 3.15 the static array its `PyModExport_<name>` function returns, when it
    was made that way (a `PySlot` is a 16-bit id, 16 bits of flags, then the value)."""
    api = ctypes.pythonapi
    api.PyModule_GetDef.restype = ctypes.c_void_p
    api.PyModule_GetDef.argtypes = [ctypes.py_object]
    definition = api.PyModule_GetDef(module)
    if definition:
        # PyModuleDef: PyModuleDef_Base (40 bytes), m_name, m_doc, m_size, m_methods, m_slots.
        return ctypes.c_void_p.from_address(definition + 72).value or 0, False
    export = getattr(ctypes.PyDLL(module.__file__), "PyModExport_" + module.__name__.rsplit(".", 1)[-1])
    export.restype = ctypes.c_void_p
    return export() or 0, True


def module_slots(module: object) -> dict[int, int]:
    """The slots an extension module was made with: slot id -> value (0 for NULL)."""
    slots, pep_793 = slot_array(module)
    assert slots, "the extension's slots were not found"
    found: dict[int, int] = {}
    index = 0
    while slots:
        slot = ctypes.c_uint32.from_address(slots + 16 * index).value
        if pep_793:
            slot = PY_MOD_GIL if slot & 0xFFFF == PY_MOD_GIL_PEP_793 else slot & 0xFFFF
        if slot == 0:
            break
        found[slot] = ctypes.c_void_p.from_address(slots + 16 * index + 8).value or 0
        index += 1
    return found


@pytest.mark.skipif(sys.version_info < (3, 13), reason="Py_mod_gil exists from 3.13")
def test_the_extension_declares_that_it_needs_the_gil() -> None:
    assert ctypes.sizeof(ctypes.c_void_p) == 8
    assert module_slots(_native).get(PY_MOD_GIL) == PY_MOD_GIL_USED


@pytest.mark.skipif(not sysconfig.get_config_var("Py_GIL_DISABLED"), reason="a free-threaded build only")
def test_importing_loopwatch_turns_the_gil_back_on() -> None:
    done = subprocess.run(
        [sys.executable, "-c", "import loopwatch, sys; print(sys._is_gil_enabled())"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.stdout.strip() == "True", done.stderr

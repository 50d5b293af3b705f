"""The hook reads each frame's code object straight from the interpreter's structs (offsets
confirmed at import), and falls back to the C API where they cannot be confirmed; both find the
same culprits."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import textwrap

import pytest
from loopwatch import _native

SCRIPT = textwrap.dedent(
    """
    import asyncio, json, time
    from loopwatch import EventLoopMonitor, _native

    def helper():
        time.sleep(0.06)

    async def inner():
        helper()

    async def handler():
        await asyncio.sleep(0)
        await inner()

    async def busy_step():
        deadline = time.perf_counter() + 0.06
        while time.perf_counter() < deadline:
            pass

    async def main():
        reports = []
        monitor = EventLoopMonitor(threshold_ms=30, on_blocking_call=reports.append)
        monitor.activate()
        await asyncio.gather(handler(), busy_step())
        monitor.deactivate()
        print(json.dumps({
            "reads": _native._code_reads(),
            "reports": sorted([r.kind, r.method_name, [f.name for f in r.stack]] for r in reports),
        }))

    asyncio.run(main())
    """
)


def run_script(portable: bool) -> dict:
    env = dict(os.environ)
    env.pop("LOOPWATCH_PORTABLE_CODE_READS", None)
    if portable:
        env["LOOPWATCH_PORTABLE_CODE_READS"] = "1"
    done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.mark.skipif(
    sys.version_info >= (3, 16) or bool(sysconfig.get_config_var("Py_GIL_DISABLED")),
    reason="struct offsets are read from the headers of 3.9-3.15, default builds",
)
def test_the_hook_reads_code_objects_from_confirmed_struct_offsets():
    if os.environ.get("LOOPWATCH_PORTABLE_CODE_READS"):
        pytest.skip("portable reads forced by the environment")
    assert _native._code_reads() == "struct"


def test_struct_and_portable_code_reads_find_the_same_culprits():
    struct, portable = run_script(portable=False), run_script(portable=True)
    assert portable["reads"] == "portable"
    expected = [
        ["call", "time.sleep", ["__main__.handler", "__main__.inner", "__main__.helper", "time.sleep"]],
        ["step", "__main__.busy_step", ["__main__.busy_step"]],
    ]
    assert struct["reports"] == expected
    assert portable["reports"] == expected

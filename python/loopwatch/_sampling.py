"""The always-on mode's slow path, called by the native sampler when a unit has ended over the
threshold: it names the frames of the stack the watchdog read (module-qualified, as the exact mode
names them), the C function a call in progress was calling (from its call site's source), and the
task. Runs on the loop's thread with the GIL; reads source files and module dicts, never runs the
program's code."""

from __future__ import annotations

import ast
import asyncio
import builtins
import contextvars
import linecache
import os
import sys
import types
from typing import Any, Optional

from loopwatch import _native

# (filename, function, line, (end_line, col, end_col) or None, is_coroutine, stood still),
# innermost first
Frame = tuple[str, str, Optional[int], Optional[tuple[int, int, int]], bool, bool]
Name = tuple[str, str]  # (module-qualified name, module)

_modules_by_file: dict[str, str] = {}
_modules_seen = 0


def module_of_file(filename: str) -> str:
    """The name of the module loaded from `filename`; for a file loaded as no module in
    `sys.modules` (run by hand with `exec_module`), its name without the extension; "" for code
    from no file (``<string>``)."""
    global _modules_seen
    found = _modules_by_file.get(filename)
    if found is None and len(sys.modules) != _modules_seen:
        _modules_seen = len(sys.modules)
        for name, module in list(sys.modules.items()):
            path = getattr(module, "__file__", None)
            if isinstance(path, str):
                _modules_by_file.setdefault(path, name)
        found = _modules_by_file.get(filename)
    if found is None:
        stem = os.path.splitext(os.path.basename(filename))[0]
        found = "" if filename.startswith("<") else stem
    return found


def _frame_name(filename: str, function: str) -> Name:
    module = module_of_file(filename)
    return (f"{module}.{function}" if module else function, module)


def _source(filename: str, line: int, end_line: int, col: int, end_col: int) -> Optional[str]:
    """The text of a span (columns are UTF-8 byte offsets, as in code objects)."""
    lines = linecache.getlines(filename)
    if not lines or end_line > len(lines) or line > end_line:
        return None
    chunk = [text.encode() for text in lines[line - 1 : end_line]]
    if len(chunk) == 1:
        chunk[0] = chunk[0][col:end_col]
    else:
        chunk[0] = chunk[0][col:]
        chunk[-1] = chunk[-1][:end_col]
    try:
        return b"".join(chunk).decode()
    except UnicodeDecodeError:
        return None


def _dotted(node: ast.expr) -> Optional[list[str]]:
    if isinstance(node, ast.Name):
        return [node.id]
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return None if base is None else [*base, node.attr]
    return None


def _builtin_name(function: Any, fallback_module: str) -> Name:
    """A C function's name as the exact mode gives it: module-qualified, builtins bare."""
    module = str(getattr(function, "__module__", None) or fallback_module)
    qualname = str(getattr(function, "__qualname__", None) or getattr(function, "__name__", "?"))
    if module == "builtins":
        return (qualname, module)
    return (f"{module}.{qualname}", module)


def _c_function_name(parts: list[str]) -> Name:
    """The C function a call site names: through a module's dict (no attribute lookup, so no code
    runs) to the function's own module and name (`hashlib.pbkdf2_hmac` is `_hashlib.pbkdf2_hmac`);
    else as written."""
    written = ".".join(parts)
    if len(parts) == 1:
        owner: Any = builtins
        attr = parts[0]
    else:
        owner = sys.modules.get(".".join(parts[:-1]))
        attr = parts[-1]
    if isinstance(owner, types.ModuleType):
        found = vars(owner).get(attr)
        if isinstance(found, (types.BuiltinFunctionType, types.BuiltinMethodType)):
            return _builtin_name(found, owner.__name__)
        if len(parts) > 1:
            return (written, owner.__name__)
    return (written, "")


def callee_at(frame: Frame) -> Optional[Name]:
    """The function a frame was calling, if its instruction is a call in progress: the frame stood
    still at it (see the native reader) and its span is a whole call expression. The frame is the
    innermost Python frame, so the callee is C code."""
    filename, _function, line, span, _is_coroutine, still = frame
    if line is None or span is None or not still:
        return None
    end_line, col, end_col = span
    text = _source(filename, line, end_line, col, end_col)
    if text is None:
        return None
    try:
        node = ast.parse(text.strip(), mode="eval").body
    except SyntaxError:  # a span inside a call, not a call
        return None
    if not isinstance(node, ast.Call):
        return None
    parts = _dotted(node.func)
    if parts is None:
        return (f"a C call at {filename}:{line}", "")
    return _c_function_name(parts)


def _task_of(handle: Any) -> Optional[asyncio.Task[Any]]:
    """The task whose step a handle runs. Only the step wrappers of asyncio's own tasks are asked
    for their `__self__` (a bound method, or C tasks' step wrapper): any other callback could
    run the program's code when asked for an attribute."""
    if not isinstance(handle, asyncio.Handle):
        return None
    callback: Any = getattr(handle, "_callback", None)  # a slot of asyncio's own Handle
    if not isinstance(callback, types.MethodType) and type(callback).__name__ != "TaskStepMethWrapper":
        return None
    owner = callback.__self__
    return owner if isinstance(owner, asyncio.Task) else None


def _await_chain(task: asyncio.Task[Any]) -> list[Frame]:
    """Where the task's coroutines wait now, innermost first: the step's own frames when no
    stack was read in time."""
    chain: list[Frame] = []
    coro: Any = task.get_coro()
    while coro is not None and len(chain) < 64:
        frame = getattr(coro, "cr_frame", None)
        if frame is None:
            break
        code = frame.f_code
        name = getattr(code, "co_qualname", code.co_name)  # before 3.11: the bare name
        chain.append((code.co_filename, name, frame.f_lineno, None, True, False))
        coro = getattr(coro, "cr_await", None)
    chain.reverse()
    return chain


def _handle_of(handle_frame: types.FrameType) -> Any:
    """The handle a `Handle._run` frame runs: its `self`, which it sets to None as it returns;
    then the loop's `_run_once`, which called it, still holds it as `handle`. Read without
    leaving a copy of the frames' locals behind (up to 3.12 `f_locals` keeps one): it would keep
    that handle, and what its callback holds, alive after `_run_once` has moved on."""
    handle = _native._local_variable(handle_frame, "self")
    caller = handle_frame.f_back
    if handle is None and caller is not None and caller.f_code.co_name == "_run_once":
        handle = _native._local_variable(caller, "handle")
    return handle


def _context_of(task: asyncio.Task[Any]) -> Optional[contextvars.Context]:
    """The context a task runs its steps in, as asyncio's own Task keeps it (never through a
    subclass's override: no code of the program runs here). Only loops that need it (3.14+)
    ask."""
    if sys.version_info >= (3, 12):
        return asyncio.Task.get_context(task)
    return None


def _task_in(context: contextvars.Context) -> Optional[asyncio.Task[Any]]:
    """The task of the running loop whose steps run in `context` (a loop implemented in C runs
    each step in its task's context and leaves no handle to read). A task whose last step it was
    is done, so no longer among the loop's tasks: it is found where a task waits for it (`await`,
    `gather`), if one does."""
    loop = asyncio._get_running_loop()
    if loop is None:
        return None
    pending = asyncio.all_tasks(loop)
    for task in pending:
        if _context_of(task) is context:
            return task
    for task in pending:
        waited: Any = getattr(task, "_fut_waiter", None)  # asyncio's own slot
        for candidate in (waited, *(getattr(waited, "_children", None) or ())):
            if isinstance(candidate, asyncio.Task) and _context_of(candidate) is context:
                return candidate
    return None


def running_unit() -> Optional[tuple[contextvars.Context, types.FrameType]]:
    """When a watch starts inside a task step of a loop implemented in C (uvloop): the step's
    context and the frame the loop was called from, below the task's outermost coroutine (the
    unit's boundary); None anywhere else."""
    loop = asyncio._get_running_loop()
    if loop is None or isinstance(loop, asyncio.BaseEventLoop):
        return None
    task = asyncio.current_task(loop)
    if task is None:
        return None
    frame = getattr(task.get_coro(), "cr_frame", None)
    caller = frame.f_back if isinstance(frame, types.FrameType) else None
    context = _context_of(task)
    if caller is None or context is None:
        return None
    return context, caller


def describe_unit(
    ran: Optional[Any], sampled: Optional[list[Frame]], c_callback: bool
) -> tuple[list[Frame], list[Name], Optional[Name], Optional[str], Optional[int]]:
    """What the report of a unit says: its frames (innermost first), their names, the C function
    the innermost was calling, the task it was a step of, and the monitoring scope it ran in (by
    address, as the exact mode gives it: `loopwatch._scope`). `ran` is the handle that ran, or
    the running `Handle._run`'s frame, or for a loop implemented in C the context the unit ran in
    (None when the unit has not ended); `sampled` the unit's
    frames as the watchdog read them (None: no stack was read while the unit ran; empty: the unit
    had no Python frame of its own then, and `c_callback` says the callback is a C function, named
    here from asyncio's handle; a C loop's has none, and the caller names it).
    Without frames, a task's report shows where the task waits now."""
    handle = _handle_of(ran) if isinstance(ran, types.FrameType) else ran
    if isinstance(ran, contextvars.Context):
        task = _task_in(ran)
        scope = ran.get(_native.SCOPE)
    elif ran is not None:
        task = _task_of(handle)
        context = getattr(handle, "_context", None)
        scope = context.get(_native.SCOPE) if isinstance(context, contextvars.Context) else None
    else:  # reported before it ended (a flush, the monitor's end): from inside the unit itself
        task = asyncio.current_task() if asyncio._get_running_loop() is not None else None
        scope = _native.SCOPE.get(None)
    task_name = task.get_name() if task is not None else None
    callee = None
    frames: list[Frame] = []
    if sampled:
        frames = sampled
        callee = callee_at(frames[0])
    elif c_callback and task is None:
        function = getattr(handle, "_callback", None)
        if isinstance(function, (types.BuiltinFunctionType, types.BuiltinMethodType)):
            callee = _builtin_name(function, "")
    elif task is not None:
        frames = _await_chain(task)
    names = [_frame_name(frame[0], frame[1]) for frame in frames]
    return frames, names, callee, task_name, id(scope) if scope is not None else None

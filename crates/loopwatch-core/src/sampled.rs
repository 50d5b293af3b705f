//! The always-on mode's episodes: a unit (callback or task step) timed from its boundaries on the
//! loop's thread, blamed from the last stack the watchdog read while it ran. What the sample
//! shows is all there is: the frames it held, and for a call in progress the C function named
//! from its call site.

use crate::episode::{next_episode_id, Episode, EpisodeKind, GilHolder, StackFrame};
use crate::filter::FilterSet;
use crate::gil::{not_the_code, waited_frame};
use crate::stall::SampledFrame;

/// The frames of a sampled stack (innermost first) that belong to the unit: those inside its
/// boundary frame (the loop's `Handle._run`), which is left out with everything outside it.
/// `None` when the boundary is not on the stack: the sample was not taken while the unit ran.
pub fn unit_frames(
    stack: &[SampledFrame],
    is_boundary: impl Fn(&SampledFrame) -> bool,
) -> Option<&[SampledFrame]> {
    let boundary = stack.iter().position(is_boundary)?;
    Some(&stack[..boundary])
}

/// The boundary of a unit of asyncio's own loops: `Handle._run`, which runs each callback
/// (a task step is one) inside the loop's `_run_once`.
pub fn is_unit_boundary(frame: &SampledFrame) -> bool {
    frame.function == "Handle._run"
        && (frame.filename.ends_with("/asyncio/events.py")
            || frame.filename.ends_with("\\asyncio\\events.py"))
}

/// What a switch of a thread's current `contextvars.Context` means for the units of a loop
/// implemented in C (uvloop). It calls no Python code between callbacks, but runs each (a task
/// step is one) inside the context it was scheduled in, entered from C, and its own work too
/// (uvloop runs the ready callbacks from a handler of its own, in a context of that handler's):
/// so a unit is the time between two switches the loop makes, with no Python frame of the
/// unit's on the stack ("at the loop's level"), while the thread is in some context the loop
/// entered. Switches made by the program's code (`Context.run`) happen inside its frames.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ContextSwitch {
    /// No unit ran, and the loop enters a context: a unit starts; the thread's context before it
    /// (`base`, 0 for none) is the loop's own level, where no unit runs.
    Start { base: usize },
    /// The running unit ends, and the thread is back at the loop's own level.
    End,
    /// The running unit ends and the next starts at once, in the context switched to (the loop
    /// leaves one callback's context for its own handler's, or enters a callback's from it).
    Restart,
    /// A switch inside the running unit's own code, or one that enters nothing.
    Neither,
}

/// Decides what a switch to context `new` (its address; 0 for none) means. `entered`: `new` is
/// an entered context, and `new_prev` the one it was entered from; `running_base`: the base of
/// the unit running, if one is; `at_loop_level`: the switch was made with no Python frame of
/// that unit on the stack. A switch to a context that is not entered is back at the loop's own
/// level whatever the base was thought to be (a unit the watch learned of late).
pub fn context_switch(
    running_base: Option<usize>,
    at_loop_level: bool,
    new: usize,
    entered: bool,
    new_prev: usize,
) -> ContextSwitch {
    match running_base {
        None if new != 0 && entered => ContextSwitch::Start { base: new_prev },
        Some(base) if at_loop_level && (new == base || !entered) => ContextSwitch::End,
        Some(_) if at_loop_level => ContextSwitch::Restart,
        Some(_) | None => ContextSwitch::Neither,
    }
}

/// How the binding names a sampled frame (it knows the modules): `module.qualname` and `module`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FrameName {
    pub name: String,
    pub module: String,
}

/// What is known of a unit when it ends.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SampledUnit {
    pub duration_ns: u64,
    pub threshold_ns: u64,
    /// Of the duration, how long (at least) the thread waited for a CPU.
    pub cpu_wait_ns: u64,
    /// Of the duration, how long the thread spent in garbage collections, and the oldest
    /// generation among them.
    pub gc_ns: u64,
    pub gc_generation: Option<u8>,
    /// Of the duration, how long the thread waited for the GIL, and who held it meanwhile.
    pub gil_wait_ns: u64,
    pub gil_holders: Vec<GilHolder>,
    pub reports_while_running: u32,
    pub task_name: Option<String>,
    pub scope: Option<u64>,
}

/// The C function the innermost frame was calling when the stack was read, named from the call
/// site's source (`time.sleep`), and the module the filters see it in.
pub type Callee = FrameName;

/// The episode for a unit that ran past the threshold, from the unit's frames (innermost first,
/// see `unit_frames`) and their names (in the same order). The culprit is the deepest frame the
/// filters allow, a C callee deepest of all; `None` when they allow none (as in the exact mode,
/// such an episode blames nothing and is dropped) or there is nothing to blame (no frames and no
/// callee; a callee alone is a C function run as the callback itself). Every frame is given the
/// unit's duration: a sample says what was on the stack, not for how long.
pub fn sampled_episode(
    unit: &SampledUnit,
    frames: &[SampledFrame],
    names: &[FrameName],
    callee: Option<&Callee>,
    filters: &FilterSet,
) -> Option<Episode> {
    if (frames.is_empty() && callee.is_none()) || names.len() != frames.len() {
        return None;
    }
    let mut stack: Vec<StackFrame> = frames
        .iter()
        .zip(names)
        .rev()
        .map(|(frame, name)| StackFrame {
            name: name.name.clone(),
            filename: Some(frame.filename.clone()),
            lineno: frame.line,
            end_lineno: None,
            duration_ns: unit.duration_ns,
            is_c_call: false,
            is_coroutine: frame.is_coroutine,
            included: filters.allows(&name.name, &name.module, Some(&frame.filename)),
        })
        .collect();
    if let Some(callee) = callee {
        stack.push(StackFrame {
            name: callee.name.clone(),
            filename: None,
            lineno: None,
            end_lineno: None,
            duration_ns: unit.duration_ns,
            is_c_call: true,
            is_coroutine: false,
            included: filters.allows(&callee.name, &callee.module, None),
        });
    }
    let mut culprit = stack.iter().rposition(|frame| frame.included)?;
    // As in the exact mode, the stack ends at the culprit.
    stack.truncate(culprit + 1);
    let waited = not_the_code(
        unit.duration_ns,
        unit.cpu_wait_ns,
        unit.gc_ns,
        unit.gil_wait_ns,
        unit.threshold_ns,
    );
    let kind = if let Some(cause) = waited {
        // Over the threshold only because of collections or waits for the GIL: those are the
        // culprit, below the frame they interrupted.
        let (kind, frame) = waited_frame(
            cause,
            unit.gc_generation,
            unit.gc_ns,
            &unit.gil_holders,
            unit.gil_wait_ns,
        );
        stack.push(frame);
        culprit += 1;
        kind
    } else if stack[culprit].is_coroutine {
        EpisodeKind::Step
    } else if stack[..culprit].iter().any(|frame| frame.is_coroutine) {
        EpisodeKind::Call
    } else {
        EpisodeKind::Callback
    };
    Some(Episode {
        kind,
        duration_ns: unit.duration_ns,
        threshold_ns: unit.threshold_ns,
        cpu_wait_ns: unit.cpu_wait_ns.min(unit.duration_ns),
        gc_ns: unit.gc_ns.min(unit.duration_ns),
        gc_generation: unit.gc_generation,
        gil_wait_ns: unit.gil_wait_ns.min(unit.duration_ns),
        gil_holders: unit.gil_holders.clone(),
        stack,
        culprit,
        task_name: unit.task_name.clone(),
        scope: unit.scope,
        reports_while_running: unit.reports_while_running,
        // One stack read names one culprit per unit.
        episode_id: next_episode_id(),
        culprits: 1,
        share_ns: unit.duration_ns,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(function: &str, filename: &str, line: u32, is_coroutine: bool) -> SampledFrame {
        SampledFrame {
            filename: filename.into(),
            function: function.into(),
            line: Some(line),
            span: None,
            is_coroutine,
            still: false,
        }
    }

    fn name(module: &str, function: &str) -> FrameName {
        FrameName {
            name: format!("{module}.{function}"),
            module: module.into(),
        }
    }

    fn unit() -> SampledUnit {
        SampledUnit {
            duration_ns: 50_000_000,
            threshold_ns: 10_000_000,
            ..SampledUnit::default()
        }
    }

    fn no_filters() -> FilterSet {
        FilterSet::new::<[&str; 0], [&str; 0], &str, &str>([], []).unwrap()
    }

    /// A task step blocked in `time.sleep`, called by `fetch` from `handler`: innermost first,
    /// as read, with the loop's own frames outside the boundary.
    fn blocked_step() -> Vec<SampledFrame> {
        vec![
            frame("fetch", "/app/app.py", 12, false),
            frame("handler", "/app/app.py", 20, true),
            frame("Handle._run", "/py/asyncio/events.py", 88, false),
            frame(
                "BaseEventLoop._run_once",
                "/py/asyncio/base_events.py",
                1900,
                false,
            ),
        ]
    }

    fn is_handle_run(frame: &SampledFrame) -> bool {
        is_unit_boundary(frame)
    }

    #[test]
    fn a_unit_is_the_frames_inside_its_boundary_and_none_without_it() {
        let stack = blocked_step();
        let inside = unit_frames(&stack, is_handle_run).unwrap();
        assert_eq!(inside.len(), 2);
        assert_eq!(inside[1].function, "handler");
        assert!(unit_frames(&stack[3..], is_handle_run).is_none());
        assert!(unit_frames(&[], is_handle_run).is_none());
    }

    #[test]
    fn a_c_call_in_progress_is_the_culprit_of_a_sync_call_made_from_a_step() {
        let stack = blocked_step();
        let inside = unit_frames(&stack, is_handle_run).unwrap();
        let names = [name("app", "fetch"), name("app", "handler")];
        let sleep = name("time", "sleep");
        let episode =
            sampled_episode(&unit(), inside, &names, Some(&sleep), &no_filters()).unwrap();
        assert_eq!(episode.kind, EpisodeKind::Call);
        let culprit = episode.culprit_frame();
        assert_eq!(culprit.name, "time.sleep");
        assert!(culprit.is_c_call);
        // Outermost first; the place to look is the line that called it.
        let names: Vec<&str> = episode.stack.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(names, ["app.handler", "app.fetch", "time.sleep"]);
        assert_eq!(episode.location(), (Some("/app/app.py"), Some(12)));
        assert_eq!(episode.duration_ns, 50_000_000);
    }

    #[test]
    fn filters_move_the_culprit_out_to_the_deepest_frame_they_allow() {
        let stack = blocked_step();
        let inside = unit_frames(&stack, is_handle_run).unwrap();
        let names = [name("lib.http", "fetch"), name("app", "handler")];
        let filters = FilterSet::new(["app"], [] as [&str; 0]).unwrap();
        let sleep = name("time", "sleep");
        let episode = sampled_episode(&unit(), inside, &names, Some(&sleep), &filters).unwrap();
        assert_eq!(episode.culprit_frame().name, "app.handler");
        assert_eq!(episode.kind, EpisodeKind::Step);
        assert_eq!(episode.stack.len(), 1, "the stack ends at the culprit");
        let nothing = FilterSet::new(["elsewhere"], [] as [&str; 0]).unwrap();
        assert!(sampled_episode(&unit(), inside, &names, Some(&sleep), &nothing).is_none());
    }

    #[test]
    fn python_code_running_in_a_plain_callback_is_a_callback_episode() {
        let frames = [frame("on_data", "/app/proto.py", 40, false)];
        let names = [name("app.proto", "on_data")];
        let episode = sampled_episode(&unit(), &frames, &names, None, &no_filters()).unwrap();
        assert_eq!(episode.kind, EpisodeKind::Callback);
        assert_eq!(episode.culprit, 0);
        assert_eq!(episode.location(), (Some("/app/proto.py"), Some(40)));
    }

    #[test]
    fn a_step_busy_in_its_own_code_is_a_step_episode() {
        let frames = [frame("handler", "/app/app.py", 22, true)];
        let names = [name("app", "handler")];
        let mut waited = unit();
        waited.cpu_wait_ns = 45_000_000;
        let episode = sampled_episode(&waited, &frames, &names, None, &no_filters()).unwrap();
        assert_eq!(episode.kind, EpisodeKind::Step);
        // Most of it was a wait for a CPU: no code is to blame.
        assert!(episode.starved());
    }

    #[test]
    fn a_c_function_run_as_the_callback_itself_is_a_callback_episode() {
        let sleep = name("time", "sleep");
        let episode = sampled_episode(&unit(), &[], &[], Some(&sleep), &no_filters()).unwrap();
        assert_eq!(episode.kind, EpisodeKind::Callback);
        assert_eq!(episode.culprit_frame().name, "time.sleep");
        assert_eq!(episode.location(), (None, None));
    }

    #[test]
    fn no_frames_or_names_that_do_not_match_make_no_episode() {
        let names = [name("app", "handler")];
        assert!(sampled_episode(&unit(), &[], &[], None, &no_filters()).is_none());
        let frames = blocked_step();
        assert!(sampled_episode(&unit(), &frames[..2], &names, None, &no_filters()).is_none());
    }

    #[test]
    fn a_unit_over_the_threshold_only_because_of_a_collection_names_the_collection() {
        let frames = [frame("handler", "/app/app.py", 22, true)];
        let names = [name("app", "handler")];
        let mut collected = unit();
        collected.gc_ns = 45_000_000;
        collected.gc_generation = Some(2);
        let episode = sampled_episode(&collected, &frames, &names, None, &no_filters()).unwrap();
        assert_eq!(episode.kind, EpisodeKind::Gc);
        assert_eq!(
            episode.culprit_frame().name,
            "garbage collection (generation 2)"
        );
        assert_eq!(episode.location(), (Some("/app/app.py"), Some(22)));
        assert_eq!(
            (episode.gc_ns, episode.gc_generation),
            (45_000_000, Some(2))
        );
        // A shorter collection leaves the code over the threshold: the code is blamed.
        collected.gc_ns = 5_000_000;
        let episode = sampled_episode(&collected, &frames, &names, None, &no_filters()).unwrap();
        assert_eq!(episode.kind, EpisodeKind::Step);
        assert_eq!(episode.culprit_frame().name, "app.handler");
    }

    #[test]
    fn each_callback_a_c_loop_runs_from_its_own_handler_is_a_unit_of_its_own() {
        let (idle, handler, first, second) = (0x100, 0x200, 0x300, 0x400);
        // uvloop enters its handler's context from its idle one: a unit starts.
        assert_eq!(
            context_switch(None, true, handler, true, idle),
            ContextSwitch::Start { base: idle }
        );
        // It enters the first callback's context from there, and leaves it: one unit each.
        assert_eq!(
            context_switch(Some(idle), true, first, true, handler),
            ContextSwitch::Restart
        );
        assert_eq!(
            context_switch(Some(idle), true, handler, true, idle),
            ContextSwitch::Restart
        );
        assert_eq!(
            context_switch(Some(idle), true, second, true, handler),
            ContextSwitch::Restart
        );
        // Back in its idle context: no unit runs, whether that context was entered or not.
        assert_eq!(
            context_switch(Some(idle), true, idle, false, 0),
            ContextSwitch::End
        );
        assert_eq!(
            context_switch(Some(idle), true, idle, true, 0x50),
            ContextSwitch::End
        );
        // The thread had no context at all before the loop entered one.
        assert_eq!(
            context_switch(None, true, first, true, 0),
            ContextSwitch::Start { base: 0 }
        );
        assert_eq!(
            context_switch(Some(0), true, 0, false, 0),
            ContextSwitch::End
        );
    }

    #[test]
    fn the_programs_own_context_switches_inside_a_unit_change_nothing() {
        let (idle, first, nested) = (0x100, 0x300, 0x500);
        assert_eq!(
            context_switch(Some(idle), false, nested, true, first),
            ContextSwitch::Neither
        );
        assert_eq!(
            context_switch(Some(idle), false, first, true, idle),
            ContextSwitch::Neither
        );
    }

    #[test]
    fn a_switch_to_a_context_not_entered_starts_nothing_and_ends_a_unit_whose_base_was_guessed() {
        assert_eq!(
            context_switch(None, true, 0, false, 0),
            ContextSwitch::Neither
        );
        assert_eq!(
            context_switch(None, true, 0x100, false, 0),
            ContextSwitch::Neither
        );
        // A watch that started inside a unit took the wrong base: the loop's own level ends it.
        assert_eq!(
            context_switch(Some(0x999), true, 0x100, false, 0),
            ContextSwitch::End
        );
    }
}

//! Recordings from Python: the writer that appends records to a file and the reader that hands
//! them back. The format and every decision about damage are `loopwatch_core::recording`'s.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{self, BufReader, Read, Write};
use std::path::PathBuf;
use std::sync::Mutex;

use loopwatch_core::recording::{
    append, starts_recording, OpenError, Record, RecordReader, RecordedEpisode, RecordedFrame,
    RecordedStall, SessionRecord, FILE_START,
};
use loopwatch_core::EpisodeKind;
use pyo3::exceptions::{PyOSError, PyStopIteration, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyDict;

/// A stack frame as Python passes it: `(name, filename, lineno, end_lineno, duration_ms,
/// is_c_call, is_coroutine, included, user_code)`, the order of `StackFrame`'s fields.
type FrameTuple = (
    String,
    Option<String>,
    Option<u32>,
    Option<u32>,
    f64,
    bool,
    bool,
    bool,
    Option<bool>,
);

/// Appends records to a recording, each in one write: records of several threads, or of
/// processes sharing the file, never interleave.
#[pyclass(frozen, module = "loopwatch._native")]
pub struct RecordingWriter {
    file: Mutex<File>,
}

#[pymethods]
impl RecordingWriter {
    /// Opens `path` to add to it, starting the recording if the file is new or empty. A file
    /// that holds something else is left alone: `ValueError`.
    #[new]
    #[allow(clippy::needless_pass_by_value)] // pyo3 hands over an owned path
    fn new(path: PathBuf) -> PyResult<Self> {
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(&path)
            .map_err(os_error)?;
        // A new file's position is its start; writes in append mode go to the end whatever it is.
        let mut start = Vec::with_capacity(FILE_START.len());
        (&mut file)
            .take(FILE_START.len() as u64)
            .read_to_end(&mut start)
            .map_err(os_error)?;
        if start.is_empty() {
            file.write_all(FILE_START).map_err(os_error)?;
        } else if !starts_recording(&start) {
            return Err(PyValueError::new_err(
                "it holds something else than a loopwatch recording: not adding to it",
            ));
        }
        Ok(Self {
            file: Mutex::new(file),
        })
    }

    /// Empties the recording and starts it afresh. Only a file already known to be a recording
    /// (or new) gets here: `new` refused anything else.
    fn restart(&self) -> PyResult<()> {
        let file = self.lock();
        file.set_len(0).map_err(os_error)?;
        (&*file).write_all(FILE_START).map_err(os_error)
    }

    #[pyo3(signature = (process_id, argv, started_at, python_version, loopwatch_version))]
    fn write_session(
        &self,
        process_id: u32,
        argv: Vec<String>,
        started_at: f64,
        python_version: String,
        loopwatch_version: String,
    ) -> PyResult<()> {
        self.write(&Record::Session(SessionRecord {
            process_id,
            argv,
            started_at,
            python_version,
            loopwatch_version,
        }))
    }

    /// Writes one episode, given as a dict with `RecordedEpisode`'s fields.
    fn write_episode(&self, episode: &Bound<'_, PyDict>) -> PyResult<()> {
        let record = Record::Episode(Box::new(episode_from_python(episode)?));
        self.write(&record)
    }
}

impl RecordingWriter {
    fn lock(&self) -> std::sync::MutexGuard<'_, File> {
        self.file
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write(&self, record: &Record) -> PyResult<()> {
        append(&mut self.lock(), record).map_err(os_error)
    }
}

/// An `OSError` as Python raises its own: `(errno, strerror)`, so that it is the right subclass
/// (`FileNotFoundError`, …) and its `strerror` reads without Rust's "(os error N)".
#[allow(clippy::needless_pass_by_value)] // used as `map_err(os_error)`
fn os_error(error: io::Error) -> PyErr {
    let text = error.to_string();
    match error.raw_os_error() {
        Some(code) => {
            let suffix = format!(" (os error {code})");
            PyOSError::new_err((code, text.strip_suffix(&suffix).unwrap_or(&text).to_owned()))
        }
        None => PyOSError::new_err(text),
    }
}

/// A record written in part (the disk filled up) would hide every record after it: cut it off,
/// unless someone else has written after it meanwhile. Gives back the error that stopped it.
/// A stall reported while it ran, as Python reads it (`loopwatch._stalls.StallInfo`'s fields).
pub fn stall_to_python<'py>(
    py: Python<'py>,
    stall: &RecordedStall,
) -> PyResult<Bound<'py, PyDict>> {
    let dict = PyDict::new(py);
    dict.set_item("timestamp", stall.timestamp)?;
    dict.set_item("process_id", stall.process_id)?;
    dict.set_item("thread_id", stall.thread_id)?;
    dict.set_item("thread_name", &stall.thread_name)?;
    dict.set_item("so_far_ms", stall.so_far_ms)?;
    dict.set_item("threshold_ms", stall.threshold_ms)?;
    dict.set_item("number", stall.number)?;
    dict.set_item("in_gc", stall.in_gc)?;
    let stack: Vec<(&str, &str, Option<u32>)> = stall
        .stack
        .iter()
        .map(|f| (f.filename.as_str(), f.function.as_str(), f.lineno))
        .collect();
    dict.set_item("stack", stack)?;
    Ok(dict)
}

/// Reads a recording record by record: `("session", dict)`, `("episode", dict)`, `("stall", dict)`, or
/// `("damage", message)` where the file is damaged (reading goes on if it can).
#[pyclass(unsendable, module = "loopwatch._native")]
pub struct RecordingReader {
    records: RecordReader<BufReader<File>>,
    size: u64,
}

#[pymethods]
impl RecordingReader {
    /// `OSError` if the file cannot be opened, `ValueError` if it is no recording.
    #[new]
    #[allow(clippy::needless_pass_by_value)] // pyo3 hands over an owned path
    fn new(path: PathBuf) -> PyResult<Self> {
        let file = File::open(&path).map_err(os_error)?;
        let size = file.metadata().map_err(os_error)?.len();
        let records =
            RecordReader::new(BufReader::with_capacity(1 << 16, file)).map_err(|e| match e {
                OpenError::Io(e) => os_error(e),
                other => PyValueError::new_err(other.to_string()),
            })?;
        Ok(Self { records, size })
    }

    /// Bytes read so far.
    #[getter]
    fn offset(&self) -> u64 {
        self.records.offset()
    }

    /// The file's size when it was opened.
    #[getter]
    fn size(&self) -> u64 {
        self.size
    }

    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__<'py>(&mut self, py: Python<'py>) -> PyResult<(&'static str, Bound<'py, PyAny>)> {
        loop {
            return match self.records.next() {
                None => Err(PyStopIteration::new_err(())),
                Some(Err(damage)) => {
                    Ok(("damage", damage.to_string().into_pyobject(py)?.into_any()))
                }
                Some(Ok(Record::Session(session))) => {
                    Ok(("session", session_to_python(py, &session)?.into_any()))
                }
                Some(Ok(Record::Episode(episode))) => {
                    Ok(("episode", episode_to_python(py, &episode)?.into_any()))
                }
                Some(Ok(Record::Stall(stall))) => {
                    Ok(("stall", stall_to_python(py, &stall)?.into_any()))
                }
                Some(Ok(Record::Unknown)) => continue,
            };
        }
    }
}

fn item<'py, T: FromPyObjectOwned<'py>>(dict: &Bound<'py, PyDict>, key: &str) -> PyResult<T> {
    let value = dict
        .get_item(key)?
        .ok_or_else(|| PyValueError::new_err(format!("an episode needs {key:?}")))?;
    value.extract::<T>().map_err(|e| {
        let e: PyErr = e.into();
        PyValueError::new_err(format!("episode field {key:?}: {e}"))
    })
}

fn episode_from_python(dict: &Bound<'_, PyDict>) -> PyResult<RecordedEpisode> {
    let kind: String = item(dict, "kind")?;
    let kind = match kind.as_str() {
        "call" => EpisodeKind::Call,
        "callback" => EpisodeKind::Callback,
        "step" => EpisodeKind::Step,
        "gc" => EpisodeKind::Gc,
        "gil" => EpisodeKind::Gil,
        other => {
            return Err(PyValueError::new_err(format!(
                "unknown episode kind {other:?}"
            )))
        }
    };
    let stack: Vec<FrameTuple> = item(dict, "stack")?;
    let context: Option<BTreeMap<String, String>> = item(dict, "context")?;
    Ok(RecordedEpisode {
        timestamp: item(dict, "timestamp")?,
        process_id: item(dict, "process_id")?,
        thread_id: item(dict, "thread_id")?,
        kind,
        method_name: item(dict, "method_name")?,
        duration_ms: item(dict, "duration_ms")?,
        culprit_duration_ms: item(dict, "culprit_duration_ms")?,
        threshold_ms: item(dict, "threshold_ms")?,
        cpu_wait_ms: item(dict, "cpu_wait_ms")?,
        gc_ms: dict
            .get_item("gc_ms")?
            .map_or(Ok(0.0), |value| value.extract())?,
        gil_wait_ms: dict
            .get_item("gil_wait_ms")?
            .map_or(Ok(0.0), |value| value.extract())?,
        is_c_call: item(dict, "is_c_call")?,
        filename: item(dict, "filename")?,
        lineno: item(dict, "lineno")?,
        end_lineno: item(dict, "end_lineno")?,
        task_name: item(dict, "task_name")?,
        context: context.unwrap_or_default(),
        reports_while_running: dict
            .get_item("reports_while_running")?
            .map_or(Ok(0), |value| value.extract())?,
        episode_id: dict
            .get_item("episode_id")?
            .map_or(Ok(0), |value| value.extract())?,
        culprits_in_episode: dict
            .get_item("culprits_in_episode")?
            .map_or(Ok(1), |value| value.extract())?,
        share_ms: dict
            .get_item("share_ms")?
            .map_or(Ok(None), |value| value.extract())?,
        stack: stack
            .into_iter()
            .map(
                |(
                    name,
                    filename,
                    lineno,
                    end_lineno,
                    duration_ms,
                    is_c_call,
                    is_coroutine,
                    included,
                    user_code,
                )| {
                    RecordedFrame {
                        name,
                        filename,
                        lineno,
                        end_lineno,
                        duration_ms,
                        is_c_call,
                        is_coroutine,
                        included,
                        user_code,
                    }
                },
            )
            .collect(),
    })
}

fn episode_to_python<'py>(
    py: Python<'py>,
    episode: &RecordedEpisode,
) -> PyResult<Bound<'py, PyDict>> {
    let dict = PyDict::new(py);
    dict.set_item("timestamp", episode.timestamp)?;
    dict.set_item("process_id", episode.process_id)?;
    dict.set_item("thread_id", episode.thread_id)?;
    dict.set_item("kind", episode.kind.as_str())?;
    dict.set_item("method_name", &episode.method_name)?;
    dict.set_item("duration_ms", episode.duration_ms)?;
    dict.set_item("culprit_duration_ms", episode.culprit_duration_ms)?;
    dict.set_item("threshold_ms", episode.threshold_ms)?;
    dict.set_item("cpu_wait_ms", episode.cpu_wait_ms)?;
    dict.set_item("gc_ms", episode.gc_ms)?;
    dict.set_item("gil_wait_ms", episode.gil_wait_ms)?;
    dict.set_item("is_c_call", episode.is_c_call)?;
    dict.set_item("filename", episode.filename.as_deref())?;
    dict.set_item("lineno", episode.lineno)?;
    dict.set_item("end_lineno", episode.end_lineno)?;
    dict.set_item("task_name", episode.task_name.as_deref())?;
    dict.set_item("reports_while_running", episode.reports_while_running)?;
    dict.set_item("episode_id", episode.episode_id)?;
    dict.set_item("culprits_in_episode", episode.culprits_in_episode)?;
    dict.set_item("share_ms", episode.share_ms.unwrap_or(episode.duration_ms))?;
    dict.set_item(
        "context",
        if episode.context.is_empty() {
            None
        } else {
            Some(&episode.context)
        },
    )?;
    let stack = episode
        .stack
        .iter()
        .map(|f| {
            (
                f.name.as_str(),
                f.filename.as_deref(),
                f.lineno,
                f.end_lineno,
                f.duration_ms,
                f.is_c_call,
                f.is_coroutine,
                f.included,
                f.user_code,
            )
        })
        .collect::<Vec<_>>();
    dict.set_item("stack", stack)?;
    Ok(dict)
}

fn session_to_python<'py>(
    py: Python<'py>,
    session: &SessionRecord,
) -> PyResult<Bound<'py, PyDict>> {
    let dict = PyDict::new(py);
    dict.set_item("process_id", session.process_id)?;
    dict.set_item("argv", &session.argv)?;
    dict.set_item("started_at", session.started_at)?;
    dict.set_item("python_version", &session.python_version)?;
    dict.set_item("loopwatch_version", &session.loopwatch_version)?;
    Ok(dict)
}

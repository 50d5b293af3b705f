//! Which frames may be blamed. A pattern is either a module name (`myapp`, `myapp.db.*`), matched
//! on dotted boundaries, or a file path (anything with a `/`), matched on directory boundaries;
//! `*`, `?` and `[...]` make either a glob over the whole name or path.

use std::fmt;

/// Modules that are never blamed: loopwatch itself and the event loop's own machinery.
pub const DEFAULT_EXCLUDES: [&str; 3] = ["loopwatch", "asyncio", "uvloop"];

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FilterError {
    pub pattern: String,
    pub reason: &'static str,
}

impl fmt::Display for FilterError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "bad path pattern {:?}: {}", self.pattern, self.reason)
    }
}

impl std::error::Error for FilterError {}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Pattern {
    Module(String),
    ModuleGlob(String),
    Path(String),
    PathGlob(String),
}

impl Pattern {
    fn parse(text: &str) -> Result<Self, FilterError> {
        let error = |reason| FilterError {
            pattern: text.to_owned(),
            reason,
        };
        if text.trim().is_empty() {
            return Err(error("it is empty"));
        }
        let is_glob = text.contains(['*', '?', '[']);
        if text.contains(['/', '\\']) {
            return Ok(if is_glob {
                Pattern::PathGlob(text.to_owned())
            } else {
                Pattern::Path(text.to_owned())
            });
        }
        let valid_module = text.split('.').all(|part| {
            !part.is_empty()
                && !part.starts_with(|c: char| c.is_ascii_digit())
                && part
                    .chars()
                    .all(|c| c.is_alphanumeric() || matches!(c, '_' | '*' | '?' | '[' | ']' | '!'))
        });
        if !valid_module {
            return Err(error(
                "it is neither a module name (like 'myapp.db') nor a path (a pattern with '/', \
                 like '/srv/app' or '*/site-packages/*')",
            ));
        }
        Ok(if is_glob {
            Pattern::ModuleGlob(text.to_owned())
        } else {
            Pattern::Module(text.to_owned())
        })
    }

    fn matches(&self, name: &str, module: &str, filename: Option<&str>) -> bool {
        match self {
            Pattern::Module(p) => within_module(name, p) || within_module(module, p),
            Pattern::ModuleGlob(p) => glob_match(p, name) || glob_match(p, module),
            Pattern::Path(p) => filename.is_some_and(|f| within_dir(f, p)),
            Pattern::PathGlob(p) => filename.is_some_and(|f| glob_match(p, f)),
        }
    }
}

/// `name` is `prefix` itself or sits under it on a dot boundary (`asyncio` covers
/// `asyncio.tasks.gather`, not `asyncio_extras.x`).
fn within_module(name: &str, prefix: &str) -> bool {
    name.strip_prefix(prefix)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('.'))
}

/// `path` is `prefix` itself or sits under it on a directory boundary.
fn within_dir(path: &str, prefix: &str) -> bool {
    path.strip_prefix(prefix).is_some_and(|rest| {
        rest.is_empty() || prefix.ends_with(['/', '\\']) || rest.starts_with(['/', '\\'])
    })
}

/// Shell-style glob over the whole text: `*` any run (including `/` and `.`), `?` one character,
/// `[abc]`, `[a-z]` and `[!abc]` one character of a set.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let pattern: Vec<char> = pattern.chars().collect();
    let text: Vec<char> = text.chars().collect();
    let (mut p, mut t) = (0, 0);
    let mut backtrack: Option<(usize, usize)> = None;
    while t < text.len() {
        let step = match pattern.get(p) {
            Some('*') => {
                backtrack = Some((p, t));
                p += 1;
                continue;
            }
            Some('?') => Some(p + 1),
            Some('[') => match_class(&pattern, p, text[t]),
            Some(&c) if c == text[t] => Some(p + 1),
            _ => None,
        };
        if let Some(next) = step {
            p = next;
            t += 1;
        } else if let Some((star, matched)) = backtrack {
            p = star + 1;
            t = matched + 1;
            backtrack = Some((star, matched + 1));
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|&c| c == '*')
}

/// Matches `c` against the class starting at `pattern[open]`; returns the index after the class.
/// An unclosed `[` is an ordinary character.
fn match_class(pattern: &[char], open: usize, c: char) -> Option<usize> {
    let mut i = open + 1;
    let negate = matches!(pattern.get(i), Some('!' | '^'));
    if negate {
        i += 1;
    }
    let first = i;
    let mut found = false;
    while i < pattern.len() && (pattern[i] != ']' || i == first) {
        if pattern.get(i + 1) == Some(&'-') && pattern.get(i + 2).is_some_and(|&e| e != ']') {
            found |= pattern[i] <= c && c <= pattern[i + 2];
            i += 3;
        } else {
            found |= pattern[i] == c;
            i += 1;
        }
    }
    if i >= pattern.len() {
        return (c == '[').then_some(open + 1);
    }
    (found != negate).then_some(i + 1)
}

/// Include and exclude patterns, compiled once when a monitor is built.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FilterSet {
    include: Vec<Pattern>,
    exclude: Vec<Pattern>,
}

impl FilterSet {
    /// `include` empty means every frame may be blamed; `exclude` is added to [`DEFAULT_EXCLUDES`].
    pub fn new<I, E, S, T>(include: I, exclude: E) -> Result<Self, FilterError>
    where
        I: IntoIterator<Item = S>,
        E: IntoIterator<Item = T>,
        S: AsRef<str>,
        T: AsRef<str>,
    {
        let include = include
            .into_iter()
            .map(|p| Pattern::parse(p.as_ref()))
            .collect::<Result<_, _>>()?;
        let exclude = DEFAULT_EXCLUDES
            .iter()
            .map(|p| Pattern::parse(p))
            .chain(exclude.into_iter().map(|p| Pattern::parse(p.as_ref())))
            .collect::<Result<_, _>>()?;
        Ok(Self { include, exclude })
    }

    /// Whether a frame with this module-qualified name, module and file may be blamed.
    pub fn allows(&self, name: &str, module: &str, filename: Option<&str>) -> bool {
        let hit = |p: &Pattern| p.matches(name, module, filename);
        (self.include.is_empty() || self.include.iter().any(hit)) && !self.exclude.iter().any(hit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allows(filters: &FilterSet, name: &str, file: Option<&str>) -> bool {
        let module = name.rsplit_once('.').map_or(name, |(m, _)| m);
        filters.allows(name, module, file)
    }

    #[test]
    fn defaults_exclude_asyncio_and_loopwatch_but_not_lookalikes() {
        let f = FilterSet::new::<[&str; 0], [&str; 0], &str, &str>([], []).unwrap();
        assert!(!allows(
            &f,
            "asyncio.tasks.gather",
            Some("/usr/lib/python3.12/asyncio/tasks.py")
        ));
        assert!(!allows(
            &f,
            "loopwatch._monitor.EventLoopMonitor.activate",
            None
        ));
        assert!(allows(
            &f,
            "asyncio_helpers.run",
            Some("/srv/asyncio_helpers.py")
        ));
        assert!(allows(
            &f,
            "myapp.typing_utils.check",
            Some("/srv/concurrent/typing/x.py")
        ));
        assert!(allows(&f, "time.sleep", None));
    }

    #[test]
    fn module_patterns_match_on_dot_boundaries() {
        let f = FilterSet::new(["myapp"], ["myapp.vendor"]).unwrap();
        assert!(allows(&f, "myapp.service.process_data", None));
        assert!(!allows(&f, "myapp.vendor.lib.call", None));
        assert!(!allows(&f, "myapplication.x", None));
        assert!(!allows(&f, "time.sleep", None));
    }

    #[test]
    fn path_patterns_match_on_directory_boundaries() {
        let f = FilterSet::new(["/srv/app"], ["/srv/app/tests/"]).unwrap();
        assert!(allows(&f, "a.f", Some("/srv/app/a.py")));
        assert!(!allows(&f, "a.f", Some("/srv/apple/a.py")));
        assert!(!allows(&f, "t.f", Some("/srv/app/tests/t.py")));
        assert!(!allows(&f, "time.sleep", None));
    }

    #[test]
    fn globs_cover_the_whole_text() {
        let f = FilterSet::new(["*/site-packages/*", "myapp.*.db"], [] as [&str; 0]).unwrap();
        assert!(allows(
            &f,
            "requests.get",
            Some("/venv/lib/site-packages/requests/api.py")
        ));
        assert!(allows(&f, "myapp.users.db", None));
        assert!(!allows(
            &f,
            "myapp.users.cache",
            Some("/srv/myapp/users/cache.py")
        ));
    }

    #[test]
    fn bad_patterns_are_refused_with_a_reason() {
        for bad in ["", "  ", "site-packages", "my app"] {
            let err = FilterSet::new([bad], [] as [&str; 0]).unwrap_err();
            assert_eq!(err.pattern, bad);
        }
    }

    #[test]
    fn glob_classes_and_wildcards() {
        assert!(glob_match("a?c", "abc"));
        assert!(glob_match("[a-c]x", "bx"));
        assert!(!glob_match("[!a-c]x", "bx"));
        assert!(glob_match("*.py", "/x/y.py"));
        assert!(glob_match("a*b*c", "aXXbYYc"));
        assert!(!glob_match("a*b*c", "aXXbYY"));
        assert!(glob_match("[", "["));
    }
}

//! Two rules of the code's shape, checked by reading the sources:
//! - the library's top-level modules form a layer cake: every `use` points
//!   down, no module reaches back up into one that uses it (a cycle fails
//!   the test, named);
//! - no function of the library or the binaries is over
//!   [`MAX_FUNCTION_LINES`] lines (tests aside): a longer one is split into
//!   named steps.
//!
//! The layers today, bottom to top: `error`, `kinds`, `json`, `security` ->
//! `config`, `metrics`, `telemetry`, `http` -> `db` -> `storage` ->
//! `attempt` -> `ingest`, `export`, `webhooks` -> `jobs` -> `lifecycle`,
//! `reseal`.
//!
//! A module's dependencies are the top-level modules its files name through
//! `crate::x`, a `use crate::{x, ...}` group, or as many `super::` as it
//! takes to reach the crate root; comments and `#[cfg(test)]` parts are not
//! read (tests may reach anywhere).
use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
};

type Graph = BTreeMap<String, BTreeSet<String>>;

/// The brace characters, written as escapes so that this file's own code
/// keeps its braces balanced for any tool that counts them.
const OPEN: char = '\u{7b}';
const CLOSE: char = '\u{7d}';

#[test]
fn no_cycle_among_top_level_modules() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let graph = graph(&root);
    assert!(graph.len() > 10, "modules not found: {graph:?}");
    assert!(
        graph["jobs"].contains("ingest"),
        "edges not read: {graph:?}"
    );
    if let Some(cycle) = find_cycle(&graph) {
        panic!("module cycle: {}", cycle.join(" -> "));
    }
}

/// The longest a function may be, from its `fn` line to its closing brace.
const MAX_FUNCTION_LINES: usize = 80;

#[test]
fn no_function_over_80_lines() {
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut long = Vec::new();
    for dir in ["src", "../scheduler/src", "../worker/src"] {
        for file in rust_files(&crate_dir.join(dir)) {
            let text = fs::read_to_string(&file).expect("read source");
            for (name, line, length) in long_functions(&text) {
                long.push(format!("{}:{line} {name} ({length} lines)", file.display()));
            }
        }
    }
    assert!(
        long.is_empty(),
        "functions over {MAX_FUNCTION_LINES} lines:\n{}",
        long.join("\n")
    );
}

#[test]
fn long_functions_are_measured_from_fn_to_closing_brace() {
    let body = "        x();\n".repeat(MAX_FUNCTION_LINES);
    let text = format!(
        "trait T {{\n    async fn declared(\n        a: u8,\n    ) -> u8;\n}}\nimpl A {{\n    pub async fn long(\n        a: u8,\n    ) {{\n{body}    }}\n    fn short() {{}}\n}}\n#[cfg(test)]\nfn ignored() {{\n{body}}}\n"
    );
    assert_eq!(
        long_functions(&text),
        vec![("long".to_owned(), 7, MAX_FUNCTION_LINES + 4)]
    );
}

fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in fs::read_dir(&dir).expect("read dir") {
            let path = entry.expect("dir entry").path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                files.push(path);
            }
        }
    }
    files
}

/// (name, first line, length) of each function over the limit, before the
/// file's `#[cfg(test)]` part. A function ends at the first closing-brace line with
/// the indentation of its `fn` line (rustfmt's layout).
fn long_functions(text: &str) -> Vec<(String, usize, usize)> {
    let lines: Vec<&str> = text
        .lines()
        .take_while(|l| l.trim() != "#[cfg(test)]")
        .collect();
    let mut found = Vec::new();
    for (at, line) in lines.iter().enumerate() {
        let Some(name) = fn_name(line) else { continue };
        // A declaration without a body (in a trait) ends its signature with
        // `;`, a one-line function with its closing brace: neither is long.
        let signature_end = lines[at..]
            .iter()
            .map(|l| l.trim_end())
            .find(|l| l.ends_with(OPEN) || l.ends_with(';') || l.ends_with(CLOSE));
        if signature_end.is_none_or(|l| !l.ends_with(OPEN)) {
            continue;
        }
        let indent = line.len() - line.trim_start().len();
        let closing = format!("{}{CLOSE}", " ".repeat(indent));
        let end = lines[at..]
            .iter()
            .position(|l| l.starts_with(&closing) && l.len() - l.trim_start().len() == indent);
        if let Some(end) = end
            && end + 1 > MAX_FUNCTION_LINES
        {
            found.push((name, at + 1, end + 1));
        }
    }
    found
}

/// The function a line opens, if it does (`pub`, `async`, `const` and
/// `unsafe` before `fn` allowed).
fn fn_name(line: &str) -> Option<String> {
    let mut words = line.split_whitespace();
    loop {
        match words.next()? {
            "fn" => return Some(ident(words.next()?)),
            w if w == "async" || w == "const" || w == "unsafe" || w.starts_with("pub") => {}
            _ => return None,
        }
    }
}

#[test]
fn a_cycle_is_found_and_named() {
    let mut graph = Graph::new();
    for (from, to) in [("a", "b"), ("b", "c"), ("c", "a"), ("c", "d")] {
        graph.entry(from.into()).or_default().insert(to.into());
    }
    graph.entry("d".into()).or_default();
    assert_eq!(
        find_cycle(&graph),
        Some(vec!["a".into(), "b".into(), "c".into(), "a".into()])
    );
    graph.get_mut("c").map(|deps| deps.remove("a"));
    assert_eq!(find_cycle(&graph), None);
}

fn graph(root: &Path) -> Graph {
    let modules = top_level_modules(root);
    let mut graph = Graph::new();
    for module in &modules {
        let mut deps = BTreeSet::new();
        for (file, depth) in files_of(root, module) {
            let text = fs::read_to_string(&file).expect("read source");
            for name in referenced(&code_only(&text), depth) {
                if modules.contains(&name) && &name != module {
                    deps.insert(name);
                }
            }
        }
        graph.insert(module.clone(), deps);
    }
    graph
}

fn top_level_modules(root: &Path) -> BTreeSet<String> {
    let mut modules = BTreeSet::new();
    for entry in fs::read_dir(root).expect("read src") {
        let path = entry.expect("dir entry").path();
        let name = path
            .file_stem()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        if name != "lib" && name != "layering" {
            modules.insert(name.to_owned());
        }
    }
    modules
}

/// The files of a module, each with how many `super::` reach the crate root.
fn files_of(root: &Path, module: &str) -> Vec<(PathBuf, usize)> {
    let file = root.join(format!("{module}.rs"));
    if file.is_file() {
        return vec![(file, 1)];
    }
    let mut found = Vec::new();
    let mut dirs = vec![(root.join(module), 1usize)];
    while let Some((dir, depth)) = dirs.pop() {
        for entry in fs::read_dir(&dir).expect("read module dir") {
            let path = entry.expect("dir entry").path();
            if path.is_dir() {
                dirs.push((path, depth + 1));
            } else if path.file_name().is_some_and(|n| n == "mod.rs") {
                found.push((path, depth));
            } else if path.extension().is_some_and(|e| e == "rs") {
                found.push((path, depth + 1));
            }
        }
    }
    found
}

/// The text without `//` comments and without what follows `#[cfg(test)]`.
fn code_only(text: &str) -> String {
    let code = text.split("#[cfg(test)]").next().unwrap_or_default();
    code.lines()
        .map(|line| line.split("//").next().unwrap_or_default())
        .collect::<Vec<_>>()
        .join("\n")
}

/// Top-level names a file refers to: `crate::x`, `use crate::{x, y::z}`, and
/// `super::` repeated `depth` times followed by a name.
fn referenced(code: &str, depth: usize) -> Vec<String> {
    let mut names = Vec::new();
    let prefixes = ["crate::".to_owned(), "super::".repeat(depth)];
    for prefix in &prefixes {
        let mut rest = code;
        while let Some(at) = rest.find(prefix.as_str()) {
            let before = rest[..at].chars().next_back();
            rest = &rest[at + prefix.len()..];
            if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':') {
                continue;
            }
            if let Some(group) = rest.strip_prefix(OPEN) {
                names.extend(group_names(group));
            } else {
                names.push(ident(rest));
            }
        }
    }
    names
}

/// The first path segment of each item of a `{...}` group.
fn group_names(group: &str) -> Vec<String> {
    let mut names = Vec::new();
    let (mut depth, mut start) = (0usize, true);
    for (i, c) in group.char_indices() {
        match c {
            c if c == OPEN => depth += 1,
            c if c == CLOSE && depth == 0 => break,
            c if c == CLOSE => depth -= 1,
            ',' if depth == 0 => start = true,
            c if start && !c.is_whitespace() => {
                names.push(ident(&group[i..]));
                start = false;
            }
            _ => {}
        }
    }
    names
}

fn ident(text: &str) -> String {
    text.chars()
        .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
        .collect()
}

/// A cycle as the path of modules that closes it, if there is one.
fn find_cycle(graph: &Graph) -> Option<Vec<String>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        Open,
        Done,
    }
    let mut marks: BTreeMap<&str, Mark> = BTreeMap::new();
    for start in graph.keys() {
        if marks.contains_key(start.as_str()) {
            continue;
        }
        // Depth-first with an explicit stack of (module, its next edges).
        let mut path: Vec<&str> = vec![start];
        let mut edges = vec![graph[start].iter()];
        marks.insert(start, Mark::Open);
        while let Some(next) = edges.last_mut() {
            match next.next() {
                Some(dep) => match marks.get(dep.as_str()) {
                    Some(Mark::Open) => {
                        let from = path.iter().position(|m| *m == dep).unwrap_or(0);
                        let mut cycle: Vec<String> =
                            path[from..].iter().map(|m| (*m).to_owned()).collect();
                        cycle.push(dep.clone());
                        return Some(cycle);
                    }
                    Some(Mark::Done) => {}
                    None => {
                        marks.insert(dep, Mark::Open);
                        path.push(dep);
                        edges.push(graph[dep].iter());
                    }
                },
                None => {
                    if let Some(done) = path.pop() {
                        marks.insert(done, Mark::Done);
                    }
                    edges.pop();
                }
            }
        }
    }
    None
}

//! The module graph stays a graph without cycles: no module reaches back to
//! one that uses it, at the top level (`engine`, `api`, `policy`, …) and
//! among the files of each module directory. The client side talks to the
//! broker only through the generated gRPC types. Read from the source, so
//! a wrong-way import fails here with the edge that closed the cycle.
#![allow(
    clippy::unwrap_used,
    clippy::panic,
    reason = "a failure is a test failure"
)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Source text before the file's test module, comments dropped.
/// The code of a file without comments and test modules: an inline
/// `#[cfg(test)] mod … {` ends the file's code (test modules come last),
/// a `#[cfg(test)] mod x;` is skipped; any other `#[cfg(test)]` item (a
/// test-only variant or helper) is kept, as the test build compiles it.
fn code(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap();
    let mut kept = Vec::new();
    let mut lines = text.lines().peekable();
    while let Some(l) = lines.next() {
        if l.trim() == "#[cfg(test)]" {
            let next = lines.peek().map_or("", |n| n.trim());
            let module = next.split_whitespace().any(|w| w == "mod");
            if module && next.ends_with(';') {
                lines.next();
                continue;
            }
            if module {
                break;
            }
        }
        if !l.trim_start().starts_with("//") {
            kept.push(l);
        }
    }
    kept.join("\n")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// Names that follow `prefix` in `text` (identifier characters).
fn after<'t>(text: &'t str, prefix: &str) -> BTreeSet<&'t str> {
    text.match_indices(prefix)
        .map(|(i, _)| {
            let rest = &text[i + prefix.len()..];
            let end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(rest.len());
            &rest[..end]
        })
        .filter(|n| !n.is_empty())
        .collect()
}

/// `use crate::{a, b::c}` lists too: the first name of each item.
fn grouped_crate_uses(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for (i, _) in text.match_indices("crate::{") {
        let rest = &text[i + "crate::{".len()..];
        let mut depth = 1;
        let mut item = String::new();
        for c in rest.chars() {
            match c {
                '{' => depth += 1,
                '}' => depth -= 1,
                ',' if depth == 1 => {
                    out.extend(first_name(&item));
                    item.clear();
                    continue;
                }
                _ => {}
            }
            if depth == 0 {
                break;
            }
            item.push(c);
        }
        out.extend(first_name(&item));
    }
    out
}

fn first_name(item: &str) -> Option<String> {
    let t = item.trim_start();
    let end = t
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .unwrap_or(t.len());
    (end > 0).then(|| t[..end].to_owned())
}

type Graph = BTreeMap<String, BTreeSet<String>>;

/// A cycle in `g`, if any, as the path that closes it.
fn cycle(g: &Graph) -> Option<Vec<String>> {
    fn visit(
        n: &str,
        g: &Graph,
        state: &mut BTreeMap<String, u8>,
        path: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        match state.get(n) {
            Some(1) => {
                let from = path.iter().position(|p| p == n).unwrap_or(0);
                let mut c = path[from..].to_vec();
                c.push(n.to_owned());
                return Some(c);
            }
            Some(_) => return None,
            None => {}
        }
        state.insert(n.to_owned(), 1);
        path.push(n.to_owned());
        for m in g.get(n).into_iter().flatten() {
            if let Some(c) = visit(m, g, state, path) {
                return Some(c);
            }
        }
        path.pop();
        state.insert(n.to_owned(), 2);
        None
    }
    let mut state = BTreeMap::new();
    g.keys()
        .find_map(|n| visit(n, g, &mut state, &mut Vec::new()))
}

struct Crate {
    /// Top-level module -> top-level modules it uses.
    top: Graph,
    /// Module directory -> (file module -> sibling file modules it uses).
    inner: BTreeMap<String, Graph>,
}

fn read_crate() -> Crate {
    // LAYERING_SRC points the check at another tree (e.g. an old checkout,
    // to see it fail there).
    let src = std::env::var_os("LAYERING_SRC").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
        PathBuf::from,
    );
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut top = Graph::new();
    let mut inner: BTreeMap<String, Graph> = BTreeMap::new();
    for f in files {
        let rel = f.strip_prefix(&src).unwrap();
        let parts: Vec<String> = rel
            .with_extension("")
            .iter()
            .map(|p| p.to_string_lossy().into_owned())
            .collect();
        if parts == ["lib"] || parts == ["main"] {
            continue;
        }
        let module = parts[0].clone();
        let text = code(&f);
        let mut uses: BTreeSet<String> = after(&text, "crate::")
            .into_iter()
            .map(str::to_owned)
            .collect();
        uses.extend(grouped_crate_uses(&text));
        uses.remove(&module);
        uses.remove("pb");
        top.entry(module.clone()).or_default().extend(uses);
        // Sibling files of a module directory (not its mod.rs).
        if parts.len() == 2 && parts[1] != "mod" {
            let own = format!("crate::{module}::");
            let mut siblings: BTreeSet<String> = after(&text, "super::")
                .into_iter()
                .map(str::to_owned)
                .collect();
            siblings.extend(after(&text, &own).into_iter().map(str::to_owned));
            siblings.remove(&parts[1]);
            inner
                .entry(module)
                .or_default()
                .entry(parts[1].clone())
                .or_default()
                .extend(siblings);
        }
    }
    // Keep only edges to modules that exist (a name after `super::` may be
    // an item of mod.rs, which every file may use).
    let names: BTreeSet<String> = top.keys().cloned().collect();
    for uses in top.values_mut() {
        uses.retain(|u| names.contains(u));
    }
    for g in inner.values_mut() {
        let files: BTreeSet<String> = g.keys().cloned().collect();
        for uses in g.values_mut() {
            uses.retain(|u| files.contains(u));
        }
    }
    Crate { top, inner }
}

#[test]
fn no_module_reaches_back_to_one_that_uses_it() {
    let c = read_crate();
    assert!(
        c.top.contains_key("store") && c.top.contains_key("api"),
        "{:?}",
        c.top.keys()
    );
    if let Some(path) = cycle(&c.top) {
        panic!("import cycle between modules: {}", path.join(" -> "));
    }
    for (dir, g) in &c.inner {
        if let Some(path) = cycle(g) {
            panic!("import cycle inside `{dir}`: {}", path.join(" -> "));
        }
    }
}

#[test]
fn the_domain_knows_nothing_of_grpc_or_the_command_line() {
    let c = read_crate();
    let outer = [
        "api", "console", "server", "cli", "client", "agent", "bench", "dev",
    ];
    for domain in [
        "text", "vocab", "chain", "clock", "identity", "store", "keys", "token", "rotation",
        "policy", "audit", "metrics", "notify", "engine",
    ] {
        let uses = &c.top[domain];
        for o in outer {
            assert!(!uses.contains(o), "`{domain}` uses `{o}`");
        }
    }
}

#[test]
fn the_client_side_speaks_only_through_the_generated_client() {
    let c = read_crate();
    let server_side = [
        "api", "engine", "server", "store", "audit", "notify", "metrics",
    ];
    for client in ["client", "agent", "bench"] {
        for s in server_side.iter().chain(&["cli", "policy"]) {
            assert!(!c.top[client].contains(*s), "`{client}` uses `{s}`");
        }
    }
    // `cli` may start the server (`serve`) and read a policy offline
    // (`policy check|explain`), nothing else of the broker side.
    for s in [
        "api", "console", "engine", "store", "audit", "notify", "metrics",
    ] {
        assert!(!c.top["cli"].contains(s), "`cli` uses `{s}`");
    }
}

#[test]
fn the_detector_finds_a_cycle_when_there_is_one() {
    let mut g = Graph::new();
    g.entry("a".into()).or_default().insert("b".into());
    g.entry("b".into()).or_default().insert("c".into());
    assert!(cycle(&g).is_none());
    g.entry("c".into()).or_default().insert("a".into());
    assert_eq!(cycle(&g).unwrap(), ["a", "b", "c", "a"]);
    assert_eq!(
        grouped_crate_uses("use crate::{audit::Entry, store::{A, B}, text};"),
        ["audit", "store", "text"]
            .iter()
            .map(|s| s.to_string())
            .collect()
    );
}

/// Backticked names in a table cell, a directory's trailing `/` dropped.
fn ticked(cell: &str) -> Vec<String> {
    cell.split('`')
        .skip(1)
        .step_by(2)
        .map(|n| n.trim_end_matches('/').to_owned())
        .collect()
}

fn architecture() -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/architecture.md"))
        .unwrap()
}

/// The rows of the module table: each module and the modules its row says
/// it uses, in the table's order.
fn module_map(doc: &str) -> Vec<(String, BTreeSet<String>)> {
    let section = doc
        .split("## Modules and their direction")
        .nth(1)
        .and_then(|s| s.split("\n### ").next())
        .unwrap();
    let mut rows = Vec::new();
    for line in section.lines().filter(|l| l.starts_with("| `")) {
        let cells: Vec<&str> = line.split(" | ").collect();
        assert_eq!(cells.len(), 3, "a module row has three cells: {line}");
        let names = ticked(cells[0]);
        assert_eq!(names.len(), 1, "one module per row: {line}");
        let uses = ticked(cells[2]).into_iter().collect();
        rows.push((names[0].clone(), uses));
    }
    rows
}

/// Issue 21, finding 9: one map of the modules, and it is the code's.
#[test]
fn the_module_map_in_the_architecture_is_the_code() {
    let c = read_crate();
    let rows = module_map(&architecture());
    let mut wrong = Vec::new();
    let mut above = BTreeSet::new();
    for (module, listed) in &rows {
        let Some(uses) = c.top.get(module) else {
            wrong.push(format!(
                "the map names `{module}`, which is no module of src/"
            ));
            continue;
        };
        for u in uses.difference(listed) {
            wrong.push(format!(
                "`{module}` uses `{u}`, which its row does not list"
            ));
        }
        for u in listed.difference(uses) {
            wrong.push(format!(
                "`{module}`'s row lists `{u}`, which it does not use"
            ));
        }
        for u in listed.intersection(uses) {
            if !above.contains(u) {
                wrong.push(format!(
                    "`{module}` uses `{u}`, which is not above it in the map"
                ));
            }
        }
        above.insert(module.clone());
    }
    for module in c.top.keys() {
        if !above.contains(module) {
            wrong.push(format!("`{module}` has no row in the map"));
        }
    }
    assert!(
        wrong.is_empty(),
        "docs/architecture.md, \"Modules and their direction\":\n{}",
        wrong.join("\n")
    );
}

/// Every file of a module directory has its line in that directory's file
/// table, and every file a table names exists.
#[test]
fn every_file_of_a_module_directory_is_in_the_map() {
    let doc = architecture();
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut tables = 0;
    let mut wrong = Vec::new();
    let lines: Vec<&str> = doc.lines().collect();
    for (i, head) in lines.iter().enumerate() {
        let Some(dir) = head
            .strip_prefix("| `")
            .and_then(|h| h.split_once("/` file |"))
            .map(|(d, _)| d)
        else {
            continue;
        };
        tables += 1;
        let listed: BTreeSet<String> = lines[i + 2..]
            .iter()
            .take_while(|l| l.starts_with('|'))
            .flat_map(|l| ticked(l.split(" | ").next().unwrap()))
            .collect();
        let present: BTreeSet<String> = std::fs::read_dir(src.join(dir))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        for f in present.difference(&listed) {
            wrong.push(format!("src/{dir}/{f} is not in the `{dir}/` file table"));
        }
        for f in listed.difference(&present) {
            wrong.push(format!(
                "the `{dir}/` file table names {f}, which src/{dir}/ does not hold"
            ));
        }
    }
    // Every module directory has its table.
    for e in std::fs::read_dir(&src).unwrap() {
        let e = e.unwrap();
        let name = e.file_name().to_string_lossy().into_owned();
        if e.path().is_dir() && !doc.contains(&format!("| `{name}/` file |")) {
            wrong.push(format!("src/{name}/ has no file table"));
        }
    }
    assert!(tables >= 8, "{tables} file tables found");
    assert!(
        wrong.is_empty(),
        "docs/architecture.md:\n{}",
        wrong.join("\n")
    );
}
